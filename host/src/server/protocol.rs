//! The WebSocket protocol's JSON frames (see docs/protocol.md) and the stable
//! error codes shared with the HTTP API.

use realm_models::chat::ChatMessage as EngineMessage;
use realm_models::engine::ConstraintSpec;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::tools::{ToolCallParam, ToolChoiceParam, ToolParam};

/// A stable, machine-readable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or lacks a required field.
    BadRequest,
    /// The frame's `type` is not one the server knows.
    UnknownType,
    /// The frame is larger than the server's `max-frame`.
    FrameTooLarge,
    /// No valid API key.
    Unauthorized,
    /// No such model.
    ModelNotFound,
    /// The tenant may not use this model, pipeline or component.
    NotPermitted,
    /// Over a per-minute rate; see `retry_after_ms`.
    RateLimited,
    /// The daily token quota is spent; see `retry_after_ms`.
    QuotaExceeded,
    /// The tenant's concurrent-stream limit is reached.
    TooManyStreams,
    /// The request's values do not fit (empty prompt, too long, bad sampling).
    InvalidInput,
    /// A request with this `id` is already running on the connection.
    DuplicateId,
    /// A guest component failed (trap, limit, error result).
    GuestError,
    /// The pipeline failed for a reason other than a guest.
    PipelineError,
    /// The server is draining: running requests finish, new ones are refused.
    ShuttingDown,
    /// The model could not be put in memory in time (the models in use fill
    /// the memory budget) or failed to load; see `retry_after_ms`.
    Overloaded,
    /// The request was stopped by a `cancel` frame.
    Cancelled,
    /// Something went wrong inside the server.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire (and in metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::NotPermitted => "not_permitted",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::DuplicateId => "duplicate_id",
            ErrorCode::GuestError => "guest_error",
            ErrorCode::PipelineError => "pipeline_error",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status the code maps to.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::UnknownType
            | ErrorCode::InvalidInput
            | ErrorCode::DuplicateId => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotPermitted => 403,
            ErrorCode::ModelNotFound => 404,
            ErrorCode::FrameTooLarge => 413,
            ErrorCode::RateLimited | ErrorCode::QuotaExceeded | ErrorCode::TooManyStreams => 429,
            ErrorCode::GuestError | ErrorCode::PipelineError => 422,
            ErrorCode::ShuttingDown | ErrorCode::Overloaded => 503,
            // Never sent over HTTP (there, hanging up cancels); nginx's
            // "client closed request".
            ErrorCode::Cancelled => 499,
            ErrorCode::Internal => 500,
        }
    }
}

/// An error as a value: code, message, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// What kind of error.
    pub code: ErrorCode,
    /// What happened, for a person.
    pub message: String,
    /// For rate limits and quotas: when trying again can succeed.
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    /// An error without a retry hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// Sampling settings a request may set; missing ones take the defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingRequest {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    /// OpenAI's presence penalty, `-2..=2`.
    pub presence_penalty: Option<f32>,
    /// OpenAI's frequency penalty, `-2..=2`.
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
}

/// What a generation's output must match: OpenAI's `response_format`
/// (`text`, `json_object`, `json_schema`), plus `regex` and `grammar` (a Lark
/// grammar in llguidance's dialect). Enforced while decoding.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text (the default).
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against a schema.
    JsonSchema { json_schema: JsonSchemaFormat },
    /// Text matching a regular expression, whole.
    Regex { pattern: String },
    /// Text in a Lark grammar.
    Grammar { grammar: String },
}

/// OpenAI's `json_schema` object. The schema is enforced whether or not
/// `strict` is set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// The schema's name (OpenAI requires one).
    pub name: String,
    /// What the output is for (not shown to the model).
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON Schema; without one, any JSON object.
    #[serde(default)]
    pub schema: Option<Value>,
    /// OpenAI's strict mode; Realm always enforces the schema.
    #[serde(default)]
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The engine's constraint for this format (`None` for free text).
    pub fn constraint(&self) -> Option<ConstraintSpec> {
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(ConstraintSpec::JsonObject),
            ResponseFormat::JsonSchema { json_schema } => Some(match &json_schema.schema {
                Some(schema) => ConstraintSpec::JsonSchema(schema.clone()),
                None => ConstraintSpec::JsonObject,
            }),
            ResponseFormat::Regex { pattern } => Some(ConstraintSpec::Regex(pattern.clone())),
            ResponseFormat::Grammar { grammar } => Some(ConstraintSpec::Lark(grammar.clone())),
        }
    }
}

/// One chat message: `content` may be left out of an assistant message
/// that only makes calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// The calls an assistant message made.
    #[serde(default)]
    pub tool_calls: Vec<ToolCallParam>,
    /// The call whose result a `tool` message holds.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The author's name.
    #[serde(default)]
    pub name: Option<String>,
}

