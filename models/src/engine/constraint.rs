//! Constrained decoding: output that must match a JSON Schema, a regular
//! expression or a Lark grammar, enforced token by token.
//!
//! The grammars are compiled and run by [llguidance](https://github.com/guidance-ai/llguidance)
//! (the engine behind llama.cpp's and mistral.rs's structured output), over a
//! token trie of the model's own vocabulary. Each step, the set of tokens
//! that keep the output inside the grammar (the *mask*) is computed, and
//! every other token's logit is set to −∞ before sampling; an
//! end-of-generation token is allowed only where the grammar can end.
//!
//! A mask depends on the last token sampled, so it cannot be known before
//! the step that produced it; but it can be computed *while the next forward
//! pass runs*: right after a token is taken, its sequence's next mask is
//! handed to a small pool of mask threads, and the sampler collects it once
//! the logits are there. Masks take tens of microseconds; one that is not
//! ready when the step ends does not hold the batch: its sequence keeps its
//! logits aside and samples at a later step, while the others go on. A
//! grammar's worst case is bounded by llguidance's fuel limits, and
//! compiling one (which may take longer) happens on the caller's thread,
//! never in the batch.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::chat::tools::{self, ToolSet, ToolSyntax};
use crate::tokenizer::{TokenKind, Tokenizer};

use super::EngineError;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// JSON valid against this JSON Schema (the subset OpenAI's strict mode
    /// accepts, and more).
    JsonSchema(Value),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Text in this grammar, in llguidance's Lark dialect
    /// (<https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md>).
    Lark(String),
    /// Tool calls as the tools' choice allows, written in the model's
    /// syntax (see [`tools::grammar`]).
    ToolCalls(ToolSet, ToolSyntax),
}

/// The largest grammar source accepted, in bytes (a schema, a regex or a
/// Lark text): bounded like every input, whatever llguidance's own limits.
pub const MAX_CONSTRAINT_BYTES: usize = 256 << 10;

/// A model's vocabulary as llguidance sees it, and the compiler of
/// constraints over it. Built once per model, on first use.
pub struct ConstraintCompiler {
    factory: ParserFactory,
    /// The grammar's one end token.
    eos: u32,
    /// The end-of-generation tokens the grammar's one end token stands for.
    end_tokens: Arc<[u32]>,
    /// The control tokens, by text (a tool syntax's opener may be one).
    controls: std::collections::HashMap<String, u32>,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler")
            .field("end_tokens", &self.end_tokens)
            .finish_non_exhaustive()
    }
}

/// `tokenizer` as an llguidance tokenizer environment.
struct VocabEnv {
    trie: TokTrie,
    tokenizer: Option<Arc<Tokenizer>>,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match &self.tokenizer {
            // Grammars' literal strings are UTF-8; anything else is spelled
            // token by token by llguidance's fallback.
            Some(tokenizer) => match std::str::from_utf8(s) {
                Ok(text) => tokenizer.encode(text, false),
                Err(_) => self.trie.greedy_tokenize(s),
            },
            None => self.trie.greedy_tokenize(s),
        }
    }
}

impl ConstraintCompiler {
    /// The compiler for `tokenizer`'s vocabulary.
    pub fn new(tokenizer: &Arc<Tokenizer>) -> Result<Self, EngineError> {
        let vocab = tokenizer.vocab();
        let end_tokens: Arc<[u32]> = vocab.end_of_generation().into();
        let Some(&eos) = vocab.eos().as_ref().or(end_tokens.first()) else {
            return Err(EngineError::InvalidInput(
                "this model has no end-of-generation token, so constrained output could never end"
                    .into(),
            ));
        };
        let mut controls = std::collections::HashMap::new();
        let words: Vec<Vec<u8>> = (0..vocab.len() as u32)
            .map(|id| match vocab.kind(id) {
                Some(TokenKind::Control | TokenKind::Unknown | TokenKind::Unused) => {
                    // Special tokens are marked so no text can spell them.
                    let mut word = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    let text = vocab.text(id).unwrap_or_default();
                    word.extend_from_slice(text.as_bytes());
                    controls.insert(text.to_string(), id);
                    word
                }
                _ => tokenizer.token_bytes(id),
            })
            .collect();
        let mut compiler = Self::from_words(words, eos, end_tokens, Some(tokenizer.clone()))?;
        compiler.controls = controls;
        Ok(compiler)
    }

