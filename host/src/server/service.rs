//! The operations behind both the WebSocket and the HTTP API: generation
//! with streaming, pipelines, the tenant's component, model listing. Each
//! checks permissions and limits and records metrics.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use realm_models::chat::ChatMessage;
use realm_models::chat::tools::{ToolCall, ToolParser, ToolPiece, ToolSet};
use realm_models::engine::{
    Completion, Constraint, ConstraintSpec, Engine, EngineError, FinishReason, GenerateOptions,
    GenerateParams, Offer, OnEnd, Request, TextSink,
};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::pipeline::{Pipeline, PipelineError, Runner, StepError};
use crate::sandbox::{CallContext, LoadedComponent, ModelAccess, SandboxError};

use super::metrics::{TokenCounters, tokens_of};
use super::protocol::{ApiError, ErrorCode, ModelEntry, ResponseFormat, SamplingRequest, Usage};
use super::rate::{RateLimiter, Refusal, Reservation};
use super::state::{AppState, Runtime, TenantRuntime};
use crate::metering::{Admission, Charge, Meter, Refused};

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Input {
    /// A raw prompt.
    Prompt(String),
    /// Chat messages, formatted with the model's template.
    Chat(Vec<ChatMessage>),
}

/// A generation request, as both APIs describe it.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The model's `[models]` name, or `MODEL:ADAPTER`.
    pub model: String,
    /// The adapter to run, named apart from the model (the `adapter` field).
    pub adapter: Option<String>,
    /// The input.
    pub input: Input,
    /// Most new tokens.
    pub max_tokens: Option<u32>,
    /// Sampling settings.
    pub sampling: SamplingRequest,
    /// Stop strings.
    pub stop: Vec<String>,
    /// What the output must match.
    pub format: Option<ResponseFormat>,
    /// Functions the model may call (chats only).
    pub tools: Option<ToolSet>,
}

/// A generation checked against the tenant's models and the sampling rules,
/// ready to run once admitted.
pub struct CheckedGeneration {
    /// The served name (`MODEL` or `MODEL:ADAPTER`), for the metrics.
    served: String,
    model: Arc<dyn Engine>,
    input: Input,
    params: GenerateParams,
    constraint: Option<ConstraintSpec>,
    tools: Option<ToolSet>,
}

/// A generation admitted to run: its prompt tokenized, its stream slot and
/// tokens reserved (see [`AppState::admit_generation`]).
pub struct AdmittedGeneration {
    served: String,
    model: Arc<dyn Engine>,
    prompt: Vec<u32>,
    params: GenerateParams,
    constraint: Option<Constraint>,
    /// Reads the calls out of the reply, when tools are offered.
    tools: Option<ToolParser>,
    reservation: Reservation,
}

impl Generation {
    /// Checks the model and the sampling values: pure validation, done before
    /// the request is charged to the tenant's rates.
    pub fn check(
        self,
        runtime: &Runtime,
        tenant: &TenantRuntime,
    ) -> Result<CheckedGeneration, ApiError> {
        let named = (self.model.as_str(), self.adapter.as_deref());
        let (served, model) = permitted_model(runtime, tenant, named, Defaults::Apply)?;
        let params = self.params()?;
        let format = self.format.as_ref().and_then(ResponseFormat::constraint);
        // Offered tools are a constraint too: a call the model opens is
        // forced to be one of them, with valid arguments.
        let constraint = match (&self.tools, &self.input, format) {
            (None, _, format) => format,
            (Some(_), Input::Prompt(_), _) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    "tools need a chat: send `messages`, not a raw prompt",
                ));
            }
            (Some(_), _, Some(_)) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    "`response_format` and `tools` cannot be combined: give the call's arguments a schema instead",
                ));
            }
            (Some(tools), _, None) => Some(ConstraintSpec::ToolCalls(
                tools.clone(),
                model.tool_syntax(),
            )),
        };
        Ok(CheckedGeneration {
            served,
            model,
            input: self.input,
            params,
            constraint,
            tools: self.tools,
        })
    }
}

/// Counts a generation in `realm_queue_depth` until dropped, so a generation
/// whose request is aborted (its client hung up) is not counted forever.
struct Queued(prometheus::IntGauge);