impl ChatMessage {
    /// The message as the engine takes it.
    pub fn into_engine(self) -> Result<EngineMessage, ApiError> {
        Ok(EngineMessage {
            role: self.role,
            content: self.content,
            tool_calls: (self.tool_calls.into_iter())
                .map(ToolCallParam::into_call)
                .collect::<Result<_, _>>()?,
            tool_call_id: self.tool_call_id,
            name: self.name,
        })
    }
}

fn yes() -> bool {
    true
}

/// A frame from the client. Every request carries an `id` the replies echo.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Authenticates the connection (when the upgrade had no key).
    Auth { key: String },
    /// Raw completion.
    Generate {
        id: String,
        model: String,
        /// The LoRA adapter to run (or `model: "MODEL:ADAPTER"`).
        #[serde(default)]
        adapter: Option<String>,
        prompt: String,
        #[serde(default)]
        max_tokens: Option<u32>,
        #[serde(default)]
        sampling: SamplingRequest,
        #[serde(default)]
        stop: Vec<String>,
        #[serde(default = "yes")]
        stream: bool,
        #[serde(default)]
        response_format: Option<Box<ResponseFormat>>,
    },
    /// Chat completion with the model's template.
    Chat {
        id: String,
        model: String,
        /// The LoRA adapter to run (or `model: "MODEL:ADAPTER"`).
        #[serde(default)]
        adapter: Option<String>,
        messages: Vec<ChatMessage>,
        #[serde(default)]
        max_tokens: Option<u32>,
        #[serde(default)]
        sampling: SamplingRequest,
        #[serde(default)]
        stop: Vec<String>,
        #[serde(default = "yes")]
        stream: bool,
        #[serde(default)]
        response_format: Option<Box<ResponseFormat>>,
        /// Functions the model may call (OpenAI's shape).
        #[serde(default)]
        tools: Option<Vec<ToolParam>>,
        /// `none`, `auto`, `required` or a named function.
        #[serde(default)]
        tool_choice: Option<Box<ToolChoiceParam>>,
        /// Whether several calls may be made at once (default true).
        #[serde(default)]
        parallel_tool_calls: Option<bool>,
    },
    /// Runs one of the tenant's pipelines.
    Pipeline {
        id: String,
        pipeline: String,
        #[serde(default)]
        inputs: Map<String, Value>,
    },
    /// Calls the tenant's own component's `handle`.
    Invoke { id: String, request: Value },
    /// Lists the tenant's models.
    Models { id: String },
    /// Stops request `target`.
    Cancel { id: String, target: String },
    /// Liveness check.
    Ping { id: String },
}

/// Token counts of a generation.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the tenant's prefix cache.
    pub cached_tokens: usize,
}

/// A model as listed to a tenant.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub architecture: String,
    pub context_length: usize,
}

/// A frame from the server.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The connection is authenticated.
    Ready { tenant: String },
    /// A piece of generated text.
    Token { id: String, text: String },
    /// A tool call the model made (streamed generations), in OpenAI's shape.
    ToolCall { id: String, call: Value },
    /// A generation finished: its text (without the calls) and its calls.
    Done {
        id: String,
        text: String,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<Value>,
        usage: Usage,
        finish: &'static str,
    },
    /// A pipeline's or component's result.
    Result { id: String, output: Value },
    /// The tenant's models.
    Models { id: String, models: Vec<ModelEntry> },
    /// Reply to `ping`.
    Pong { id: String },
    /// Reply to `cancel`: whether the target was running.
    Cancelled {
        id: String,
        target: String,
        found: bool,
    },
    /// A request failed (or a frame could not be read: then `id` is absent).
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ClientFrame {
    /// The request id the frame carries (`auth` has none).
    pub fn id(&self) -> Option<&str> {
        match self {
            ClientFrame::Auth { .. } => None,
            ClientFrame::Generate { id, .. }
            | ClientFrame::Chat { id, .. }
            | ClientFrame::Pipeline { id, .. }
            | ClientFrame::Invoke { id, .. }
            | ClientFrame::Models { id }
            | ClientFrame::Cancel { id, .. }
            | ClientFrame::Ping { id } => Some(id),
        }
    }
}

impl ServerFrame {
    /// The error frame for `error`, answering request `id` if known.
    pub fn error(id: Option<String>, error: ApiError) -> Self {
        ServerFrame::Error {
            id,
            code: error.code,
            message: error.message,
            retry_after_ms: error.retry_after_ms,
        }
    }
}

/// Only the `id` of a frame, for answering frames that are not read whole.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<String>,
}

/// The string `id` of a JSON object frame, if it has one. Other fields are
/// skipped without being built (iteratively, however deep they nest), so the
/// work is linear in the frame's size.
pub fn frame_id(text: &str) -> Option<String> {
    serde_json::from_str::<IdOnly>(text).ok()?.id
}

