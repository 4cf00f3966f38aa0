//! The host side of `realm:inference/llm`: what a guest may ask of the models.
//!
//! Model access is scoped per call by [`ModelAccess`]: a guest sees only the
//! models its pipeline or tenant config grants it. This build links no
//! inference engine yet, so every model lookup ends in a typed
//! `model-not-found` error; nothing is ever answered with made-up text.

use std::sync::Arc;

use tokio::sync::mpsc;
use wasmtime::component::Resource;

use super::bindings::llm::{self, Completion, Message, ModelInfo, Sampling, Usage};
use super::bindings::types::Error;
use super::state::GuestState;

/// The models one guest call may use.
#[derive(Debug, Clone, Default)]
pub struct ModelAccess {
    allowed: Arc<[String]>,
}

impl ModelAccess {
    /// Grants access to the models named in `allowed`.
    pub fn new(allowed: impl IntoIterator<Item = String>) -> Self {
        ModelAccess {
            allowed: allowed.into_iter().collect(),
        }
    }

    /// The models this call may see and that are loaded.
    fn visible(&self) -> Vec<ModelInfo> {
        Vec::new()
    }

    /// Resolves `name` to a loaded model the caller may use.
    fn resolve(&self, name: &str) -> Result<std::convert::Infallible, Error> {
        if !self.allowed.iter().any(|m| m == name) {
            let allowed = if self.allowed.is_empty() {
                "none".to_string()
            } else {
                self.allowed.join(", ")
            };
            return Err(Error::ModelNotFound(format!(
                "model `{name}` is not available to this component (it may use: {allowed})"
            )));
        }
        Err(Error::ModelNotFound(format!(
            "model `{name}` is not loaded: this realm-host build has no inference engine"
        )))
    }
}

/// A generation in progress; its text pieces arrive over a channel from the engine.
pub struct TokenStream {
    pieces: mpsc::Receiver<Result<String, Error>>,
    usage: Usage,
}

/// A guest-driven decoding session: the tokens fed so far, on one model.
pub struct Session {
    tokens: Vec<u32>,
}

fn table_error(e: wasmtime::component::ResourceTableError) -> Error {
    Error::Runtime(format!("invalid resource handle: {e}"))
}

impl llm::Host for GuestState {
    async fn list_models(&mut self) -> Vec<ModelInfo> {
        self.models.visible()
    }

    async fn generate(
        &mut self,
        model: String,
        _prompt: String,
        _opts: Sampling,
    ) -> Result<Completion, Error> {
        match self.models.resolve(&model)? {}
    }

    async fn chat(
        &mut self,
        model: String,
        _messages: Vec<Message>,
        _opts: Sampling,
    ) -> Result<Completion, Error> {
        match self.models.resolve(&model)? {}
    }

    async fn stream(
        &mut self,
        model: String,
        _prompt: String,
        _opts: Sampling,
    ) -> Result<Resource<TokenStream>, Error> {
        match self.models.resolve(&model)? {}
    }

    async fn tokenize(&mut self, model: String, _text: String) -> Result<Vec<u32>, Error> {
        match self.models.resolve(&model)? {}
    }

    async fn detokenize(&mut self, model: String, _tokens: Vec<u32>) -> Result<String, Error> {
        match self.models.resolve(&model)? {}
    }

    async fn embed(&mut self, model: String, _texts: Vec<String>) -> Result<Vec<Vec<f32>>, Error> {
        match self.models.resolve(&model)? {}
    }

    async fn open_session(&mut self, model: String) -> Result<Resource<Session>, Error> {
        match self.models.resolve(&model)? {}
    }
}

impl llm::HostTokenStream for GuestState {
    async fn next(&mut self, stream: Resource<TokenStream>) -> Option<Result<String, Error>> {
        match self.table.get_mut(&stream) {
            Ok(stream) => stream.pieces.recv().await,
            Err(e) => Some(Err(table_error(e))),
        }
    }

    async fn usage(&mut self, stream: Resource<TokenStream>) -> Usage {
        self.table.get(&stream).map(|s| s.usage).unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: 0,
        })
    }

    async fn drop(&mut self, stream: Resource<TokenStream>) -> wasmtime::Result<()> {
        self.table.delete(stream)?;
        Ok(())
    }
}

impl llm::HostSession for GuestState {
    async fn feed(&mut self, session: Resource<Session>, tokens: Vec<u32>) -> Result<(), Error> {
        let session = self.table.get_mut(&session).map_err(table_error)?;
        session.tokens.extend(tokens);
        Err(Error::Runtime(
            "this realm-host build has no inference engine to evaluate tokens".into(),
        ))
    }

    async fn logits(&mut self, session: Resource<Session>) -> Result<Vec<f32>, Error> {
        self.table.get(&session).map_err(table_error)?;
        Err(Error::Runtime(
            "this realm-host build has no inference engine to compute logits".into(),
        ))
    }

    async fn rewind(&mut self, session: Resource<Session>, len: u32) -> Result<(), Error> {
        let session = self.table.get_mut(&session).map_err(table_error)?;
        let len = len as usize;
        if len > session.tokens.len() {
            return Err(Error::InvalidInput(format!(
                "cannot rewind to {len} tokens: the session holds {}",
                session.tokens.len()
            )));
        }
        session.tokens.truncate(len);
        Ok(())
    }

    async fn len(&mut self, session: Resource<Session>) -> u32 {
        self.table
            .get(&session)
            .map(|s| s.tokens.len() as u32)
            .unwrap_or(0)
    }

    async fn drop(&mut self, session: Resource<Session>) -> wasmtime::Result<()> {
        self.table.delete(session)?;
        Ok(())
    }
}
