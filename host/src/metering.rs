//! Charging generations to whoever runs them.
//!
//! Direct requests, pipeline model steps and guests' `llm` calls all start
//! generations on shared models. Each goes through one [`Meter`]: it admits
//! the generation (stream slots, rates, quota — the server's tenant limits)
//! and settles what it really used. Code that runs outside the server (the
//! `run` command) has no meter and is not limited.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use realm_models::engine::{Engine, OnEnd, Pending, Request};

/// A limit refused a generation; the message says which and for how long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A [`Meter`]'s decision, once it is made (a fleet asks Redis).
pub type Admission<'a> =
    Pin<Box<dyn Future<Output = Result<Box<dyn Charge>, Refused>> + Send + 'a>>;

/// Admits and charges the generations of one tenant.
pub trait Meter: Send + Sync + std::fmt::Debug {
    /// Admits a generation on `model` (the name it was asked for by,
    /// `MODEL` or `MODEL:ADAPTER`) that may use up to `most_tokens` (prompt
    /// and new tokens together), or refuses it.
    fn admit<'a>(&'a self, model: &'a str, most_tokens: u64) -> Admission<'a>;
}

/// An admitted generation's hold on its tenant's limits.
pub trait Charge: Send {
    /// The generation ended having used these tokens; releases the hold.
    fn settle(self: Box<Self>, prompt_tokens: u64, completion_tokens: u64);
}

/// A shared meter, or none (unlimited).
pub type SharedMeter = Option<Arc<dyn Meter>>;

/// Admits work on `model` with `meter` if there is one: `Ok(None)`
/// without a meter.
pub async fn admit(
    meter: &SharedMeter,
    model: &str,
    most_tokens: u64,
) -> Result<Option<Box<dyn Charge>>, Refused> {
    match meter {
        Some(meter) => meter.admit(model, most_tokens).await.map(Some),
        None => Ok(None),
    }
}

/// The most tokens a generation of `max_tokens` after `prompt_tokens` can
/// use in a context of `context` tokens.
pub fn most_tokens(prompt_tokens: usize, max_tokens: usize, context: usize) -> u64 {
    (prompt_tokens + max_tokens.min(context.saturating_sub(prompt_tokens))) as u64
}

/// Admits `request` with `meter` (if any), then submits it to `model`
/// (asked for as `name`) with `on_end`; the charge is settled with what the
/// generation used when it ends (a failed one is charged its prompt), even
/// if nobody awaits it.
pub async fn submit(
    meter: &SharedMeter,
    name: &str,
    model: &dyn Engine,
    request: Request,
    mut on_end: Option<OnEnd>,
) -> Result<Pending, Refused> {
    let prompt = request.prompt.len();
    let context = model.info().context_length;
    let most = most_tokens(prompt, request.params.max_tokens, context);
    if let Some(charge) = admit(meter, name, most).await? {
        let inner = on_end.take();
        on_end = Some(Box::new(move |result| {
            let generated = result.as_ref().map_or(0, |c| c.completion_tokens);
            charge.settle(prompt as u64, generated as u64);
            if let Some(inner) = inner {
                inner(result);
            }
        }));
    }
    Ok(model.submit(request, on_end))
}