impl Queued {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Queued(gauge.clone())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Forwards a generation's pieces to its request (if it streams) and times
/// them; with tools, splits the text into content and calls first. A full
/// channel pauses this generation only (the batcher offers again).
struct MeteredSink {
    pieces: Option<mpsc::Sender<ToolPiece>>,
    /// The reply split so far, when tools are offered.
    split: Option<Arc<std::sync::Mutex<Split>>>,
    /// Pieces split off but not yet taken by the channel.
    waiting: std::collections::VecDeque<ToolPiece>,
    started: Instant,
    last: Option<Instant>,
    ttft: prometheus::Histogram,
    latency: prometheus::Histogram,
    live: Arc<super::live::LiveStats>,
    tenant: String,
}

/// What happened to the pieces waiting in a [`MeteredSink`].
enum Flushed {
    All,
    Full,
    Closed,
}

impl MeteredSink {
    fn flush(&mut self) -> Flushed {
        let Some(tx) = &self.pieces else {
            self.waiting.clear();
            return Flushed::All;
        };
        while let Some(piece) = self.waiting.pop_front() {
            match tx.try_send(piece) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(piece)) => {
                    self.waiting.push_front(piece);
                    return Flushed::Full;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Flushed::Closed,
            }
        }
        Flushed::All
    }
}

impl TextSink for MeteredSink {
    fn offer(&mut self, piece: String) -> Offer {
        match self.flush() {
            Flushed::All => {}
            Flushed::Full => return Offer::Full(piece),
            Flushed::Closed => return Offer::Closed,
        }
        match &self.split {
            Some(split) => {
                let mut split = split.lock().unwrap_or_else(|e| e.into_inner());
                let pieces = split.parser.push(&piece);
                self.waiting.extend(split.record(pieces));
            }
            None => self.waiting.push_back(ToolPiece::Text(piece)),
        }
        match self.flush() {
            Flushed::All => {}
            // Taken into `waiting`: offered again empty, until it is sent.
            Flushed::Full => return Offer::Full(String::new()),
            Flushed::Closed => return Offer::Closed,
        }
        let now = Instant::now();
        match self.last {
            None => {
                let seconds = now.duration_since(self.started).as_secs_f64();
                self.ttft.observe(seconds);
                self.live.first_token(&self.tenant, seconds);
            }
            Some(at) => self.latency.observe(now.duration_since(at).as_secs_f64()),
        }
        self.live.token(&self.tenant);
        self.last = Some(now);
        Offer::Taken
    }
}

/// A reply split into content and tool calls as it is produced.
struct Split {
    parser: ToolParser,
    content: String,
    calls: Vec<ToolCall>,
}

impl Split {
    /// Records `pieces` and hands them on.
    fn record(&mut self, pieces: Vec<ToolPiece>) -> Vec<ToolPiece> {
        for piece in &pieces {
            match piece {
                ToolPiece::Text(text) => self.content.push_str(text),
                ToolPiece::Call(call) => self.calls.push(call.clone()),
            }
        }
        pieces
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The generated text (with tools offered, without the calls).
    pub text: String,
    /// The calls the model made.
    pub tool_calls: Vec<ToolCall>,
    /// Token counts.
    pub usage: Usage,
    /// `stop`, `length`, `cancelled`, or `tool_calls` when it made calls.
    pub finish: &'static str,
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let (code, retry) = match &refusal {
            Refusal::RateLimited { retry_after, .. } => {
                (ErrorCode::RateLimited, Some(*retry_after))
            }
            Refusal::QuotaExceeded { retry_after, .. } => {
                (ErrorCode::QuotaExceeded, Some(*retry_after))
            }
            Refusal::TooManyStreams { .. } => (ErrorCode::TooManyStreams, None),
            Refusal::LimitsUnreachable { retry_after } => {
                (ErrorCode::Overloaded, Some(*retry_after))
            }
        };
        ApiError {
            code,
            message: refusal.to_string(),
            retry_after_ms: retry.map(|d| d.as_millis() as u64),
        }
    }
}

