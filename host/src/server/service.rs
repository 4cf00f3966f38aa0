//! The operations behind both the WebSocket and the HTTP API: generation
//! with streaming, pipelines, the tenant's component, model listing. Each
//! checks permissions and limits and records metrics.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use realm_models::chat::ChatMessage as EngineMessage;
use realm_models::engine::{
    Completion, Constraint, ConstraintSpec, Engine, EngineError, FinishReason, GenerateOptions,
    GenerateParams, Offer, OnEnd, Request, TextSink,
};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::pipeline::{Pipeline, PipelineError, Runner, StepError};
use crate::sandbox::{CallContext, LoadedComponent, ModelAccess, SandboxError};

use super::protocol::{
    ApiError, ChatMessage, ErrorCode, ModelEntry, ResponseFormat, SamplingRequest, Usage,
};
use super::rate::{RateLimiter, Refusal, Reservation};
use super::state::{AppState, Runtime, TenantRuntime};
use crate::metering::{Charge, Meter, Refused};

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
    /// The model's `[models]` name.
    pub model: String,
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
}

/// A generation checked against the tenant's models and the sampling rules,
/// ready to run once admitted.
pub struct CheckedGeneration {
    model: Arc<dyn Engine>,
    input: Input,
    params: GenerateParams,
    constraint: Option<ConstraintSpec>,
}