    /// The compiler for a vocabulary of the 256 byte values, ids 0..=255,
    /// plus an end token, id 256 (the test engine's).
    pub fn for_bytes() -> &'static ConstraintCompiler {
        static BYTES: OnceLock<ConstraintCompiler> = OnceLock::new();
        BYTES.get_or_init(|| {
            let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
            words.push(vec![TokTrie::SPECIAL_TOKEN_MARKER, b'$']);
            Self::from_words(words, 256, vec![256].into(), None)
                .expect("the byte vocabulary compiles")
        })
    }

    fn from_words(
        words: Vec<Vec<u8>>,
        eos: u32,
        end_tokens: Arc<[u32]>,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Result<Self, EngineError> {
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(VocabEnv { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| {
            EngineError::InvalidInput(format!("cannot prepare constrained decoding: {e}"))
        })?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(ConstraintCompiler {
            factory,
            eos,
            end_tokens,
            controls: Default::default(),
        })
    }

    /// Compiles `spec` for one generation; a bad or too complex grammar is
    /// an [`EngineError::InvalidInput`] that names the problem.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, EngineError> {
        let (grammar, size) = match spec {
            ConstraintSpec::JsonObject => (
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"}))),
                0,
            ),
            ConstraintSpec::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(EngineError::InvalidInput(
                        "the JSON schema must be an object".into(),
                    ));
                }
                let size = schema.to_string().len();
                (
                    TopLevelGrammar::from_json_schema(compact(schema.clone())),
                    size,
                )
            }
            ConstraintSpec::Regex(regex) => (TopLevelGrammar::from_regex(regex), regex.len()),
            ConstraintSpec::Lark(lark) => (TopLevelGrammar::from_lark(lark.clone()), lark.len()),
            ConstraintSpec::ToolCalls(set, syntax) => {
                let lark = tools::grammar(set, *syntax, &|text| self.controls.get(text).copied());
                let size = lark.len();
                (TopLevelGrammar::from_lark(lark), size)
            }
        };
        if size > MAX_CONSTRAINT_BYTES {
            return Err(EngineError::InvalidInput(format!(
                "the {} is {size} bytes; at most {MAX_CONSTRAINT_BYTES} are accepted",
                spec.kind()
            )));
        }
        let matcher = Matcher::new(self.factory.create_parser(grammar));
        if let Some(error) = matcher.get_error() {
            // llguidance converts no GBNF (its converter is a Python script).
            if let ConstraintSpec::Lark(text) = spec
                && text.contains("::=")
            {
                return Err(EngineError::InvalidInput(
                    "the grammar looks like GBNF (llama.cpp's format), which is not accepted: \
                     write it in Lark (llguidance's dialect; llguidance's gbnf_to_lark.py converts \
                     most GBNF grammars)"
                        .into(),
                ));
            }
            return Err(EngineError::InvalidInput(format!(
                "invalid {}: {}",
                spec.kind(),
                first_lines(&error)
            )));
        }
        Ok(Constraint::new(matcher, self.end_tokens.clone(), self.eos))
    }
}

impl ConstraintSpec {
    fn kind(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonObject | ConstraintSpec::JsonSchema(_) => "JSON schema",
            ConstraintSpec::Regex(_) => "regular expression",
            ConstraintSpec::Lark(_) => "grammar",
            ConstraintSpec::ToolCalls(..) => "tools' parameter schemas",
        }
    }
}

/// llguidance's limits, tightened where a tenant's grammar could make the
/// whole batch wait: a mask may cost at most a few milliseconds.
fn limits() -> ParserLimits {
    ParserLimits {
        step_lexer_fuel: 100_000,
        step_max_items: 20_000,
        max_grammar_size: 200_000,
        verbose_errors: false,
        ..ParserLimits::default()
    }
}

