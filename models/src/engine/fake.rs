//! A scripted [`Engine`] for testing what is built on engines (the host's
//! server, pipelines, guest calls) without model files, in milliseconds, with
//! answers a test can predict.
//!
//! It keeps the contract a caller can observe of the real engine: requests
//! are checked the same way, pieces stream in order through the request's
//! sink (a full sink pauses the generation, a closed one cancels it), a set
//! `cancel` flag or a dropped [`Pending`] stops it at the next token, and
//! `on_end` runs exactly once. It does not batch or share slots fairly: each
//! generation runs on its own thread.
//!
//! - Tokens are bytes: the vocabulary has 256 ids and no BOS.
//! - A chat renders as `role: content` lines, then `assistant: `.
//! - A generation's text is the [`Reply`] to its prompt's text (by default
//!   `echo: ` and the prompt), cut before the first stop string, one token
//!   per character, ending with [`FinishReason::Length`] at `max_tokens` or
//!   the context's end. Sampling settings do not change it.
//! - A constrained generation is really constrained (llguidance over the
//!   byte vocabulary): byte by byte it takes the end where the grammar
//!   allows it, else the reply's next byte the grammar allows (skipping
//!   those it does not), else a closing `"`, `}` or `]`, else the lowest
//!   byte allowed; so it always matches the constraint.
//! - A decoder's logits favour the byte after the last token fed.
//! - An embedding counts the text's bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::arch::LoraAdapter;
use crate::chat::ChatMessage;
use crate::chat::tools::{Tool, ToolSyntax, generic_messages};

use super::{
    Completer, Completion, Constraint, ConstraintCompiler, ConstraintSpec, Decoder, Engine,
    EngineError, EngineInfo, FinishReason, Offer, Prompter, Request, TextSink,
};

/// The text a [`FakeEngine`] generates for a prompt's text.
pub type Reply = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// Byte tokens: one id per byte value.
const VOCAB: usize = 256;
/// How long a paused generation waits before offering a piece again.
const RETRY: Duration = Duration::from_millis(1);

/// A scripted engine; see the [module docs](self).
pub struct FakeEngine {
    info: EngineInfo,
    reply: Reply,
    token_delay: Duration,
    counts: Arc<Counts>,
    device_bytes: u64,
}

/// What a [`FakeEngine`] has done, for tests to assert on.
#[derive(Default)]
struct Counts {
    started: AtomicUsize,
    running: AtomicUsize,
    cancelled: AtomicUsize,
}

impl std::fmt::Debug for FakeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeEngine")
            .field("info", &self.info)
            .field("token_delay", &self.token_delay)
            .finish_non_exhaustive()
    }
}

impl Default for FakeEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeEngine {
    /// An engine with a context of 2048 tokens that echoes prompts at once.
    pub fn new() -> Self {
        FakeEngine {
            info: EngineInfo {
                architecture: "fake".into(),
                context_length: 2048,
                vocab_size: VOCAB,
                embedding_length: VOCAB,
                weight_bytes: 0,
            },
            reply: Arc::new(|prompt| format!("echo: {prompt}")),
            token_delay: Duration::ZERO,
            counts: Arc::default(),
            device_bytes: 0,
        }
    }

    /// The same engine, generating `reply(prompt)` for each prompt.
    pub fn with_reply(mut self, reply: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.reply = Arc::new(reply);
        self
    }

    /// The same engine, taking `delay` per generated token (so a test can
    /// cancel or disconnect mid-generation).
    pub fn with_token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// The same engine, saying its weights take `bytes` on a GPU.
    pub fn with_device_bytes(mut self, bytes: u64) -> Self {
        self.device_bytes = bytes;
        self
    }

    /// The same engine, with a context of `tokens` (at least 2).
    pub fn with_context(mut self, tokens: usize) -> Self {
        self.info.context_length = tokens.max(2);
        self
    }

    /// Generations started so far (refused requests not counted).
    pub fn started(&self) -> usize {
        self.counts.started.load(Ordering::SeqCst)
    }

    /// Generations running now.
    pub fn running(&self) -> usize {
        self.counts.running.load(Ordering::SeqCst)
    }

    /// Generations that ended cancelled.
    pub fn cancelled(&self) -> usize {
        self.counts.cancelled.load(Ordering::SeqCst)
    }

