//! The host side of `realm:inference/llm`: what a guest may ask of the models.
//!
//! Model access is scoped per call by [`ModelAccess`]: a guest sees only the
//! models its pipeline or tenant config grants it, under the names given
//! there. Inference runs on blocking threads, outside the guest's fuel; a
//! guest that is stopped (deadline, trap) cancels its generations.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use realm_models::chat::ChatMessage;
use realm_models::chat::tools::{self, ToolChoice, ToolParser, ToolPiece};
use realm_models::engine::{
    ConstraintSpec, Decoder, Engine, EngineError, FinishReason, GenerateOptions, GenerateParams,
    Offer, OnEnd, Pending, Request, TextSink,
};
use tokio::sync::mpsc;
use wasmtime::component::Resource;

use crate::cancel::CancelOnDrop;
use crate::metering::{self, Charge, Meter, SharedMeter};

use super::bindings::llm::{self, Completion, Message, ModelInfo, Sampling, Usage};
use super::bindings::types::{
    Constraint as WitConstraint, Error, FinishReason as WitFinish, ToolCall as WitToolCall,
    ToolChoice as WitToolChoice, ToolSet as WitToolSet,
};
use super::state::GuestState;

/// Most texts one `embed` call may take.
const MAX_EMBED_TEXTS: usize = 256;
/// Tokens a session feeds per forward pass (cancellation is checked between passes).
const FEED_CHUNK: usize = 64;
/// Pieces a stream buffers ahead of a slow guest.
const STREAM_BUFFER: usize = 64;

/// The models one guest call may use, by the names it knows them by.
#[derive(Debug, Clone, Default)]
pub struct ModelAccess {
    models: Arc<BTreeMap<String, Arc<dyn Engine>>>,
    /// Whose generations these are, for the batcher's fair sharing.
    tenant: Arc<str>,
    weight: u32,
    /// Admits and charges generations to the tenant's limits.
    meter: SharedMeter,
}

impl ModelAccess {
    /// Grants access to `models`, each under its name.
    pub fn new(models: impl IntoIterator<Item = (String, Arc<dyn Engine>)>) -> Self {
        ModelAccess {
            models: Arc::new(models.into_iter().collect()),
            tenant: Arc::from(""),
            weight: 1,
            meter: None,
        }
    }

