//! The HTTP side: health, readiness, metrics, and OpenAI-compatible
//! `/v1/models`, `/v1/chat/completions` and `/v1/completions` (with SSE).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cancel::CancelOnDrop;

use super::auth::{Denied, authenticate, bearer_key};
use super::listen::Peer;
use realm_models::chat::ChatMessage;
use realm_models::chat::tools::ToolPiece;

use super::protocol::{ApiError, ErrorCode, ResponseFormat, SamplingRequest};
use super::service::{AdmittedGeneration, Finished, Generation, Input};
use super::state::{AppState, TenantRuntime};
use super::tools::{ToolCallParam, ToolChoiceParam, ToolParam, call_json, tool_set};

/// `GET /healthz`: the process is up.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: the configuration is in service (its models loaded, or
/// ready to load on first use under `[loading]`) and requests are accepted.
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ready")
    }
}

/// `GET /metrics`: Prometheus text. With a tenant's key, only its series.
pub async fn metrics(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Response {
    let tenant = match bearer_key(&headers) {
        Some(key) => match authenticate(&state, key, peer.ip()).await {
            Ok(verified) => Some(verified.tenant),
            Err(denied) => return denied.response(),
        },
        None if state.runtime().config.public_metrics => None,
        None => return Denied::Invalid.response(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics_text(tenant.as_deref()),
    )
        .into_response()
}

/// The OpenAI-shaped error body for `error`, with its status.
pub fn error_response(error: &ApiError) -> (StatusCode, Json<Value>) {
    let status =
        StatusCode::from_u16(error.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({
        "error": {
            "message": error.message,
            "type": error.code.as_str(),
            "code": error.code.as_str(),
        }
    });
    if let Some(ms) = error.retry_after_ms {
        body["error"]["retry_after_ms"] = json!(ms);
    }
    (status, Json(body))
}

pub(super) fn fail(state: &AppState, tenant: &str, error: ApiError) -> Response {
    state.count_error(tenant, &error);
    let retry = error.retry_after_ms;
    let mut response = error_response(&error).into_response();
    if let Some(ms) = retry
        && let Ok(value) = ms.div_ceil(1000).to_string().parse()
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// The tenant whose key the request carries; the body is not read before.
pub(super) async fn tenant_of(
    state: &AppState,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
) -> Result<Arc<TenantRuntime>, Response> {
    let key = bearer_key(headers).ok_or_else(|| Denied::Invalid.response())?;
    let verified = authenticate(state, key, peer.ip())
        .await
        .map_err(|denied| denied.response())?;
    state
        .runtime()
        .tenants
        .get(&verified.tenant)
        .cloned()
        .ok_or_else(|| Denied::Invalid.response())
}

/// Reads a request body of an authenticated tenant: at most `max-frame`
/// bytes, within `connections.body-timeout`, while holding its part of the
/// server's body memory. A tenant holds at most its share of that memory,
/// so one sending slow bodies cannot leave none to the others.
pub(super) async fn read_body(
    state: &AppState,
    tenant: &TenantRuntime,
    body: axum::body::Body,
) -> Result<axum::body::Bytes, ApiError> {
    let runtime = state.runtime();
    let limit = runtime.config.max_frame.0 as usize;
    let timeout = runtime.config.connections.body_timeout;
    let too_slow = || {
        ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "the request body did not arrive within {}",
                humantime::format_duration(timeout)
            ),
        )
    };
    let kib = (limit.div_ceil(1024) as u32).max(1);
    let memory = async {
        let share = tenant.body_share.acquire_many(kib).await?;
        let total = state.body_memory.acquire_many(kib).await?;
        Ok::<_, tokio::sync::AcquireError>((share, total))
    };
    let _memory = tokio::time::timeout(timeout, memory)
        .await
        .map_err(|_| too_slow())?
        .map_err(|_| ApiError::new(ErrorCode::Internal, "the body budget is closed"))?;
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(too_slow()),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(if over_limit(&e) {
            ApiError::new(
                ErrorCode::FrameTooLarge,
                format!("the request body is larger than max-frame ({limit} bytes)"),
            )
        } else {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("reading the request body failed: {e}"),
            )
        }),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Whether reading a body failed because it is longer than the limit.
fn over_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(this) = cause {
        if this.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = this.source();
    }
    false
}

/// The tenant of a models request, admitted (as a `models` request).
async fn models_request(
    state: &AppState,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
) -> Result<Arc<TenantRuntime>, Response> {
    let tenant = tenant_of(state, headers, peer).await?;
    let admitted = match state.accepting() {
        Ok(()) => state.admit(&tenant, "models").await,
        Err(e) => Err(e),
    };
    match admitted {
        Ok(()) => Ok(tenant),
        Err(e) => Err(fail(state, &tenant.id, e)),
    }
}

/// `GET /v1/models`.
pub async fn list_models(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
) -> Response {
    let tenant = match models_request(&state, &headers, peer).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let runtime = state.runtime();
    let data: Vec<Value> = state
        .models_of(&runtime, &tenant)
        .into_iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "realm"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`: one of the tenant's models (another tenant's
/// looks like one that does not exist).
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let tenant = match models_request(&state, &headers, peer).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let runtime = state.runtime();
    match state
        .models_of(&runtime, &tenant)
        .into_iter()
        .find(|m| m.name == id)
    {
        Some(m) => {
            Json(json!({"id": m.name, "object": "model", "created": 0, "owned_by": "realm"}))
                .into_response()
        }
        None => {
            let error = ApiError::new(
                ErrorCode::ModelNotFound,
                format!("model `{id}` is not available"),
            );
            fail(&state, &tenant.id, error)
        }
    }
}

/// `stop` as OpenAI sends it: a string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields of OpenAI's completion requests that Realm honours. Fields
/// that would change the answer but are not implemented (`n` above 1,
/// `logprobs`, `logit_bias`, ...) are refused by name
/// ([`UNSUPPORTED`]); others that change nothing here (`user`, `metadata`,
/// `store`, ...) are accepted and ignored, as OpenAI clients send them.
#[derive(Debug, Deserialize)]
pub struct OpenAiRequest {
    model: String,
    /// The LoRA adapter to run (Realm's; or `model: "MODEL:ADAPTER"`).
    adapter: Option<String>,
    messages: Option<Vec<OpenAiMessage>>,
    prompt: Option<Value>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    response_format: Option<ResponseFormat>,
    tools: Option<Vec<ToolParam>>,
    tool_choice: Option<ToolChoiceParam>,
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// A chat message as OpenAI clients send it: `content` a string or a list
/// of parts (or null, in an assistant message that only makes calls), the
/// `developer` role (OpenAI's newer name for `system`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiMessage {
    role: String,
    content: Option<Content>,
    name: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallParam>,
    tool_call_id: Option<String>,
}

/// A message's content: text, or parts of which Realm takes the text ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl OpenAiMessage {
    /// The message as the chat template takes it: text parts joined by
    /// newlines (as vLLM joins them), `developer` read as `system`.
    fn into_chat(self) -> Result<ChatMessage, ApiError> {
        let invalid = |m: String| ApiError::new(ErrorCode::InvalidInput, m);
        let content = match self.content {
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(text)) => texts.push(text),
                        ("text", None) => {
                            return Err(invalid("a `text` part has no `text`".into()));
                        }
                        (kind, _) => {
                            return Err(invalid(format!(
                                "`{kind}` content parts are not supported: the models here read text only"
                            )));
                        }
                    }
                }
                texts.join("\n")
            }
            None if self.role == "assistant" && !self.tool_calls.is_empty() => String::new(),
            None => {
                return Err(invalid(format!(
                    "a `{}` message has no `content`",
                    self.role
                )));
            }
        };
        if self.role == "tool" && self.tool_call_id.is_none() {
            return Err(invalid(
                "a `tool` message needs the `tool_call_id` of the call it answers".into(),
            ));
        }
        let role = if self.role == "developer" {
            "system".into()
        } else {
            self.role
        };
        Ok(ChatMessage {
            role,
            content,
            tool_calls: (self.tool_calls.into_iter())
                .map(ToolCallParam::into_call)
                .collect::<Result<_, _>>()?,
            tool_call_id: self.tool_call_id,
            name: self.name,
        })
    }
}

/// OpenAI request fields that change the answer and that Realm does not
/// implement yet, with the value that means "not used" (a request may
/// send that value).
const UNSUPPORTED: &[(&str, &str)] = &[
    ("n", "1"),
    ("best_of", "1"),
    ("logprobs", "false or null"),
    ("top_logprobs", "null"),
    ("echo", "false"),
    ("suffix", "null"),
    ("logit_bias", "{} or null"),
    ("functions", "null"),
    ("function_call", "\"none\" or null"),
    ("audio", "null"),
    ("modalities", "[\"text\"]"),
    ("prediction", "null"),
];

/// Whether `value` is the "not used" value of the unsupported field `name`.
fn unused(name: &str, value: &Value) -> bool {
    match (name, value) {
        (_, Value::Null) => true,
        ("n" | "best_of", v) => v.as_u64() == Some(1),
        ("logprobs" | "echo", Value::Bool(b)) => !b,
        ("logit_bias", Value::Object(m)) => m.is_empty(),
        ("functions", Value::Array(a)) => a.is_empty(),
        ("function_call", Value::String(s)) => s == "none",
        ("modalities", Value::Array(a)) => a.iter().all(|m| m == "text"),
        _ => false,
    }
}

/// OpenAI's `stream_options`: `include_usage` adds a last chunk with the
/// token counts and no choices.
#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl OpenAiRequest {
    /// Reads a `/v1/chat/completions` (`chat`) or `/v1/completions` body
    /// into a generation, and whether to stream it (then, whether to end
    /// with a usage chunk). Pure: what the fuzz target `openai_body` drives.
    pub fn parse(body: &[u8], chat: bool) -> Result<(Generation, Option<bool>), ApiError> {
        let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
        let request: OpenAiRequest =
            serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))?;
        for (name, means_unused) in UNSUPPORTED {
            if let Some(value) = request.rest.get(*name)
                && !unused(name, value)
            {
                return Err(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!(
                        "`{name}` is not supported by this server (send {means_unused}, or leave it out)"
                    ),
                ));
            }
        }
        let input = match (chat, request.messages, request.prompt) {
            (true, Some(messages), _) => Input::Chat(
                messages
                    .into_iter()
                    .map(OpenAiMessage::into_chat)
                    .collect::<Result<_, _>>()?,
            ),
            (false, _, Some(Value::String(prompt))) => Input::Prompt(prompt),
            (true, None, _) => return Err(bad("`messages` is required".into())),
            (false, _, _) => return Err(bad("`prompt` must be one string".into())),
        };
        let generation = Generation {
            model: request.model,
            adapter: request.adapter,
            input,
            max_tokens: request.max_completion_tokens.or(request.max_tokens),
            sampling: SamplingRequest {
                temperature: request.temperature,
                top_p: request.top_p,
                presence_penalty: request.presence_penalty,
                frequency_penalty: request.frequency_penalty,
                seed: request.seed,
                ..Default::default()
            },
            stop: match request.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s],
                Some(Stop::Many(v)) => v,
            },
            format: request.response_format,
            tools: tool_set(
                request.tools,
                request.tool_choice,
                request.parallel_tool_calls,
            )?,
        };
        let stream = request
            .stream
            .then(|| request.stream_options.unwrap_or_default().include_usage);
        Ok((generation, stream))
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    completions(state, peer, headers, body, true).await
}

/// `POST /v1/completions`.
pub async fn text_completions(
    State(state): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    completions(state, peer, headers, body, false).await
}

async fn completions(
    state: Arc<AppState>,
    peer: std::net::SocketAddr,
    headers: HeaderMap,
    body: axum::body::Body,
    chat: bool,
) -> Response {
    // The key is checked before a byte of the body is read.
    let tenant = match tenant_of(&state, &headers, peer).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if let Err(e) = state.accepting() {
        return fail(&state, &tenant.id, e);
    }
    let body = match read_body(&state, &tenant, body).await {
        Ok(body) => body,
        Err(e) => return fail(&state, &tenant.id, e),
    };
    let (generation, stream) = match OpenAiRequest::parse(&body, chat) {
        Ok(parsed) => parsed,
        Err(e) => return fail(&state, &tenant.id, e),
    };
    let model = generation.model.clone();
    // Validation first: a refused request is not charged to the tenant's rate.
    let generation = match generation.check(&state.runtime(), &tenant) {
        Ok(g) => g,
        Err(e) => return fail(&state, &tenant.id, e),
    };
    if let Err(e) = (state.admit(&tenant, if chat { "chat" } else { "generate" })).await {
        return fail(&state, &tenant.id, e);
    }
    // Streamed or not, every refusal (streams, rates, quota, prompt length)
    // comes before the response starts: a status code with `Retry-After`.
    let generation = match state.admit_generation(&tenant, generation).await {
        Ok(g) => g,
        Err(e) => return fail(&state, &tenant.id, e),
    };
    let id = completion_id();
    let Some(include_usage) = stream else {
        let cancel = Arc::new(AtomicBool::new(false));
        // Hyper drops this future when the client hangs up; the guard then
        // stops the generation.
        let _hangup = CancelOnDrop::on(cancel.clone());
        return match state.generate(&tenant, generation, None, cancel).await {
            Ok(done) => Json(completion_body(&id, &model, chat, &done)).into_response(),
            Err(e) => fail(&state, &tenant.id, e),
        };
    };
    let events = stream_events(state, tenant, generation, id, model, chat, include_usage);
    Sse::new(events).into_response()
}

/// A completion id unique within this process: `cmpl-` + start time + a
/// sequence number, so ids sort by arrival.
fn completion_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("cmpl-{:x}-{n}", now())
}

fn usage_body(done: &Finished) -> Value {
    json!({
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "total_tokens": done.usage.prompt_tokens + done.usage.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": done.usage.cached_tokens },
    })
}

fn completion_body(id: &str, model: &str, chat: bool, done: &Finished) -> Value {
    let usage = usage_body(done);
    let choice = if chat {
        let mut message = json!({"role": "assistant", "content": done.text});
        if !done.tool_calls.is_empty() {
            // As OpenAI: no content beside the calls is `null`.
            if done.text.is_empty() {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = done.tool_calls.iter().map(call_json).collect();
        }
        json!({"index": 0, "message": message, "finish_reason": done.finish})
    } else {
        json!({"index": 0, "text": done.text, "logprobs": null, "finish_reason": done.finish})
    };
    json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": now(),
        "model": model,
        "choices": [choice],
        "usage": usage,
    })
}

/// A streamed chunk: a chat's `delta` (empty for the last chunk), or a
/// completion's text.
fn chunk(id: &str, model: &str, chat: bool, delta: Value, finish: Option<&str>) -> Value {
    let choice = if chat {
        json!({"index": 0, "delta": delta, "finish_reason": finish})
    } else {
        let text = delta["content"].as_str().unwrap_or("");
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
    };
    json!({
        "id": id,
        "object": if chat { "chat.completion.chunk" } else { "text_completion" },
        "created": now(),
        "model": model,
        "choices": [choice],
    })
}

/// The deltas of one piece of a streamed chat, as OpenAI sends them: text
/// as `content`; the `index`-th call as a first delta with its id, name and
/// empty arguments, then one with the arguments.
fn deltas(piece: ToolPiece, index: usize) -> Vec<Value> {
    match piece {
        ToolPiece::Text(text) => vec![json!({"role": "assistant", "content": text})],
        ToolPiece::Call(call) => {
            let call = call_json(&call);
            vec![
                json!({"role": "assistant", "content": null, "tool_calls": [{
                    "index": index,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }]}),
                json!({"tool_calls": [{
                    "index": index,
                    "function": {"arguments": call["function"]["arguments"]},
                }]}),
            ]
        }
    }
}

/// The SSE events of a streamed completion; dropping the stream (the client
/// hung up) cancels the generation.
fn stream_events(
    state: Arc<AppState>,
    tenant: Arc<TenantRuntime>,
    generation: AdmittedGeneration,
    id: String,
    model: String,
    chat: bool,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (pieces_tx, pieces_rx) = mpsc::channel::<ToolPiece>(1);
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop::on(cancel.clone());
    tokio::spawn(async move {
        let result = state
            .generate(&tenant, generation, Some(pieces_tx), cancel)
            .await;
        if let Err(e) = &result {
            state.count_error(&tenant.id, e);
        }
        let _ = end_tx.send(result);
    });
    let (id2, model2) = (id.clone(), model.clone());
    let mut calls = 0;
    let tokens = ReceiverStream::new(pieces_rx).flat_map(move |piece| {
        let index = calls;
        if matches!(piece, ToolPiece::Call(_)) {
            calls += 1;
        }
        let events: Vec<Result<Event, Infallible>> = deltas(piece, index)
            .into_iter()
            .map(|delta| {
                Ok(Event::default().data(chunk(&id, &model, chat, delta, None).to_string()))
            })
            .collect();
        stream::iter(events)
    });
    let end = stream::once(async move {
        let _guard = guard;
        let last = match end_rx.await {
            Ok(Ok(done)) => {
                let mut events = vec![chunk(&id2, &model2, chat, json!({}), Some(done.finish))];
                if include_usage {
                    let mut usage = chunk(&id2, &model2, chat, json!({}), None);
                    usage["choices"] = json!([]);
                    usage["usage"] = usage_body(&done);
                    events.push(usage);
                }
                events
            }
            Ok(Err(error)) => vec![error_response(&error).1.0],
            Err(_) => vec![
                error_response(&ApiError::new(ErrorCode::Internal, "generation task lost"))
                    .1
                    .0,
            ],
        };
        let mut events: Vec<Result<Event, Infallible>> = last
            .into_iter()
            .map(|data| Ok(Event::default().data(data.to_string())))
            .collect();
        events.push(Ok(Event::default().data("[DONE]")));
        stream::iter(events)
    })
    .flatten();
    tokens.chain(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bodies_over_the_limit_are_told_from_broken_ones() {
        let long = axum::body::Body::from(vec![b'x'; 10]);
        let err = axum::body::to_bytes(long, 5).await.unwrap_err();
        assert!(over_limit(&err));
        let fits = axum::body::Body::from(vec![b'x'; 5]);
        assert_eq!(axum::body::to_bytes(fits, 5).await.unwrap().len(), 5);
    }
}