impl AppState {
    /// Refuses new requests with `shutting_down` while the server drains.
    pub fn accepting(&self) -> Result<(), ApiError> {
        if self.is_draining() {
            Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down; running requests finish, new ones are refused",
            ))
        } else {
            Ok(())
        }
    }

    /// Counts a request and applies the tenant's request rate; called after
    /// the request passed validation, so refused requests cost nothing.
    pub async fn admit(&self, tenant: &TenantRuntime, kind: &str) -> Result<(), ApiError> {
        self.metrics
            .requests
            .with_label_values(&[tenant.id.as_str(), kind])
            .inc();
        tenant.limiter.admit_request().await.map_err(ApiError::from)
    }

    /// Counts an error returned to `tenant`.
    /// Refusals by a limit are logged too, at most once a second per tenant.
    pub fn count_error(&self, tenant: &str, error: &ApiError) {
        self.metrics
            .errors
            .with_label_values(&[tenant, error.code.as_str()])
            .inc();
        if let Some(t) = self.runtime().tenants.get(tenant) {
            t.limiter.record_error();
        }
        let refusal = matches!(
            error.code,
            ErrorCode::RateLimited
                | ErrorCode::QuotaExceeded
                | ErrorCode::TooManyStreams
                | ErrorCode::Unauthorized
        );
        if refusal && self.refusal_log.allow(tenant) {
            tracing::warn!(
                tenant,
                code = error.code.as_str(),
                "request refused: {}",
                error.message
            );
        }
    }

    /// The models `tenant` may use, and its adapters as `MODEL:ADAPTER`.
    pub fn models_of(&self, runtime: &Runtime, tenant: &TenantRuntime) -> Vec<ModelEntry> {
        tenant
            .served_names(runtime)
            .into_iter()
            .filter_map(|name| {
                let model = runtime.models.get(&name)?;
                let info = model.info();
                Some(ModelEntry {
                    name,
                    architecture: info.architecture.clone(),
                    context_length: info.context_length,
                })
            })
            .collect()
    }

    /// Admits a checked generation for `tenant`: refuses input longer than
    /// the model's context could hold by its bytes, tokenizes it (off the
    /// async threads), and takes a stream slot and a reservation of prompt
    /// plus `max_tokens` tokens from the tenant's limits. Everything that can
    /// refuse a generation happens here, before a streamed response starts.
    pub async fn admit_generation(
        &self,
        tenant: &TenantRuntime,
        request: CheckedGeneration,
    ) -> Result<AdmittedGeneration, ApiError> {
        let CheckedGeneration {
            served,
            model,
            input,
            params,
            constraint,
            tools,
        } = request;
        let bytes = match &input {
            Input::Prompt(prompt) => prompt.len(),
            // Calls and tools count as their JSON.
            Input::Chat(messages) => messages
                .iter()
                .map(|m| {
                    m.content.len()
                        + (m.tool_calls.iter())
                            .map(|c| c.name.len() + c.arguments.to_string().len())
                            .sum::<usize>()
                })
                .sum(),
        } + tools.as_ref().map_or(0, |set| {
            (set.tools().iter())
                .map(|t| t.name.len() + t.parameters.to_string().len())
                .sum()
        });
        let context = model.info().context_length;
        if bytes > model.max_prompt_bytes() {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "the input has {bytes} bytes, more than the model's context of {context} tokens can hold"
                ),
            ));
        }
        let tokenizer = model.clone();
        let parser = tools
            .as_ref()
            .map(|set| ToolParser::new(set, model.tool_syntax()));
        // Tokenizing and compiling the constraint take the CPU: not on the
        // async threads, and never in the batch.
        let (prompt, constraint) = tokio::task::spawn_blocking(move || {
            let constraint = (constraint.as_ref())
                .map(|spec| tokenizer.constrain(spec))
                .transpose()
                .map_err(|e| engine_error(&e))?;
            let prompt = match &input {
                Input::Prompt(prompt) => tokenizer.prompt_tokens(prompt),
                Input::Chat(messages) => {
                    let offered = tools.as_ref().map_or(&[][..], ToolSet::tools);
                    tokenizer
                        .chat_tokens(messages, offered)
                        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))?
                }
            };
            Ok::<_, ApiError>((prompt, constraint))
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("tokenizing failed: {e}")))??;
        if prompt.len() >= context {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "the prompt has {} tokens; the model's context holds {context}",
                    prompt.len()
                ),
            ));
        }
        // The most this generation can use: the prompt and as many new
        // tokens as asked for and the context leaves room for.
        let most = prompt.len() + params.max_tokens.min(context - prompt.len());
        let reservation = tenant
            .limiter
            .admit_generation(&served, most as u64)
            .await?;
        Ok(AdmittedGeneration {
            served,
            model,
            prompt,
            params,
            constraint,
            tools: parser,
            reservation,
        })
    }

    /// Runs an admitted generation for `tenant`, sending text pieces to
    /// `pieces` as they are produced (a full channel pauses the generation:
    /// backpressure), until done or `cancel` is set.
    ///
    /// The generation's end is accounted where the batcher reports it, not
    /// here: if this future is dropped (its client hung up), the stream slot
    /// stays taken until the generation has really stopped, and every token
    /// it produced is charged.
    pub async fn generate(
        &self,
        tenant: &TenantRuntime,
        admitted: AdmittedGeneration,
        pieces: Option<mpsc::Sender<ToolPiece>>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Finished, ApiError> {
        let AdmittedGeneration {
            served,
            model,
            prompt,
            params,
            constraint,
            tools,
            reservation,
        } = admitted;
        let split = tools.map(|parser| {
            Arc::new(std::sync::Mutex::new(Split {
                parser,
                content: String::new(),
                calls: Vec::new(),
            }))
        });
        let started = Instant::now();
        let tenant_id = tenant.id.clone();
        let ttft = self
            .metrics
            .time_to_first_token
            .with_label_values(&[tenant_id.as_str()]);
        let latency = self
            .metrics
            .token_latency
            .with_label_values(&[tenant_id.as_str()]);
        let (tokens_in, tokens_out) = tokens_of(&self.metrics.tokens, &tenant_id, &served);
        let queued = Queued::new(
            &self
                .metrics
                .queue_depth
                .with_label_values(&[tenant_id.as_str()]),
        );
        let mut request = Request::new(prompt, params, &tenant_id, tenant.config.weight);
        request.cancel = cancel;
        request.constraint = constraint;
        request.sink = Some(Box::new(MeteredSink {
            pieces: pieces.clone(),
            split: split.clone(),
            waiting: Default::default(),
            started,
            last: None,
            ttft,
            latency,
            live: self.live.clone(),
            tenant: tenant_id.clone(),
        }));
        let on_end: OnEnd = Box::new(move |result: &Result<Completion, _>| {
            let (prompt, completion) = result.as_ref().map_or((0, 0), |c| {
                (c.prompt_tokens as u64, c.completion_tokens as u64)
            });
            tokens_in.inc_by(prompt);
            tokens_out.inc_by(completion);
            reservation.settle(prompt, completion);
            drop(queued);
        });
        let completion = model.submit(request, Some(on_end)).await;
        // In a fleet, the reply waits for its tokens to be reconciled in
        // Redis: what a tenant reads of its quota after a reply includes it.
        if let Some(fleet) = self.fleet() {
            fleet.settled().await;
        }
        let completion = completion.map_err(|e| engine_error(&e))?;
        let mut finish = match completion.finish {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        };
        let (text, tool_calls) = match split {
            None => (completion.text, Vec::new()),
            Some(split) => {
                // The text held back (a call cut short, trailing text) ends
                // the reply; the batcher has handed over every piece.
                let (tail, text, calls) = {
                    let mut split = split.lock().unwrap_or_else(|e| e.into_inner());
                    let pieces = split.parser.finish();
                    let tail = split.record(pieces);
                    (
                        tail,
                        std::mem::take(&mut split.content),
                        std::mem::take(&mut split.calls),
                    )
                };
                if let Some(tx) = &pieces {
                    for piece in tail {
                        if tx.send(piece).await.is_err() {
                            break;
                        }
                    }
                }
                if !calls.is_empty() && finish == "stop" {
                    finish = "tool_calls";
                }
                (text, calls)
            }
        };
        Ok(Finished {
            text,
            tool_calls,
            usage: Usage {
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
                cached_tokens: completion.cached_tokens,
            },
            finish,
        })
    }

    /// Runs `pipeline` (one of the tenant's, see [`TenantRuntime::pipeline`])
    /// on `inputs`.
    pub async fn run_pipeline(
        &self,
        tenant: &TenantRuntime,
        pipeline: &Pipeline,
        inputs: Map<String, Value>,
    ) -> Result<Value, ApiError> {
        let runner = Runner::new(self.sandbox.clone(), self.hub.clone(), tenant.data.clone())
            .metered(self.meter(tenant), tenant.config.weight)
            .prebuilt();
        runner.run(pipeline, inputs).await.map_err(|e| {
            if let PipelineError::Step {
                error: StepError::Sandbox(sandbox),
                ..
            } = &e
            {
                self.count_breach(&tenant.id, sandbox);
            }
            pipeline_error(e)
        })
    }

    /// Calls the tenant's own component (see [`TenantRuntime::own_component`])
    /// with `request`.
    pub async fn invoke(
        &self,
        runtime: &Runtime,
        tenant: &TenantRuntime,
        component: &LoadedComponent,
        request: &Value,
    ) -> Result<Value, ApiError> {
        // A model alone is what the tenant's requests for it run: with its
        // default adapter, if it has one.
        let models = (tenant.served_names(runtime).into_iter()).filter_map(|name| {
            let (_, engine) =
                permitted_model(runtime, tenant, (&name, None), Defaults::Apply).ok()?;
            Some((name, engine))
        });
        let call = CallContext {
            tenant: tenant.data.clone(),
            limits: tenant.limits.clone(),
            models: ModelAccess::new(models)
                .on_behalf_of(&tenant.id, tenant.config.weight)
                .metered(self.meter(tenant)),
        };
        let result = self
            .sandbox
            .handle(component, &call, &request.to_string())
            .await
            .map_err(|e| {
                self.count_breach(&tenant.id, &e);
                ApiError::new(ErrorCode::GuestError, e.to_string())
            })?;
        self.metrics
            .fuel
            .with_label_values(&[tenant.id.as_str()])
            .inc_by(result.fuel_used);
        serde_json::from_str(&result.output).map_err(|e| {
            ApiError::new(
                ErrorCode::GuestError,
                format!("the component returned invalid JSON: {e}"),
            )
        })
    }

    /// The meter of `tenant`'s generations started by guests and pipelines:
    /// the same limits and token metrics as its direct requests.
    fn meter(&self, tenant: &TenantRuntime) -> Arc<dyn Meter> {
        Arc::new(TenantMeter {
            limiter: tenant.limiter.clone(),
            tenant: tenant.id.clone(),
            tokens: self.metrics.tokens.clone(),
        })
    }

    fn count_breach(&self, tenant: &str, error: &SandboxError) {
        if error.is_limit() {
            self.metrics
                .breaches
                .with_label_values(&[tenant, error.code()])
                .inc();
        }
    }
}

