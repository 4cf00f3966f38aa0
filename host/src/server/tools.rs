//! Tool calling on the wire: tools, `tool_choice`, the calls in a chat's
//! history and in replies, in OpenAI's shapes (the WebSocket protocol uses
//! the same ones). The engine's side is `realm_models::chat::tools`.

use realm_models::chat::tools::{Tool, ToolCall, ToolChoice, ToolSet};
use serde::Deserialize;
use serde_json::{Value, json};

use super::protocol::{ApiError, ErrorCode};

fn invalid(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidInput, message)
}

/// A function offered to the model: `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolParam {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionParam,
}

/// The function of a [`ToolParam`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionParam {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    /// OpenAI's strict mode: Realm always enforces the parameters' schema.
    #[serde(default)]
    #[allow(dead_code)]
    strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or
/// `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceParam {
    /// `none`, `auto` or `required`.
    Mode(String),
    /// A named function.
    Named(NamedChoice),
}

/// A named `tool_choice`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedChoice {
    #[serde(rename = "type")]
    kind: String,
    function: NamedFunction,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamedFunction {
    name: String,
}

/// The tools a request offers, checked: `None` when it offers none (no
/// `tools`, or `tool_choice` `none`).
pub fn tool_set(
    tools: Option<Vec<ToolParam>>,
    choice: Option<ToolChoiceParam>,
    parallel: Option<bool>,
) -> Result<Option<ToolSet>, ApiError> {
    let choice = match choice {
        None => None,
        Some(ToolChoiceParam::Mode(mode)) => match mode.as_str() {
            "none" => return Ok(None),
            "auto" => Some(ToolChoice::Auto),
            "required" => Some(ToolChoice::Required),
            other => {
                return Err(invalid(format!(
                    "tool_choice `{other}` is not one of none, auto, required or a named function"
                )));
            }
        },
        Some(ToolChoiceParam::Named(named)) => {
            if named.kind != "function" {
                return Err(invalid(format!(
                    "tool_choice of type `{}`: only `function` is supported",
                    named.kind
                )));
            }
            Some(ToolChoice::Function(named.function.name))
        }
    };
    let tools = match tools {
        Some(tools) if !tools.is_empty() => tools,
        _ if matches!(choice, None | Some(ToolChoice::Auto)) => return Ok(None),
        _ => {
            return Err(invalid(
                "tool_choice asks for a call, but `tools` offers none".into(),
            ));
        }
    };
    let tools = tools
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            if tool.kind != "function" {
                return Err(invalid(format!(
                    "tools[{i}] is of type `{}`: only `function` tools are supported",
                    tool.kind
                )));
            }
            Ok(Tool {
                name: tool.function.name,
                description: tool.function.description,
                parameters: tool.function.parameters.unwrap_or(Value::Null),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    ToolSet::new(
        tools,
        choice.unwrap_or(ToolChoice::Auto),
        parallel.unwrap_or(true),
    )
    .map(Some)
    .map_err(invalid)
}

/// A call in an assistant message of the history.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallParam {
    id: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: CalledFunction,
}

/// The function of a [`ToolCallParam`]: `arguments` a JSON text (as
/// OpenAI sends it) or an object.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalledFunction {
    name: String,
    arguments: Value,
}

impl ToolCallParam {
    /// The call, its arguments read.
    pub fn into_call(self) -> Result<ToolCall, ApiError> {
        if let Some(kind) = self.kind.filter(|k| k != "function") {
            return Err(invalid(format!(
                "a tool call of type `{kind}`: only `function` calls are supported"
            )));
        }
        let name = self.function.name;
        let arguments = match self.function.arguments {
            Value::String(text) => serde_json::from_str(&text).map_err(|e| {
                invalid(format!(
                    "the arguments of the call `{}` to `{name}` are not JSON: {e}",
                    self.id
                ))
            })?,
            other => other,
        };
        if !arguments.is_object() {
            return Err(invalid(format!(
                "the arguments of the call `{}` to `{name}` are not a JSON object",
                self.id
            )));
        }
        Ok(ToolCall {
            id: self.id,
            name,
            arguments,
        })
    }
}

/// `call` as OpenAI replies with it: the arguments as a JSON text.
pub fn call_json(call: &ToolCall) -> Value {
    json!({
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments.to_string()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tools: Value, choice: Value) -> Result<Option<ToolSet>, ApiError> {
        let tools = serde_json::from_value(tools).unwrap();
        let choice = serde_json::from_value(choice).unwrap();
        tool_set(tools, choice, None)
    }

    #[test]
    fn tool_choices_are_read_and_checked() {
        let weather = json!([{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]);
        let set = parse(weather.clone(), Value::Null).unwrap().unwrap();
        assert_eq!(set.choice(), &ToolChoice::Auto);
        assert!(parse(weather.clone(), json!("none")).unwrap().is_none());
        let named = json!({"type": "function", "function": {"name": "w"}});
        let set = parse(weather.clone(), named).unwrap().unwrap();
        assert_eq!(set.choice(), &ToolChoice::Function("w".into()));
        assert!(parse(weather.clone(), json!("sometimes")).is_err());
        assert!(parse(Value::Null, json!("required")).is_err());
        assert!(parse(Value::Null, json!("auto")).unwrap().is_none());
        let other = json!([{"type": "retrieval", "function": {"name": "w"}}]);
        assert!(parse(other, Value::Null).is_err());
    }

    #[test]
    fn history_calls_take_text_or_object_arguments() {
        let call = |args: Value| {
            serde_json::from_value::<ToolCallParam>(
                json!({"id": "c1", "type": "function", "function": {"name": "w", "arguments": args}}),
            )
            .unwrap()
            .into_call()
        };
        assert_eq!(
            call(json!("{\"city\": \"Oslo\"}")).unwrap().arguments,
            json!({"city": "Oslo"})
        );
        assert_eq!(call(json!({"a": 1})).unwrap().arguments, json!({"a": 1}));
        assert!(call(json!("{broken")).is_err());
        assert!(call(json!("[1]")).is_err());
        let back = call_json(&call(json!({"a": 1})).unwrap());
        assert_eq!(back["function"]["arguments"], "{\"a\":1}");
    }
}