    /// Refuses a prompt the real engine would refuse.
    fn check(&self, prompt: &[u32]) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidInput("the prompt is empty".into()));
        }
        if prompt.len() >= self.info.context_length {
            return Err(EngineError::InvalidInput(format!(
                "the prompt has {} tokens; the model's context holds {}",
                prompt.len(),
                self.info.context_length
            )));
        }
        match prompt.iter().find(|&&t| t as usize >= VOCAB) {
            Some(bad) => Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary"
            ))),
            None => Ok(()),
        }
    }
}

/// The fake's constrained text: `reply` as far as `constraint` allows, then
/// the shortest way out it finds (see the module docs); at most `limit` bytes.
fn constrained(
    mut constraint: Constraint,
    reply: &str,
    limit: usize,
) -> Result<(String, FinishReason), EngineError> {
    const END: usize = 256;
    let want = reply.as_bytes();
    let mut at = 0;
    let mut out = Vec::new();
    let mut logits = Vec::new();
    while out.len() < limit {
        let mut scores = vec![1f32; END + 1];
        for close in [b'"', b'}', b']'] {
            scores[close as usize] = 2.0;
        }
        constraint
            .mask(&scores, &mut logits)
            .map_err(EngineError::ConstraintFailed)?;
        let token = if logits[END] > f32::NEG_INFINITY {
            END
        } else if let Some(skip) =
            (want[at..].iter()).position(|&b| logits[b as usize] > f32::NEG_INFINITY)
        {
            at += skip + 1;
            want[at - 1] as usize
        } else {
            let (token, best) =
                (logits.iter().enumerate()).fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                    if l > best.1 { (i, l) } else { best }
                });
            if best == f32::NEG_INFINITY {
                return Err(EngineError::ConstraintFailed(
                    "the grammar allows no byte here".into(),
                ));
            }
            token
        };
        if token == END {
            return Ok((
                String::from_utf8_lossy(&out).into_owned(),
                FinishReason::Stop,
            ));
        }
        out.push(token as u8);
        if constraint
            .advance(token as u32)
            .map_err(EngineError::ConstraintFailed)?
        {
            return Ok((
                String::from_utf8_lossy(&out).into_owned(),
                FinishReason::Stop,
            ));
        }
    }
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        FinishReason::Length,
    ))
}

fn text_of(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Prompter for FakeEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn max_prompt_bytes(&self) -> usize {
        self.info.context_length
    }

    fn prompt_tokens(&self, prompt: &str) -> Vec<u32> {
        self.tokenize(prompt)
    }

    fn tokenize(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn detokenize(&self, tokens: &[u32]) -> Result<String, EngineError> {
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= VOCAB) {
            return Err(EngineError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {VOCAB}"
            )));
        }
        Ok(text_of(tokens))
    }

    /// `role: content` lines, with tools in the generic syntax.
    fn chat_tokens(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
    ) -> Result<Vec<u32>, EngineError> {
        let mut text = String::new();
        for m in generic_messages(messages, tools, true) {
            text.push_str(&format!("{}: {}\n", m.role, m.content));
        }
        text.push_str("assistant: ");
        Ok(self.tokenize(&text))
    }

    fn tool_syntax(&self) -> ToolSyntax {
        ToolSyntax::Generic
    }

    fn constrain(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
        ConstraintCompiler::for_bytes().compile(spec)
    }
}

impl Engine for FakeEngine {
    fn embed(&self, text: &str) -> Result<Vec<f32>, EngineError> {
        if text.is_empty() {
            return Err(EngineError::InvalidInput("cannot embed empty text".into()));
        }
        let mut counts = vec![0f32; VOCAB];
        text.bytes().for_each(|b| counts[b as usize] += 1.0);
        let norm = counts.iter().map(|v| v * v).sum::<f32>().sqrt();
        counts.iter_mut().for_each(|v| *v /= norm);
        Ok(counts)
    }