/// A tenant's limits and token counters, as a [`Meter`].
#[derive(Debug)]
struct TenantMeter {
    limiter: Arc<RateLimiter>,
    tenant: String,
    tokens: prometheus::IntCounterVec,
}

impl Meter for TenantMeter {
    fn admit<'a>(&'a self, model: &'a str, most_tokens: u64) -> Admission<'a> {
        Box::pin(async move {
            let reservation = self
                .limiter
                .admit_generation(model, most_tokens)
                .await
                .map_err(|r| Refused(r.to_string()))?;
            Ok(Box::new(TenantCharge {
                reservation,
                tokens: tokens_of(&self.tokens, &self.tenant, model),
            }) as Box<dyn Charge>)
        })
    }
}

struct TenantCharge {
    reservation: Reservation,
    tokens: TokenCounters,
}

impl Charge for TenantCharge {
    fn settle(self: Box<Self>, prompt_tokens: u64, completion_tokens: u64) {
        self.tokens.0.inc_by(prompt_tokens);
        self.tokens.1.inc_by(completion_tokens);
        self.reservation.settle(prompt_tokens, completion_tokens);
    }
}

impl TenantRuntime {
    /// The tenant's pipeline `name`, or `not_permitted`.
    pub fn pipeline(&self, name: &str) -> Result<Arc<Pipeline>, ApiError> {
        self.pipelines.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.pipelines.keys().map(String::as_str).collect();
            ApiError::new(
                ErrorCode::NotPermitted,
                format!(
                    "pipeline `{name}` is not available to this tenant (available: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
    }

    /// The tenant's own component, or `not_permitted` if it has none.
    pub fn own_component(&self) -> Result<&LoadedComponent, ApiError> {
        self.component.as_ref().ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotPermitted,
                "this tenant has no component to invoke (set `component` in its config)",
            )
        })
    }
}

