//! A generation asked of an [`Engine`](super::Engine), and its result to
//! await: the one shape every engine (the batcher, a test fake) accepts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Completion, Constraint, EngineError, GenerateParams, TextSink};
use crate::arch::LoraAdapter;

/// A generation for [`Engine::submit`](super::Engine::submit).
pub struct Request {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// What to generate (checked by [`GenerateOptions::check`](super::GenerateOptions::check)).
    pub params: GenerateParams,
    /// Who asks: batch slots are shared fairly between tenants.
    pub tenant: String,
    /// The tenant's share relative to others (at least 1).
    pub weight: u32,
    /// Streams the text as it is produced; `None` delivers it only with
    /// the completion.
    pub sink: Option<Box<dyn TextSink>>,
    /// What the output must match, compiled by the same model's
    /// [`Prompter::constrain`](super::Prompter::constrain).
    pub constraint: Option<Constraint>,
    /// The LoRA adapter the generation runs with, loaded for the same
    /// model ([`LoadedModel::load_adapter`](super::LoadedModel::load_adapter)).
    pub adapter: Option<Arc<LoraAdapter>>,
    /// Set to stop the generation at the next step.
    pub cancel: Arc<AtomicBool>,
}

/// Sees a generation's result when it ends.
pub type OnEnd = Box<dyn FnOnce(&Result<Completion, EngineError>) + Send>;

impl Request {
    /// A request for `tenant` with no sink or outside cancellation.
    pub fn new(prompt: Vec<u32>, params: GenerateParams, tenant: &str, weight: u32) -> Self {
        Request {
            prompt,
            params,
            tenant: tenant.to_string(),
            weight,
            sink: None,
            constraint: None,
            adapter: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// A submitted generation's result, to await. Dropping it before the
/// generation ends cancels the generation.
#[must_use = "dropping a pending generation cancels it"]
pub struct Pending {
    result: futures_channel::oneshot::Receiver<Result<Completion, EngineError>>,
    cancel: Arc<AtomicBool>,
    ended: bool,
}

/// The other end of a [`Pending`], held by whatever runs the generation.
/// Dropping it without completing ends the generation with
/// [`EngineError::Stopped`] (its `on_end` runs all the same).
pub struct Completer {
    sender: Option<futures_channel::oneshot::Sender<Result<Completion, EngineError>>>,
    on_end: Option<OnEnd>,
    after: Vec<Box<dyn FnOnce() + Send>>,
}

impl Completer {
    /// Ends the generation with `result`: runs the request's `on_end`, wakes
    /// whoever awaits the `Pending` (if anyone still does), then runs the
    /// [`after`](Self::after) hooks.
    pub fn complete(mut self, result: Result<Completion, EngineError>) {
        self.finish(result);
    }

    /// The same completer, running `hook` once the generation has ended:
    /// where whatever ran it lets go of what it held for it.
    pub fn after(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.after.push(Box::new(hook));
        self
    }

    fn finish(&mut self, result: Result<Completion, EngineError>) {
        if let Some(on_end) = self.on_end.take() {
            on_end(&result);
        }
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(result);
        }
        self.after.drain(..).for_each(|hook| hook());
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.finish(Err(EngineError::Stopped));
        }
    }
}

impl Pending {
    /// A pending generation that the returned [`Completer`] ends, running
    /// `on_end` first; `cancel` is set if the `Pending` is dropped before.
    pub fn new(cancel: Arc<AtomicBool>, on_end: Option<OnEnd>) -> (Completer, Pending) {
        let (sender, result) = futures_channel::oneshot::channel();
        let pending = Pending {
            result,
            cancel,
            ended: false,
        };
        let completer = Completer {
            sender: Some(sender),
            on_end,
            after: Vec::new(),
        };
        (completer, pending)
    }
}

impl std::future::Future for Pending {
    type Output = Result<Completion, EngineError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let polled = std::pin::Pin::new(&mut self.result).poll(cx);
        polled.map(|r| {
            self.ended = true;
            // The engine dropped the completer without an answer: it has stopped.
            r.unwrap_or(Err(EngineError::Stopped))
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.ended {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}