/// The schema with compact JSON output (`", "` and `": "` between items,
/// no other whitespace) unless it asks for its own layout: flexible
/// whitespace lets a small model pad forever.
fn compact(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// The start of llguidance's (sometimes long) error message.
fn first_lines(error: &str) -> String {
    let lines: Vec<&str> = (error.lines())
        .filter(|l| !l.trim().is_empty() && l.trim() != "<non-verbose/>")
        .take(3)
        .collect();
    let text = lines.join(" ");
    match text.char_indices().nth(400) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// A matcher back from a mask thread, with the mask it computed.
type Computed = (Box<Matcher>, Result<SimpleVob, String>);

/// One generation's compiled constraint: which tokens may come next.
pub struct Constraint {
    state: Option<Box<Matcher>>,
    /// The next mask, computing on a mask thread.
    pending: Option<mpsc::Receiver<Computed>>,
    /// A mask received by [`Constraint::is_ready`], not used yet.
    received: Option<Computed>,
    end_tokens: Arc<[u32]>,
    /// The grammar's end token (in the trie).
    eos: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    fn new(matcher: Matcher, end_tokens: Arc<[u32]>, eos: u32) -> Self {
        let mut constraint = Constraint {
            state: Some(Box::new(matcher)),
            pending: None,
            received: None,
            end_tokens,
            eos,
        };
        // The first mask computes while the prompt is read.
        constraint.prefetch();
        constraint
    }

    /// Starts computing the next mask on a mask thread.
    fn prefetch(&mut self) {
        let Some(mut matcher) = self.state.take() else {
            return;
        };
        let (sender, receiver) = mpsc::channel();
        mask_pool().run(Box::new(move || {
            let mask = matcher
                .compute_mask()
                .map_err(|e| first_lines(&e.to_string()));
            let _ = sender.send((matcher, mask));
        }));
        self.pending = Some(receiver);
    }

    /// Whether [`Constraint::mask`] would return without waiting for a
    /// mask thread.
    pub(crate) fn is_ready(&mut self) -> bool {
        let Some(pending) = &self.pending else {
            return true;
        };
        match pending.try_recv() {
            Ok(computed) => {
                self.received = Some(computed);
                self.pending = None;
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            // `mask` reports the lost thread.
            Err(mpsc::TryRecvError::Disconnected) => true,
        }
    }

    /// Writes `logits` into `out` with every logit the grammar forbids next
    /// set to −∞ (waiting for the mask if it is still computing). An error
    /// means the grammar cannot go on: the generation must end.
    pub(crate) fn mask(&mut self, logits: &[f32], out: &mut Vec<f32>) -> Result<(), String> {
        let mask = match self.pending.take() {
            _ if self.received.is_some() => {
                let (matcher, mask) = self.received.take().ok_or("no mask")?;
                self.state = Some(matcher);
                mask?
            }
            Some(pending) => {
                let (matcher, mask) = pending
                    .recv()
                    .map_err(|_| "the mask thread stopped".to_string())?;
                self.state = Some(matcher);
                mask?
            }
            None => {
                let matcher = self.state.as_mut().ok_or("the constraint has ended")?;
                matcher
                    .compute_mask()
                    .map_err(|e| first_lines(&e.to_string()))?
            }
        };
        // Start from "nothing allowed" and copy the allowed logits: masks
        // are sparse more often than not.
        out.clear();
        out.resize(logits.len(), f32::NEG_INFINITY);
        let vocab = logits.len();
        mask.iter_set_entries(|id| {
            if id < vocab {
                out[id] = logits[id];
            }
        });
        // The grammar has one end token; the model may have several.
        let end_allowed = mask.is_allowed(self.eos);
        for &end in self.end_tokens.iter() {
            if let Some(&logit) = logits.get(end as usize) {
                out[end as usize] = if end_allowed {
                    logit
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        Ok(())
    }

    /// Takes `token` (one the mask allowed); true if the output is complete
    /// (nothing may follow). Starts computing the next mask.
    pub(crate) fn advance(&mut self, token: u32) -> Result<bool, String> {
        let matcher = self.state.as_mut().ok_or("the constraint has ended")?;
        let token = if self.end_tokens.contains(&token) {
            self.eos
        } else {
            token
        };
        (matcher.consume_token(token)).map_err(|e| first_lines(&e.to_string()))?;
        if matcher.is_stopped() {
            return Ok(true);
        }
        self.prefetch();
        Ok(false)
    }
}

/// The threads that compute masks, beside the forward pass.
struct MaskPool {
    jobs: Mutex<mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl MaskPool {
    fn run(&self, job: Box<dyn FnOnce() + Send>) {
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job);
        if let Err(mpsc::SendError(job)) = sent {
            job();
        }
    }
}

/// The process's mask threads: two (masks are short; more would only take
/// cores from the forward pass).
fn mask_pool() -> &'static MaskPool {
    static POOL: OnceLock<MaskPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..2 {
            let receiver = receiver.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("realm-mask-{i}"))
                .spawn(move || {
                    loop {
                        let job = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            // Without threads, masks compute on the caller's (see `run`).
            if spawned.is_err() {
                break;
            }
        }
        MaskPool {
            jobs: Mutex::new(sender),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::tools::{Tool, ToolChoice};

    fn compile(spec: ConstraintSpec) -> Result<Constraint, String> {
        ConstraintCompiler::for_bytes()
            .compile(&spec)
            .map_err(|e| e.to_string())
    }

    /// Feeds `text` byte by byte; whether every byte was allowed, and
    /// whether the grammar may end after it.
    fn accepts(constraint: &mut Constraint, text: &str) -> (bool, bool) {
        let mut logits = Vec::new();
        for &b in text.as_bytes() {
            constraint.mask(&[0f32; 257], &mut logits).unwrap();
            if logits[b as usize] == f32::NEG_INFINITY {
                return (false, false);
            }
            if constraint.advance(u32::from(b)).unwrap() {
                return (true, true);
            }
        }
        constraint.mask(&[0f32; 257], &mut logits).unwrap();
        (true, logits[256] != f32::NEG_INFINITY)
    }

    #[test]
    fn a_schema_allows_exactly_its_documents() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 5}},
            "required": ["n"],
            "additionalProperties": false
        });
        let spec = ConstraintSpec::JsonSchema(schema);
        assert_eq!(
            accepts(&mut compile(spec.clone()).unwrap(), r#"{"n": 3}"#),
            (true, true)
        );
        assert!(!accepts(&mut compile(spec.clone()).unwrap(), r#"{"n": 7}"#).0);
        assert!(!accepts(&mut compile(spec.clone()).unwrap(), r#"{"m": 3}"#).0);
        // Compact layout: no whitespace beyond ", " and ": ".
        assert!(!accepts(&mut compile(spec.clone()).unwrap(), r#"{ "n": 3}"#).0);
        assert_eq!(
            accepts(&mut compile(spec).unwrap(), r#"{"n": 3"#),
            (true, false)
        );
        let mut any = compile(ConstraintSpec::JsonObject).unwrap();
        assert_eq!(accepts(&mut any, r#"{"a": [1, "x", null]}"#), (true, true));
        assert!(!accepts(&mut compile(ConstraintSpec::JsonObject).unwrap(), "[1]").0);
    }

    #[test]
    fn regexes_and_grammars_are_whole_matches() {
        let date = ConstraintSpec::Regex("[0-9]{4}-[0-9]{2}".into());
        assert_eq!(
            accepts(&mut compile(date.clone()).unwrap(), "2024-05"),
            (true, true)
        );
        assert_eq!(
            accepts(&mut compile(date.clone()).unwrap(), "2024"),
            (true, false)
        );
        assert!(!accepts(&mut compile(date).unwrap(), "24-05").0);
        let lark = ConstraintSpec::Lark("start: \"yes\" | \"no\"".into());
        assert_eq!(
            accepts(&mut compile(lark.clone()).unwrap(), "no"),
            (true, true)
        );
        assert!(!accepts(&mut compile(lark).unwrap(), "maybe").0);
    }

    #[test]
    fn bad_constraints_are_refused_naming_the_problem() {
        let err = compile(ConstraintSpec::JsonSchema(
            serde_json::json!({"type": "nonsense"}),
        ))
        .unwrap_err();
        assert!(
            err.contains("invalid JSON schema") && err.contains("nonsense"),
            "{err}"
        );
        let err = compile(ConstraintSpec::JsonSchema(serde_json::json!([1]))).unwrap_err();
        assert!(err.contains("must be an object"), "{err}");
        let err = compile(ConstraintSpec::Regex("(unclosed".into())).unwrap_err();
        assert!(err.starts_with("invalid regular expression"), "{err}");
        let err = compile(ConstraintSpec::Lark("start: undefined_rule".into())).unwrap_err();
        assert!(err.starts_with("invalid grammar"), "{err}");
        let gbnf = "root ::= \"yes\" | \"no\"";
        let err = compile(ConstraintSpec::Lark(gbnf.into())).unwrap_err();
        assert!(err.contains("looks like GBNF"), "{err}");
        let huge = ConstraintSpec::Regex("a".repeat(MAX_CONSTRAINT_BYTES + 1));
        assert!(compile(huge).unwrap_err().contains("at most"));
    }

    fn tools(choice: ToolChoice, parallel: bool) -> ToolSet {
        let weather = Tool {
            name: "get_weather".into(),
            description: None,
            parameters: serde_json::json!({
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city", "days"],
                "additionalProperties": false,
            }),
        };
        let time = Tool {
            name: "get_time".into(),
            description: None,
            parameters: Value::Null,
        };
        ToolSet::new(vec![weather, time], choice, parallel).unwrap()
    }

    const PARIS: &str = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>";
    const TIME: &str = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";

    #[test]
    fn required_tool_calls_are_forced_with_valid_arguments() {
        let spec = |choice, parallel| {
            compile(ConstraintSpec::ToolCalls(
                tools(choice, parallel),
                ToolSyntax::Hermes,
            ))
            .unwrap()
        };
        let mut c = spec(ToolChoice::Required, true);
        assert_eq!(accepts(&mut c, PARIS), (true, true));
        let mut c = spec(ToolChoice::Required, true);
        assert_eq!(accepts(&mut c, &format!("{PARIS}\n{TIME}")), (true, true));
        // No text, no missing or extra argument, no bound broken.
        for bad in [
            "Sure",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 0}}",
            "<tool_call>\n{\"name\": \"rm\"",
        ] {
            let mut c = spec(ToolChoice::Required, true);
            assert!(!accepts(&mut c, bad).1, "{bad}");
        }
        // Nothing is not a call.
        let mut c = spec(ToolChoice::Required, true);
        assert_eq!(accepts(&mut c, ""), (true, false));
        // One call only, when not parallel: the grammar ends after it.
        let ends = |c: &mut Constraint| {
            let mut logits = Vec::new();
            PARIS.bytes().position(|b| {
                c.mask(&[0f32; 257], &mut logits).unwrap();
                c.advance(u32::from(b)).unwrap()
            })
        };
        assert_eq!(
            ends(&mut spec(ToolChoice::Required, false)),
            Some(PARIS.len() - 1)
        );
        assert_eq!(ends(&mut spec(ToolChoice::Required, true)), None);
        // A named function only.
        let mut c = spec(ToolChoice::Function("get_time".into()), true);
        assert_eq!(accepts(&mut c, PARIS), (false, false));
        let mut c = spec(ToolChoice::Function("get_time".into()), true);
        assert_eq!(accepts(&mut c, TIME), (true, true));
    }

    #[test]
    fn auto_tool_calls_allow_text_but_force_the_calls_they_open() {
        let spec = || {
            compile(ConstraintSpec::ToolCalls(
                tools(ToolChoice::Auto, true),
                ToolSyntax::Generic,
            ))
            .unwrap()
        };
        assert_eq!(accepts(&mut spec(), "It is sunny < 3 {x}."), (true, true));
        assert_eq!(
            accepts(&mut spec(), &format!("Let me look.\n{PARIS}")),
            (true, true)
        );
        assert_eq!(
            accepts(&mut spec(), &format!("{PARIS}\n{TIME} done")),
            (true, true)
        );
        let broken = "ok <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": 3";
        assert_eq!(accepts(&mut spec(), broken), (false, false));
        // Whole-reply syntaxes: text, or one forced call.
        let llama = |text: &str| {
            let mut c = compile(ConstraintSpec::ToolCalls(
                tools(ToolChoice::Auto, true),
                ToolSyntax::Llama3,
            ))
            .unwrap();
            accepts(&mut c, text)
        };
        assert_eq!(llama("Hello"), (true, true));
        assert_eq!(
            llama("{\"name\": \"get_time\", \"parameters\": {}}"),
            (true, true)
        );
        assert_eq!(
            llama("{\"name\": \"get_time\", \"arguments\""),
            (false, false)
        );
        let mistral = |choice, text: &str| {
            let mut c = compile(ConstraintSpec::ToolCalls(
                tools(choice, true),
                ToolSyntax::Mistral,
            ))
            .unwrap();
            accepts(&mut c, text)
        };
        let call = "[TOOL_CALLS][{\"name\": \"get_time\", \"arguments\": {}}]";
        assert_eq!(mistral(ToolChoice::Required, call), (true, true));
        assert_eq!(mistral(ToolChoice::Auto, call), (true, true));
        assert_eq!(mistral(ToolChoice::Auto, "Fine."), (true, true));
        assert_eq!(mistral(ToolChoice::Required, "Fine."), (false, false));
    }

    /// A mask still computing is not ready; once it comes, `mask` uses it
    /// without waiting (what lets the batcher park a sequence, not stall).
    #[test]
    fn a_mask_is_ready_only_once_computed() {
        let mut c = compile(ConstraintSpec::Regex("[0-9]{2}".into())).unwrap();
        // Hold the mask thread's answer back, as a slow grammar would.
        let (sender, receiver) = mpsc::channel();
        let computed = c.pending.take().unwrap().recv().unwrap();
        c.pending = Some(receiver);
        assert!(!c.is_ready());
        assert!(!c.is_ready());
        sender.send(computed).unwrap();
        assert!(c.is_ready());
        assert!(c.pending.is_none() && c.received.is_some());
        let mut out = Vec::new();
        c.mask(&[0f32; 257], &mut out).unwrap();
        assert!(out[b'7' as usize] == 0.0 && out[b'a' as usize] == f32::NEG_INFINITY);
        assert!(c.received.is_none());
    }
}