impl TenantRuntime {
    /// The names the tenant may ask for: its models, and its adapters as
    /// `MODEL:ADAPTER`.
    pub fn served_names(&self, runtime: &Runtime) -> Vec<String> {
        let adapters = (self.config.adapters.iter()).filter_map(|name| {
            let adapter = runtime.config.adapters.get(name)?;
            Some(format!("{}:{name}", adapter.model))
        });
        self.config.models.iter().cloned().chain(adapters).collect()
    }
}

/// Whether a model named alone runs the tenant's default adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Defaults {
    /// Generations: yes.
    Apply,
    /// Embeddings (of base models only): no.
    Ignore,
}

/// The model a request of `tenant` names, if it exists and the tenant may
/// use it, with the name it is served as: `name` is `MODEL` or
/// `MODEL:ADAPTER`, `adapter` an adapter named apart. A model alone runs the
/// tenant's default adapter, if it has one for that model, unless `defaults`
/// says otherwise.
pub(super) fn permitted_model(
    runtime: &Runtime,
    tenant: &TenantRuntime,
    (name, adapter): (&str, Option<&str>),
    defaults: Defaults,
) -> Result<(String, Arc<dyn Engine>), ApiError> {
    let (model, named) = match name.split_once(':') {
        Some((model, adapter)) => (model, Some(adapter)),
        None => (name, None),
    };
    let adapter = match (named, adapter) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("`model` names adapter `{a}` and `adapter` names `{b}`: name one"),
            ));
        }
        (Some(a), _) | (None, Some(a)) => Some(a),
        (None, None) if defaults == Defaults::Ignore => None,
        (None, None) => (tenant.config.default_adapter.as_deref()).filter(|d| {
            runtime
                .config
                .adapters
                .get(*d)
                .is_some_and(|a| a.model == model)
        }),
    };
    let served = match adapter {
        Some(adapter) => format!("{model}:{adapter}"),
        None => model.to_string(),
    };
    // `MODEL:ADAPTER` is served only where the adapter adapts that model.
    let permitted = tenant.config.models.iter().any(|m| m == model)
        && adapter.is_none_or(|a| tenant.config.adapters.iter().any(|g| g == a));
    match runtime.models.get(&served) {
        Some(engine) if permitted => Ok((served, engine.clone())),
        // Unknown and forbidden look alike, so a tenant cannot probe others'
        // models and adapters.
        _ => {
            let available = tenant.served_names(runtime);
            Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!(
                    "model `{served}` is not available (available: {})",
                    if available.is_empty() {
                        "none".into()
                    } else {
                        available.join(", ")
                    }
                ),
            ))
        }
    }
}