    /// The same access, with every generation admitted and charged by `meter`.
    pub fn metered(mut self, meter: Arc<dyn Meter>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Admits work on `model` of `prompt` tokens and up to `max_tokens` new
    /// ones (a session's fed tokens).
    async fn admit(
        &self,
        model: &dyn Engine,
        prompt: usize,
        max_tokens: usize,
    ) -> Result<Option<Box<dyn Charge>>, Error> {
        let context = model.info().context_length;
        metering::admit(
            &self.meter,
            self.name_of(model),
            metering::most_tokens(prompt, max_tokens, context),
        )
        .await
        .map_err(|e| Error::QuotaExceeded(e.0))
    }

    /// The name `model` is granted under (for the usage metrics): when it
    /// is granted as a model alone too (a default adapter), the name that
    /// says its adapter.
    fn name_of(&self, model: &dyn Engine) -> &str {
        (self.models.iter())
            .filter(|(_, m)| std::ptr::addr_eq(Arc::as_ptr(m), model))
            .max_by_key(|(name, _)| name.contains(':'))
            .map_or("", |(name, _)| name.as_str())
    }

    /// Admits `request` on `model` with this access's meter and submits it
    /// with `on_end`.
    async fn submit(
        &self,
        model: &dyn Engine,
        request: Request,
        on_end: Option<OnEnd>,
    ) -> Result<Pending, Error> {
        metering::submit(&self.meter, self.name_of(model), model, request, on_end)
            .await
            .map_err(|e| Error::QuotaExceeded(e.0))
    }

    /// The same access, with generations counted as `tenant`'s (of `weight`)
    /// when models are shared between tenants.
    pub fn on_behalf_of(mut self, tenant: &str, weight: u32) -> Self {
        self.tenant = Arc::from(tenant);
        self.weight = weight;
        self
    }

    fn visible(&self) -> Vec<ModelInfo> {
        self.models
            .iter()
            .map(|(name, m)| {
                let c = m.info();
                ModelInfo {
                    name: name.clone(),
                    architecture: c.architecture.clone(),
                    context_length: c.context_length as u32,
                    vocab_size: c.vocab_size as u32,
                }
            })
            .collect()
    }

    fn resolve(&self, name: &str) -> Result<Arc<dyn Engine>, Error> {
        self.models.get(name).cloned().ok_or_else(|| {
            let allowed: Vec<&str> = self.models.keys().map(String::as_str).collect();
            Error::ModelNotFound(format!(
                "model `{name}` is not available to this component (it may use: {})",
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            ))
        })
    }
}

/// Converts WIT sampling options into engine parameters, by the engine's rules.
fn params(opts: &Sampling) -> Result<GenerateParams, Error> {
    GenerateOptions {
        max_tokens: Some(opts.max_tokens),
        temperature: Some(opts.temperature),
        top_k: Some(opts.top_k),
        top_p: Some(opts.top_p),
        min_p: Some(opts.min_p),
        repeat_penalty: Some(opts.repeat_penalty),
        presence_penalty: Some(opts.presence_penalty),
        frequency_penalty: Some(opts.frequency_penalty),
        seed: opts.seed,
        stop: opts.stop.clone(),
    }
    .check()
    .map_err(|e| Error::InvalidInput(e.to_string()))
}

/// The engine's constraint for a WIT `constraint`.
fn constraint(c: &WitConstraint) -> Result<ConstraintSpec, Error> {
    Ok(match c {
        WitConstraint::JsonSchema(text) => {
            ConstraintSpec::JsonSchema(serde_json::from_str(text).map_err(|e| {
                Error::InvalidInput(format!("the constraint's JSON schema is not JSON: {e}"))
            })?)
        }
        WitConstraint::JsonObject => ConstraintSpec::JsonObject,
        WitConstraint::Regex(regex) => ConstraintSpec::Regex(regex.clone()),
        WitConstraint::Grammar(lark) => ConstraintSpec::Lark(lark.clone()),
    })
}

/// The engine's tool set for a WIT `tool-set`.
fn tool_set(set: WitToolSet) -> Result<tools::ToolSet, Error> {
    let offered = set
        .tools
        .into_iter()
        .map(|t| {
            let parameters = serde_json::from_str(&t.parameters).map_err(|e| {
                Error::InvalidInput(format!(
                    "the parameters of tool `{}` are not JSON: {e}",
                    t.name
                ))
            })?;
            Ok(tools::Tool {
                name: t.name,
                description: Some(t.description).filter(|d| !d.is_empty()),
                parameters,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let choice = match set.choice {
        WitToolChoice::Auto => ToolChoice::Auto,
        WitToolChoice::Required => ToolChoice::Required,
        WitToolChoice::Function(name) => ToolChoice::Function(name),
    };
    tools::ToolSet::new(offered, choice, set.parallel).map_err(Error::InvalidInput)
}

/// The engine's message for a WIT `message`.
fn message(m: Message) -> Result<ChatMessage, Error> {
    let tool_calls = m
        .tool_calls
        .into_iter()
        .map(|c| {
            let arguments: serde_json::Value = serde_json::from_str(&c.arguments)
                .ok()
                .filter(serde_json::Value::is_object)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "the arguments of the call `{}` are not a JSON object",
                        c.id
                    ))
                })?;
            Ok(tools::ToolCall {
                id: c.id,
                name: c.name,
                arguments,
            })
        })
        .collect::<Result<_, Error>>()?;
    Ok(ChatMessage {
        role: m.role,
        content: m.content,
        tool_calls,
        tool_call_id: m.tool_call_id,
        name: None,
    })
}

fn engine_error(e: &EngineError) -> Error {
    match e {
        EngineError::InvalidInput(m) => Error::InvalidInput(m.clone()),
        EngineError::Chat(c) => Error::InvalidInput(c.to_string()),
        other => Error::Runtime(other.to_string()),
    }
}

fn finish(f: FinishReason) -> WitFinish {
    match f {
        FinishReason::Stop => WitFinish::Stop,
        FinishReason::Length => WitFinish::Length,
        FinishReason::Cancelled => WitFinish::Cancelled,
    }
}

/// Runs `work` on a blocking thread; the generation it runs stops if the
/// caller goes away (a guest call abandoned at its deadline or trap drops
/// this future).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce(Arc<AtomicBool>) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let (_guard, cancelled) = CancelOnDrop::new();
    tokio::task::spawn_blocking(move || work(cancelled))
        .await
        .map_err(|e| Error::Runtime(format!("inference task failed: {e}")))?
}