    fn start(&self, request: Request, done: Completer) {
        let Request {
            prompt,
            params,
            sink,
            constraint,
            adapter,
            cancel,
            ..
        } = request;
        if adapter.is_some() {
            let e = EngineError::InvalidInput("the test engine runs no LoRA adapters".into());
            done.complete(Err(e));
            return;
        }
        if let Err(e) = self.check(&prompt) {
            done.complete(Err(e));
            return;
        }
        let mut text = (self.reply)(&text_of(&prompt));
        let mut finish = FinishReason::Stop;
        let room = self.info.context_length - prompt.len();
        let limit = params.max_tokens.min(room);
        if let Some(constraint) = constraint {
            match constrained(constraint, &text, limit) {
                Ok((within, ended)) => (text, finish) = (within, ended),
                Err(e) => {
                    done.complete(Err(e));
                    return;
                }
            }
        }
        if let Some(cut) = params.stop.iter().filter_map(|s| text.find(s)).min() {
            text.truncate(cut);
            finish = FinishReason::Stop;
        }
        if text.chars().count() > limit {
            text = text.chars().take(limit).collect();
            finish = FinishReason::Length;
        }
        let run = Run {
            prompt_tokens: prompt.len(),
            pieces: text.chars().map(String::from).collect(),
            finish,
            delay: self.token_delay,
            sink,
            cancel,
            counts: self.counts.clone(),
        };
        self.counts.started.fetch_add(1, Ordering::SeqCst);
        self.counts.running.fetch_add(1, Ordering::SeqCst);
        std::thread::spawn(move || run.go(done));
    }

    fn decoder(&self, adapter: Option<Arc<LoraAdapter>>) -> Result<Box<dyn Decoder>, EngineError> {
        if adapter.is_some() {
            return Err(EngineError::InvalidInput(
                "the test engine runs no LoRA adapters".into(),
            ));
        }
        Ok(Box::new(FakeDecoder { tokens: Vec::new() }))
    }

    fn device_bytes(&self) -> u64 {
        self.device_bytes
    }
}

/// One generation of a [`FakeEngine`], on its own thread.
struct Run {
    prompt_tokens: usize,
    pieces: Vec<String>,
    finish: FinishReason,
    delay: Duration,
    sink: Option<Box<dyn TextSink>>,
    cancel: Arc<AtomicBool>,
    counts: Arc<Counts>,
}

impl Run {
    fn go(mut self, completer: Completer) {
        let mut text = String::new();
        let mut generated = 0;
        let mut finish = self.finish;
        for piece in std::mem::take(&mut self.pieces) {
            if !self.delay.is_zero() {
                std::thread::sleep(self.delay);
            }
            if self.cancel.load(Ordering::Relaxed) || !self.deliver(&piece) {
                finish = FinishReason::Cancelled;
                break;
            }
            text.push_str(&piece);
            generated += 1;
        }
        if finish == FinishReason::Cancelled {
            self.counts.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        self.counts.running.fetch_sub(1, Ordering::SeqCst);
        completer.complete(Ok(Completion {
            text,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: 0,
            completion_tokens: generated,
            finish,
        }));
    }

    /// Hands `piece` to the sink, waiting while it is full; `false` when the
    /// reader is gone or the generation was cancelled meanwhile.
    fn deliver(&mut self, piece: &str) -> bool {
        let Some(sink) = &mut self.sink else {
            return true;
        };
        let mut piece = piece.to_string();
        loop {
            match sink.offer(piece) {
                Offer::Taken => return true,
                Offer::Closed => return false,
                Offer::Full(back) if !self.cancel.load(Ordering::Relaxed) => {
                    piece = back;
                    std::thread::sleep(RETRY);
                }
                Offer::Full(_) => return false,
            }
        }
    }
}

/// A [`FakeEngine`] decoding session.
struct FakeDecoder {
    tokens: Vec<u32>,
}

impl Decoder for FakeDecoder {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let Some(&last) = tokens.last() else {
            return Err(EngineError::InvalidInput("no tokens to decode".into()));
        };
        self.tokens.extend_from_slice(tokens);
        let mut logits = vec![0f32; VOCAB];
        logits[(last as usize + 1) % VOCAB] = 1.0;
        Ok(logits)
    }

    fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{GenerateOptions, OnEnd};