impl Generation {
    /// The sampling settings, checked by the engine's rules.
    pub fn params(&self) -> Result<GenerateParams, ApiError> {
        let s = &self.sampling;
        GenerateOptions {
            max_tokens: self.max_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
            stop: self.stop.clone(),
        }
        .check()
        .map_err(|e| ApiError::new(ErrorCode::InvalidInput, e.to_string()))
    }
}

/// How long a client told `overloaded` should wait before trying again.
const OVERLOADED_RETRY_MS: u64 = 5_000;

/// The API error of a failed generation.
fn engine_error(e: &EngineError) -> ApiError {
    match e {
        EngineError::InvalidInput(_) | EngineError::Chat(_) | EngineError::ConstraintFailed(_) => {
            ApiError::new(ErrorCode::InvalidInput, e.to_string())
        }
        EngineError::Unavailable(_) => ApiError {
            retry_after_ms: Some(OVERLOADED_RETRY_MS),
            ..ApiError::new(ErrorCode::Overloaded, e.to_string())
        },
        _ => ApiError::new(ErrorCode::Internal, e.to_string()),
    }
}

fn pipeline_error(e: PipelineError) -> ApiError {
    let code = match &e {
        PipelineError::Input { .. } => ErrorCode::InvalidInput,
        PipelineError::Step {
            error: StepError::Sandbox(_),
            ..
        } => ErrorCode::GuestError,
        _ => ErrorCode::PipelineError,
    };
    ApiError::new(code, e.to_string())
}
