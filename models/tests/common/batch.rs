//! Generations submitted to a loaded model's batcher, and awaited.

use std::sync::mpsc;
use std::time::Duration;

use realm_models::engine::{
    Completion, Engine, GenerateParams, LoadedModel, OnEnd, Pending, Request, SamplingParams,
};

/// Greedy decoding of up to `max_tokens`.
pub fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop: Vec::new(),
    }
}

/// Where a generation's end is reported.
pub type Done = mpsc::Receiver<Result<Completion, String>>;

/// Submits `request` to `model`'s batcher; its end arrives on the `Done`.
pub fn submit(model: &LoadedModel, request: Request) -> (Pending, Done) {
    let (tx, rx) = mpsc::channel();
    let on_end: OnEnd = Box::new(move |r| {
        let _ = tx.send(match r {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(e.to_string()),
        });
    });
    (model.submit(request, Some(on_end)), rx)
}

/// The generation's completion; it must end, and succeed, within 10 minutes.
pub fn wait(done: &Done) -> Completion {
    done.recv_timeout(Duration::from_secs(600))
        .expect("the generation ends")
        .expect("the generation succeeds")
}