/// Parses a client frame, telling bad JSON, unknown types and bad fields
/// apart. A repeated key is a bad field (a proxy reading the first `id` or
/// `type` and Realm the last must not see two different frames); errors
/// carry [`frame_id`]'s id, so a frame is answered under one id whichever
/// way it is read.
pub fn parse_frame(text: &str) -> Result<ClientFrame, (Option<String>, ApiError)> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            None,
            ApiError::new(ErrorCode::BadRequest, format!("the frame is not JSON: {e}")),
        )
    })?;
    let id = frame_id(text);
    let Some(kind) = value
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err((
            id,
            ApiError::new(ErrorCode::BadRequest, "the frame has no string `type`"),
        ));
    };
    const TYPES: &[&str] = &[
        "auth", "generate", "chat", "pipeline", "invoke", "models", "cancel", "ping",
    ];
    if !TYPES.contains(&kind.as_str()) {
        return Err((
            id,
            ApiError::new(
                ErrorCode::UnknownType,
                format!("unknown frame type `{kind}` (known: {})", TYPES.join(", ")),
            ),
        ));
    }
    // From the text, not the `Value` (which keeps the last of repeated keys):
    // the derived fields refuse duplicates at every level.
    serde_json::from_str(text).map_err(|e| {
        (
            id,
            ApiError::new(ErrorCode::BadRequest, format!("bad `{kind}` frame: {e}")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `ws_frame` fuzz target: a repeated `id` was answered
    /// under the last one while `frame_id` saw none.
    #[test]
    fn repeated_keys_are_refused_under_one_id() {
        let (id, error) =
            parse_frame(r#"{"type":"chat","id":"j","model":"small","id":"k","messages":[]}"#)
                .unwrap_err();
        assert_eq!(id, None);
        assert_eq!(frame_id(r#"{"id":"j","id":"k"}"#), None);
        assert!(
            error.message.contains("duplicate field `id`"),
            "{}",
            error.message
        );
        let (id, error) = parse_frame(r#"{"type":"ping","id":"p","type":"generate"}"#).unwrap_err();
        assert_eq!(id.as_deref(), Some("p"));
        assert!(error.message.contains("duplicate"), "{}", error.message);
        let (_, error) = parse_frame(
            r#"{"type":"generate","id":"1","model":"m","prompt":"a","sampling":{"seed":1,"seed":2}}"#,
        )
        .unwrap_err();
        assert!(
            error.message.contains("duplicate field `seed`"),
            "{}",
            error.message
        );
    }

    #[test]
    fn frames_parse_and_errors_are_told_apart() {
        let frame = parse_frame(
            r#"{"id":"1","type":"generate","model":"m","prompt":"hi","max_tokens":4,"sampling":{"temperature":0}}"#,
        )
        .unwrap();
        match frame {
            ClientFrame::Generate {
                max_tokens,
                stream,
                sampling,
                ..
            } => {
                assert_eq!(max_tokens, Some(4));
                assert!(stream);
                assert_eq!(sampling.temperature, Some(0.0));
            }
            other => panic!("{other:?}"),
        }
        let code = |text: &str| parse_frame(text).unwrap_err().1.code;
        assert_eq!(code("{not json"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"id":"1","type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"id":"1","type":"generate"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"id":"1","type":"ping","extra":true}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            parse_frame(r#"{"id":"7","type":"x"}"#)
                .unwrap_err()
                .0
                .as_deref(),
            Some("7")
        );
    }

    #[test]
    fn ids_are_read_from_frames_not_read_whole() {
        let big = format!(
            r#"{{"type":"ping","payload":"{}","id":"7"}}"#,
            "x".repeat(100)
        );
        assert_eq!(frame_id(&big).as_deref(), Some("7"));
        assert_eq!(frame_id(r#"{"id":7,"type":"ping"}"#), None);
        assert_eq!(frame_id(r#"{"type":"ping"}"#), None);
        assert_eq!(frame_id(r#"["id","7"]"#), None);
        assert_eq!(frame_id("{not json"), None);
        let deep = format!(
            r#"{{"id":"d","x":{}{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        // Skipped without recursion: no stack overflow, and the id is found.
        assert_eq!(frame_id(&deep).as_deref(), Some("d"));
    }

    #[test]
    fn errors_serialize_with_stable_codes() {
        let frame = ServerFrame::error(
            Some("9".into()),
            ApiError {
                code: ErrorCode::RateLimited,
                message: "slow down".into(),
                retry_after_ms: Some(1200),
            },
        );
        assert_eq!(
            serde_json::to_value(&frame).unwrap(),
            serde_json::json!({"type":"error","id":"9","code":"rate_limited","message":"slow down","retry_after_ms":1200})
        );
    }
}