/// A generation admitted to run: its prompt tokenized, its stream slot and
/// tokens reserved (see [`AppState::admit_generation`]).
pub struct AdmittedGeneration {
    model: Arc<dyn Engine>,
    prompt: Vec<u32>,
    params: GenerateParams,
    constraint: Option<Constraint>,
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
        let model = permitted_model(runtime, tenant, &self.model)?;
        let params = self.params()?;
        Ok(CheckedGeneration {
            model,
            input: self.input,
            params,
            constraint: self.format.as_ref().and_then(ResponseFormat::constraint),
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
/// them. A full channel pauses this generation only (the batcher retries).
struct MeteredSink {
    pieces: Option<mpsc::Sender<String>>,
    started: Instant,
    last: Option<Instant>,
    ttft: prometheus::Histogram,
    latency: prometheus::Histogram,
}

impl TextSink for MeteredSink {
    fn offer(&mut self, piece: String) -> Offer {
        if let Some(tx) = &self.pieces {
            match tx.try_send(piece) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(piece)) => return Offer::Full(piece),
                Err(mpsc::error::TrySendError::Closed(_)) => return Offer::Closed,
            }
        }
        let now = Instant::now();
        match self.last {
            None => self
                .ttft
                .observe(now.duration_since(self.started).as_secs_f64()),
            Some(at) => self.latency.observe(now.duration_since(at).as_secs_f64()),
        }
        self.last = Some(now);
        Offer::Taken
    }
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Finished {
    /// All generated text.
    pub text: String,
    /// Token counts.
    pub usage: Usage,
    /// `stop`, `length` or `cancelled`.
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
    pub fn admit(&self, tenant: &TenantRuntime, kind: &str) -> Result<(), ApiError> {
        self.metrics
            .requests
            .with_label_values(&[tenant.id.as_str(), kind])
            .inc();
        tenant.limiter.admit_request().map_err(ApiError::from)
    }

    /// Counts an error returned to `tenant`.
    /// Refusals by a limit are logged too, at most once a second per tenant.
    pub fn count_error(&self, tenant: &str, error: &ApiError) {
        self.metrics
            .errors
            .with_label_values(&[tenant, error.code.as_str()])
            .inc();
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

    /// The models `tenant` may use.
    pub fn models_of(&self, runtime: &Runtime, tenant: &TenantRuntime) -> Vec<ModelEntry> {
        tenant
            .config
            .models
            .iter()
            .filter_map(|name| {
                let model = runtime.models.get(name)?;
                let info = model.info();
                Some(ModelEntry {
                    name: name.clone(),
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
            model,
            input,
            params,
            constraint,
        } = request;
        let bytes = match &input {
            Input::Prompt(prompt) => prompt.len(),
            Input::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
        };
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
                    let messages: Vec<EngineMessage> = messages
                        .iter()
                        .map(|m| EngineMessage {
                            role: m.role.clone(),
                            content: m.content.clone(),
                        })
                        .collect();
                    tokenizer
                        .chat_tokens(&messages)
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
        let reservation = tenant.limiter.admit_generation(most as u64)?;
        Ok(AdmittedGeneration {
            model,
            prompt,
            params,
            constraint,
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
        pieces: Option<mpsc::Sender<String>>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Finished, ApiError> {
        let AdmittedGeneration {
            model,
            prompt,
            params,
            constraint,
            reservation,
        } = admitted;
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
        let tokens_in = self
            .metrics
            .tokens
            .with_label_values(&[tenant_id.as_str(), "in"]);
        let tokens_out = self
            .metrics
            .tokens
            .with_label_values(&[tenant_id.as_str(), "out"]);
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
            pieces,
            started,
            last: None,
            ttft,
            latency,
        }));
        let on_end: OnEnd = Box::new(move |result: &Result<Completion, _>| {
            let used = result
                .as_ref()
                .map_or(0, |c| (c.prompt_tokens + c.completion_tokens) as u64);
            if let Ok(c) = result {
                tokens_in.inc_by(c.prompt_tokens as u64);
                tokens_out.inc_by(c.completion_tokens as u64);
            }
            reservation.settle(used);
            drop(queued);
        });
        let completion = model
            .submit(request, Some(on_end))
            .await
            .map_err(|e| engine_error(&e))?;
        Ok(Finished {
            text: completion.text,
            usage: Usage {
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
                cached_tokens: completion.cached_tokens,
            },
            finish: match completion.finish {
                FinishReason::Stop => "stop",
                FinishReason::Length => "length",
                FinishReason::Cancelled => "cancelled",
            },
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
        let models = tenant
            .config
            .models
            .iter()
            .filter_map(|name| Some((name.clone(), runtime.models.get(name)?.clone())));
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
            tokens_in: self
                .metrics
                .tokens
                .with_label_values(&[tenant.id.as_str(), "in"]),
            tokens_out: self
                .metrics
                .tokens
                .with_label_values(&[tenant.id.as_str(), "out"]),
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
    tokens_in: prometheus::IntCounter,
    tokens_out: prometheus::IntCounter,
}

impl Meter for TenantMeter {
    fn admit(&self, most_tokens: u64) -> Result<Box<dyn Charge>, Refused> {
        let reservation = self
            .limiter
            .admit_generation(most_tokens)
            .map_err(|r| Refused(r.to_string()))?;
        Ok(Box::new(TenantCharge {
            reservation,
            tokens_in: self.tokens_in.clone(),
            tokens_out: self.tokens_out.clone(),
        }))
    }
}

struct TenantCharge {
    reservation: Reservation,
    tokens_in: prometheus::IntCounter,
    tokens_out: prometheus::IntCounter,
}

impl Charge for TenantCharge {
    fn settle(self: Box<Self>, prompt_tokens: u64, completion_tokens: u64) {
        self.tokens_in.inc_by(prompt_tokens);
        self.tokens_out.inc_by(completion_tokens);
        self.reservation.settle(prompt_tokens + completion_tokens);
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

/// The model `name` if it exists and `tenant` may use it.
pub(super) fn permitted_model(
    runtime: &Runtime,
    tenant: &TenantRuntime,
    name: &str,
) -> Result<Arc<dyn Engine>, ApiError> {
    let permitted = tenant.config.models.iter().any(|m| m == name);
    match runtime.models.get(name) {
        Some(model) if permitted => Ok(model.clone()),
        // Unknown and forbidden look alike, so a tenant cannot probe others' models.
        _ => Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!(
                "model `{name}` is not available (available: {})",
                if tenant.config.models.is_empty() {
                    "none".into()
                } else {
                    tenant.config.models.join(", ")
                }
            ),
        )),
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