/// A request for `prompt` on `model`, its constraint compiled (off the
/// async threads: a large schema takes milliseconds).
async fn request(
    access: &ModelAccess,
    model: &Arc<dyn Engine>,
    prompt: Vec<u32>,
    params: GenerateParams,
    spec: Option<ConstraintSpec>,
) -> Result<Request, Error> {
    let mut request = Request::new(prompt, params, &access.tenant, access.weight);
    if let Some(spec) = spec {
        let model = model.clone();
        request.constraint = Some(
            tokio::task::spawn_blocking(move || model.constrain(&spec))
                .await
                .map_err(|e| Error::Runtime(format!("compiling the constraint failed: {e}")))?
                .map_err(|e| engine_error(&e))?,
        );
    }
    Ok(request)
}

async fn complete(
    access: &ModelAccess,
    model: Arc<dyn Engine>,
    request: Request,
    parser: Option<ToolParser>,
) -> Result<Completion, Error> {
    // A guest stopped at its deadline or trap drops this future, and with
    // it the generation.
    let done = access
        .submit(model.as_ref(), request, None)
        .await?
        .await
        .map_err(|e| engine_error(&e))?;
    let mut finish = finish(done.finish);
    let (text, tool_calls) = match parser {
        None => (done.text, Vec::new()),
        Some(mut parser) => {
            let mut pieces = parser.push(&done.text);
            pieces.extend(parser.finish());
            let (mut text, mut calls) = (String::new(), Vec::new());
            for piece in pieces {
                match piece {
                    ToolPiece::Text(t) => text.push_str(&t),
                    ToolPiece::Call(c) => calls.push(WitToolCall {
                        id: c.id,
                        name: c.name,
                        arguments: c.arguments.to_string(),
                    }),
                }
            }
            if !calls.is_empty() && matches!(finish, WitFinish::Stop) {
                finish = WitFinish::ToolCalls;
            }
            (text, calls)
        }
    };
    Ok(Completion {
        text,
        usage: Usage {
            prompt_tokens: done.prompt_tokens as u32,
            completion_tokens: done.completion_tokens as u32,
        },
        finish,
        tool_calls,
    })
}

/// Hands a stream's pieces to its guest through a bounded channel; a full
/// channel pauses the generation, a dropped stream cancels it.
struct StreamSink(mpsc::Sender<Result<String, Error>>);

impl TextSink for StreamSink {
    fn offer(&mut self, piece: String) -> Offer {
        match self.0.try_send(Ok(piece)) {
            Ok(()) => Offer::Taken,
            // Only pieces are offered here; errors go in after the last one.
            Err(mpsc::error::TrySendError::Full(sent)) => Offer::Full(sent.unwrap_or_default()),
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Closed,
        }
    }
}

/// A generation in progress; its text pieces arrive over a channel from a blocking thread.
pub struct TokenStream {
    pieces: mpsc::Receiver<Result<String, Error>>,
    usage: Arc<Mutex<Usage>>,
    /// Cancels the generation when the stream is dropped unfinished.
    _generation: Pending,
}

/// A guest-driven decoding session on one model.
pub struct Session {
    state: Arc<Mutex<SessionState>>,
}

struct SessionState {
    model: Arc<dyn Engine>,
    decoder: Box<dyn Decoder>,
    tokens: Vec<u32>,
    logits: Option<Vec<f32>>,
}