    /// Polls `f` to completion on this thread (the fake's work runs on its own).
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    fn params(max_tokens: u32, stop: &[&str]) -> crate::engine::GenerateParams {
        GenerateOptions {
            max_tokens: Some(max_tokens),
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .check()
        .unwrap()
    }

    #[test]
    fn replies_stop_and_run_out_of_tokens_like_the_engine() {
        let fake = FakeEngine::new();
        let prompt = fake.prompt_tokens("hi there");
        let done =
            block_on(fake.submit(Request::new(prompt.clone(), params(100, &[]), "t", 1), None));
        let done = done.unwrap();
        assert_eq!(done.text, "echo: hi there");
        assert_eq!((done.prompt_tokens, done.completion_tokens), (8, 14));
        assert_eq!(done.finish, FinishReason::Stop);

        let stopped = block_on(fake.submit(
            Request::new(prompt.clone(), params(100, &[" th"]), "t", 1),
            None,
        ));
        assert_eq!(stopped.unwrap().text, "echo: hi");
        let short =
            block_on(fake.submit(Request::new(prompt, params(3, &[]), "t", 1), None)).unwrap();
        assert_eq!(
            (short.text.as_str(), short.finish),
            ("ech", FinishReason::Length)
        );
        assert_eq!(fake.started(), 3);
    }

    #[test]
    fn bad_prompts_are_refused_and_hooks_run_once() {
        let fake = FakeEngine::new().with_context(4);
        let ran = Arc::new(AtomicUsize::new(0));
        let request = Request::new(vec![1, 2, 3, 4], params(1, &[]), "t", 1);
        let seen = ran.clone();
        let on_end: OnEnd = Box::new(move |r| {
            assert!(r.is_err());
            seen.fetch_add(1, Ordering::SeqCst);
        });
        let refused = block_on(fake.submit(request, Some(on_end)));
        assert!(matches!(refused, Err(EngineError::InvalidInput(_))));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert!(block_on(fake.submit(Request::new(vec![], params(1, &[]), "t", 1), None)).is_err());
        assert_eq!(fake.started(), 0);
    }

    #[test]
    fn constrained_generations_match_their_constraint() {
        let fake = FakeEngine::new().with_reply(|_| "the answer".into());
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
        });
        let spec = crate::engine::ConstraintSpec::JsonSchema(schema);
        let mut request = Request::new(fake.prompt_tokens("q"), params(200, &[]), "t", 1);
        request.constraint = Some(fake.constrain(&spec).unwrap());
        let done = block_on(fake.submit(request, None)).unwrap();
        assert_eq!(done.text, r#"{"answer": ""}"#);
        assert_eq!(done.finish, FinishReason::Stop);

        // Where the reply fits, it is kept.
        let fake = FakeEngine::new().with_reply(|_| "2024-05-01, I think".into());
        let spec = crate::engine::ConstraintSpec::Regex("[0-9]{4}-[0-9]{2}-[0-9]{2}".into());
        let mut request = Request::new(fake.prompt_tokens("q"), params(200, &[]), "t", 1);
        request.constraint = Some(fake.constrain(&spec).unwrap());
        assert_eq!(
            block_on(fake.submit(request, None)).unwrap().text,
            "2024-05-01"
        );
    }

    #[test]
    fn a_dropped_pending_cancels_its_generation() {
        let fake = FakeEngine::new()
            .with_reply(|_| "x".repeat(10_000))
            .with_token_delay(Duration::from_millis(5));
        let (tx, rx) = std::sync::mpsc::channel();
        let request = Request::new(fake.prompt_tokens("x"), params(1000, &[]), "t", 1);
        let on_end: OnEnd = Box::new(move |r| tx.send(r.as_ref().unwrap().finish).unwrap());
        drop(fake.submit(request, Some(on_end)));
        assert_eq!(rx.recv().unwrap(), FinishReason::Cancelled);
        assert_eq!((fake.cancelled(), fake.running()), (1, 0));
    }

    #[test]
    fn tokens_chats_decoders_and_embeddings_are_consistent() {
        let fake = FakeEngine::new();
        let ids = fake.tokenize("héllo");
        assert_eq!(fake.detokenize(&ids).unwrap(), "héllo");
        assert!(fake.detokenize(&[300]).is_err());
        let chat = fake
            .chat_tokens(&[ChatMessage::new("user", "hi")], &[])
            .unwrap();
        assert_eq!(fake.detokenize(&chat).unwrap(), "user: hi\nassistant: ");
        let mut d = fake.decoder(None).unwrap();
        let logits = d.forward(&[7, 8]).unwrap();
        assert_eq!(logits.iter().position(|&l| l == 1.0), Some(9));
        assert!(d.forward(&[]).is_err());
        let e = fake.embed("ab").unwrap();
        assert!((e.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(fake.embed("").is_err());
    }
}
