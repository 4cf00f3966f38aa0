//! Guests built against `realm:inference@0.1.0` (wit/archive/realm-0.1.0.wit)
//! keep working: their imports are served by the current implementation,
//! their values converted. 0.2.0 changed records (`sampling` gained
//! `constraint`, `message` and `completion` gained tool calls, `chat` took
//! tools), so an old guest's imports cannot be satisfied by the new ones
//! directly; what 0.1.0 could express means the same in 0.2.0.

use wasmtime::component::Resource;

use super::bindings::v0_1::realm::inference::{
    kv as kv1, llm as llm1, log as log1, types as types1,
};
use super::bindings::{kv, llm, log, types};
use super::host_llm::{Session, TokenStream};
use super::state::GuestState;

fn error(e: types::Error) -> types1::Error {
    match e {
        types::Error::ModelNotFound(m) => types1::Error::ModelNotFound(m),
        types::Error::NotPermitted(m) => types1::Error::NotPermitted(m),
        types::Error::InvalidInput(m) => types1::Error::InvalidInput(m),
        types::Error::QuotaExceeded(m) => types1::Error::QuotaExceeded(m),
        types::Error::Cancelled => types1::Error::Cancelled,
        types::Error::Runtime(m) => types1::Error::Runtime(m),
    }
}

fn sampling(s: llm1::Sampling) -> llm::Sampling {
    llm::Sampling {
        max_tokens: s.max_tokens,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        seed: s.seed,
        stop: s.stop,
        constraint: None,
    }
}

fn usage(u: llm::Usage) -> llm1::Usage {
    llm1::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
    }
}

/// Without tools or constraints, a 0.1.0 call ends as 0.1.0 can say.
fn completion(c: llm::Completion) -> llm1::Completion {
    llm1::Completion {
        text: c.text,
        usage: usage(c.usage),
        finish: match c.finish {
            types::FinishReason::Stop | types::FinishReason::ToolCalls => {
                types1::FinishReason::Stop
            }
            types::FinishReason::Length => types1::FinishReason::Length,
            types::FinishReason::Cancelled => types1::FinishReason::Cancelled,
        },
    }
}

impl llm1::Host for GuestState {
    async fn list_models(&mut self) -> Vec<llm1::ModelInfo> {
        (llm::Host::list_models(self).await.into_iter())
            .map(|m| llm1::ModelInfo {
                name: m.name,
                architecture: m.architecture,
                context_length: m.context_length,
                vocab_size: m.vocab_size,
            })
            .collect()
    }

    async fn generate(
        &mut self,
        model: String,
        prompt: String,
        opts: llm1::Sampling,
    ) -> Result<llm1::Completion, types1::Error> {
        llm::Host::generate(self, model, prompt, sampling(opts))
            .await
            .map(completion)
            .map_err(error)
    }

    async fn chat(
        &mut self,
        model: String,
        messages: Vec<llm1::Message>,
        opts: llm1::Sampling,
    ) -> Result<llm1::Completion, types1::Error> {
        let messages = (messages.into_iter())
            .map(|m| llm::Message {
                role: m.role,
                content: m.content,
                tool_calls: Vec::new(),
                tool_call_id: None,
            })
            .collect();
        llm::Host::chat(self, model, messages, None, sampling(opts))
            .await
            .map(completion)
            .map_err(error)
    }

    async fn stream(
        &mut self,
        model: String,
        prompt: String,
        opts: llm1::Sampling,
    ) -> Result<Resource<TokenStream>, types1::Error> {
        llm::Host::stream(self, model, prompt, sampling(opts))
            .await
            .map_err(error)
    }

    async fn tokenize(&mut self, model: String, text: String) -> Result<Vec<u32>, types1::Error> {
        llm::Host::tokenize(self, model, text).await.map_err(error)
    }

    async fn detokenize(
        &mut self,
        model: String,
        tokens: Vec<u32>,
    ) -> Result<String, types1::Error> {
        llm::Host::detokenize(self, model, tokens)
            .await
            .map_err(error)
    }

    async fn embed(
        &mut self,
        model: String,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, types1::Error> {
        llm::Host::embed(self, model, texts).await.map_err(error)
    }

    async fn open_session(&mut self, model: String) -> Result<Resource<Session>, types1::Error> {
        llm::Host::open_session(self, model).await.map_err(error)
    }
}

impl llm1::HostTokenStream for GuestState {
    async fn next(
        &mut self,
        stream: Resource<TokenStream>,
    ) -> Option<Result<String, types1::Error>> {
        llm::HostTokenStream::next(self, stream)
            .await
            .map(|r| r.map_err(error))
    }

    async fn usage(&mut self, stream: Resource<TokenStream>) -> llm1::Usage {
        usage(llm::HostTokenStream::usage(self, stream).await)
    }

    async fn drop(&mut self, stream: Resource<TokenStream>) -> wasmtime::Result<()> {
        llm::HostTokenStream::drop(self, stream).await
    }
}

impl llm1::HostSession for GuestState {
    async fn feed(
        &mut self,
        session: Resource<Session>,
        tokens: Vec<u32>,
    ) -> Result<(), types1::Error> {
        llm::HostSession::feed(self, session, tokens)
            .await
            .map_err(error)
    }

    async fn logits(&mut self, session: Resource<Session>) -> Result<Vec<f32>, types1::Error> {
        llm::HostSession::logits(self, session).await.map_err(error)
    }

    async fn rewind(&mut self, session: Resource<Session>, len: u32) -> Result<(), types1::Error> {
        llm::HostSession::rewind(self, session, len)
            .await
            .map_err(error)
    }

    async fn len(&mut self, session: Resource<Session>) -> u32 {
        llm::HostSession::len(self, session).await
    }

    async fn drop(&mut self, session: Resource<Session>) -> wasmtime::Result<()> {
        llm::HostSession::drop(self, session).await
    }
}

impl kv1::Host for GuestState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, types1::Error> {
        kv::Host::get(self, key).await.map_err(error)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), types1::Error> {
        kv::Host::set(self, key, value).await.map_err(error)
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, types1::Error> {
        kv::Host::compare_and_swap(self, key, expected, new)
            .await
            .map_err(error)
    }

    async fn delete(&mut self, key: String) -> Result<bool, types1::Error> {
        kv::Host::delete(self, key).await.map_err(error)
    }

    async fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, types1::Error> {
        kv::Host::list_keys(self, prefix).await.map_err(error)
    }
}

impl log1::Host for GuestState {
    async fn log(&mut self, level: log1::Level, message: String) {
        let level = match level {
            log1::Level::Trace => log::Level::Trace,
            log1::Level::Debug => log::Level::Debug,
            log1::Level::Info => log::Level::Info,
            log1::Level::Warn => log::Level::Warn,
            log1::Level::Error => log::Level::Error,
        };
        log::Host::log(self, level, message).await
    }
}

impl types1::Host for GuestState {}