fn table_error(e: wasmtime::component::ResourceTableError) -> Error {
    Error::Runtime(format!("invalid resource handle: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl llm::Host for GuestState {
    async fn list_models(&mut self) -> Vec<ModelInfo> {
        self.models.visible()
    }

    async fn generate(
        &mut self,
        model: String,
        prompt: String,
        opts: Sampling,
    ) -> Result<Completion, Error> {
        let model = self.models.resolve(&model)?;
        let params = params(&opts)?;
        let spec = opts.constraint.as_ref().map(constraint).transpose()?;
        let ids = model.prompt_tokens(&prompt);
        let request = request(&self.models, &model, ids, params, spec).await?;
        complete(&self.models, model, request, None).await
    }

    async fn chat(
        &mut self,
        model: String,
        messages: Vec<Message>,
        tools: Option<WitToolSet>,
        opts: Sampling,
    ) -> Result<Completion, Error> {
        let model = self.models.resolve(&model)?;
        let params = params(&opts)?;
        let messages: Vec<ChatMessage> = messages
            .into_iter()
            .map(message)
            .collect::<Result<_, _>>()?;
        let tools = tools.map(tool_set).transpose()?;
        // Offered tools are the constraint: a call the model opens is valid.
        let spec = match (&tools, &opts.constraint) {
            (None, c) => c.as_ref().map(constraint).transpose()?,
            (Some(set), None) => Some(ConstraintSpec::ToolCalls(set.clone(), model.tool_syntax())),
            (Some(_), Some(_)) => {
                return Err(Error::InvalidInput(
                    "a chat offering tools takes no other constraint: give the call's arguments a schema instead".into(),
                ));
            }
        };
        let offered = tools.as_ref().map_or(&[][..], |set| set.tools());
        let ids = model
            .chat_tokens(&messages, offered)
            .map_err(|e| engine_error(&e))?;
        let parser = tools
            .as_ref()
            .map(|set| ToolParser::new(set, model.tool_syntax()));
        let request = request(&self.models, &model, ids, params, spec).await?;
        complete(&self.models, model, request, parser).await
    }

    async fn stream(
        &mut self,
        model: String,
        prompt: String,
        opts: Sampling,
    ) -> Result<Resource<TokenStream>, Error> {
        let model = self.models.resolve(&model)?;
        let params = params(&opts)?;
        let spec = opts.constraint.as_ref().map(constraint).transpose()?;
        let ids = model.prompt_tokens(&prompt);
        let usage = Arc::new(Mutex::new(Usage {
            prompt_tokens: ids.len() as u32,
            completion_tokens: 0,
        }));
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let shared = usage.clone();
        let mut request = request(&self.models, &model, ids, params, spec).await?;
        request.sink = Some(Box::new(StreamSink(tx.clone())));
        let on_end: OnEnd = Box::new(move |result| match result {
            Ok(done) => lock(&shared).completion_tokens = done.completion_tokens as u32,
            // The sink took its last piece before this runs, so the channel
            // has room unless the guest stopped reading (then nobody cares).
            Err(e) => {
                let _ = tx.try_send(Err(engine_error(e)));
            }
        });
        // The stream resource owns the pending generation: dropping the
        // resource (or the guest) cancels it.
        let pending = (self.models)
            .submit(model.as_ref(), request, Some(on_end))
            .await?;
        self.table
            .push(TokenStream {
                pieces: rx,
                usage,
                _generation: pending,
            })
            .map_err(table_error)
    }

    async fn tokenize(&mut self, model: String, text: String) -> Result<Vec<u32>, Error> {
        let model = self.models.resolve(&model)?;
        Ok(model.tokenize(&text))
    }

    async fn detokenize(&mut self, model: String, tokens: Vec<u32>) -> Result<String, Error> {
        let model = self.models.resolve(&model)?;
        model.detokenize(&tokens).map_err(|e| engine_error(&e))
    }

    async fn embed(&mut self, model: String, texts: Vec<String>) -> Result<Vec<Vec<f32>>, Error> {
        let model = self.models.resolve(&model)?;
        if texts.len() > MAX_EMBED_TEXTS {
            return Err(Error::InvalidInput(format!(
                "{} texts in one call; the limit is {MAX_EMBED_TEXTS}",
                texts.len()
            )));
        }
        blocking(move |cancelled| {
            texts
                .iter()
                .map(|t| {
                    if cancelled.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    model.embed(t).map_err(|e| engine_error(&e))
                })
                .collect()
        })
        .await
    }

    async fn open_session(&mut self, model: String) -> Result<Resource<Session>, Error> {
        let model = self.models.resolve(&model)?;
        let state = SessionState {
            decoder: model.decoder(None).map_err(|e| engine_error(&e))?,
            model,
            tokens: Vec::new(),
            logits: None,
        };
        self.table
            .push(Session {
                state: Arc::new(Mutex::new(state)),
            })
            .map_err(table_error)
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
        match self.table.get(&stream) {
            Ok(s) => *lock(&s.usage),
            Err(_) => Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
            },
        }
    }

    async fn drop(&mut self, stream: Resource<TokenStream>) -> wasmtime::Result<()> {
        self.table.delete(stream)?;
        Ok(())
    }
}

impl llm::HostSession for GuestState {
    async fn feed(&mut self, session: Resource<Session>, tokens: Vec<u32>) -> Result<(), Error> {
        let state = self.table.get(&session).map_err(table_error)?.state.clone();
        // Fed tokens are prompt work: admitted and charged as such.
        let model = lock(&state).model.clone();
        let charge = self.models.admit(model.as_ref(), tokens.len(), 0).await?;
        let fed = tokens.len() as u64;
        let result = blocking(move |cancelled| {
            let mut s = lock(&state);
            let (vocab, context) = {
                let c = s.model.info();
                (c.vocab_size, c.context_length)
            };
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::InvalidInput(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            if s.tokens.len() + tokens.len() > context {
                return Err(Error::InvalidInput(format!(
                    "feeding {} tokens would exceed the context of {context}",
                    tokens.len()
                )));
            }
            let SessionState {
                decoder,
                tokens: fed,
                logits,
                ..
            } = &mut *s;
            // One batched pass per chunk; cancellation is checked between chunks.
            for chunk in tokens.chunks(FEED_CHUNK) {
                if cancelled.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                *logits = Some(decoder.forward(chunk).map_err(|e| engine_error(&e))?);
                fed.extend_from_slice(chunk);
            }
            Ok(())
        })
        .await;
        if let Some(charge) = charge {
            charge.settle(fed, 0);
        }
        result
    }

    async fn logits(&mut self, session: Resource<Session>) -> Result<Vec<f32>, Error> {
        let state = self.table.get(&session).map_err(table_error)?.state.clone();
        blocking(move |_| {
            let mut s = lock(&state);
            if let Some(logits) = &s.logits {
                return Ok(logits.clone());
            }
            let Some(&last) = s.tokens.last() else {
                return Err(Error::InvalidInput(
                    "feed at least one token before asking for logits".into(),
                ));
            };
            // After a rewind: recompute the last position.
            let n = s.tokens.len();
            let SessionState {
                decoder, logits, ..
            } = &mut *s;
            decoder.truncate(n - 1);
            let fresh = decoder.forward(&[last]).map_err(|e| engine_error(&e))?;
            *logits = Some(fresh.clone());
            Ok(fresh)
        })
        .await
    }

    async fn rewind(&mut self, session: Resource<Session>, len: u32) -> Result<(), Error> {
        let session = self.table.get(&session).map_err(table_error)?;
        let mut s = lock(&session.state);
        let len = len as usize;
        if len > s.tokens.len() {
            return Err(Error::InvalidInput(format!(
                "cannot rewind to {len} tokens: the session holds {}",
                s.tokens.len()
            )));
        }
        if len < s.tokens.len() {
            s.tokens.truncate(len);
            s.decoder.truncate(len);
            s.logits = None;
        }
        Ok(())
    }

    async fn len(&mut self, session: Resource<Session>) -> u32 {
        match self.table.get(&session) {
            Ok(s) => lock(&s.state).tokens.len() as u32,
            Err(_) => 0,
        }
    }

    async fn drop(&mut self, session: Resource<Session>) -> wasmtime::Result<()> {
        self.table.delete(session)?;
        Ok(())
    }
}
