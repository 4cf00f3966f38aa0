//! Tool calling: offering functions to a model, forcing the calls it must
//! make, and reading the calls back out of its text.
//!
//! Models write calls in the syntax they were trained on, and their chat
//! templates print the offered tools and past calls in it. Realm knows the
//! common syntaxes ([`ToolSyntax`]) and recognises them in a template's
//! source; a template that does not render tools (SmolLM2's, Gemma's) gets
//! the [generic](ToolSyntax::Generic) one: Realm describes the tools in the
//! system message itself and rewrites past calls and results as text.
//!
//! Calls are enforced by grammar ([`grammar`], compiled by llguidance like
//! any constraint): with `tool_choice` `required` or a named function the
//! output *is* a call whose arguments match the function's schema; with
//! `auto` the model may write text, but once it opens a call the rest of the
//! call is forced to be valid. [`ToolParser`] then splits the text into
//! content and calls, piece by piece as it streams.

use std::fmt::Write as _;

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value, json};

use super::ChatMessage;

/// The most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Its name: 1–64 of `a-z A-Z 0-9 _ -`.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// A JSON Schema of its arguments (an object).
    pub parameters: Value,
}

/// Templates read tools in OpenAI's shape: `{"type": "function", "function": {...}}`.
impl Serialize for Tool {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut function = Map::new();
        function.insert("name".into(), Value::from(self.name.as_str()));
        if let Some(d) = &self.description {
            function.insert("description".into(), Value::from(d.as_str()));
        }
        function.insert("parameters".into(), self.parameters.clone());
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("type", "function")?;
        map.serialize_entry("function", &function)?;
        map.end()
    }
}

/// One call of a function, made by the model or given in the history.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Its id, which the `tool` message with its result names.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments: a JSON object.
    pub arguments: Value,
}

/// Templates read calls in OpenAI's shape, with the arguments as an object
/// (as Hugging Face's `apply_chat_template` expects them).
impl Serialize for ToolCall {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("type", "function")?;
        map.serialize_entry(
            "function",
            &json!({"name": self.name, "arguments": self.arguments}),
        )?;
        map.end()
    }
}

/// Whether and which function the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Text or calls, as the model chooses; calls it opens are forced valid.
    Auto,
    /// At least one call, of any of the tools.
    Required,
    /// A call of this function.
    Function(String),
}

/// The tools offered to one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    tools: Vec<Tool>,
    choice: ToolChoice,
    parallel: bool,
}

impl ToolSet {
    /// Checks `tools` and `choice`: names well formed and unique,
    /// parameters an object schema (none means no arguments), a named
    /// choice among the tools. `parallel` allows more than one call.
    pub fn new(tools: Vec<Tool>, choice: ToolChoice, parallel: bool) -> Result<Self, String> {
        if tools.is_empty() {
            return Err("`tools` is empty; offer at least one function or leave it out".into());
        }
        if tools.len() > MAX_TOOLS {
            return Err(format!(
                "{} tools offered; at most {MAX_TOOLS} are accepted",
                tools.len()
            ));
        }
        let mut tools = tools;
        for (i, tool) in tools.iter_mut().enumerate() {
            let good = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if tool.name.is_empty() || tool.name.len() > 64 || !tool.name.chars().all(good) {
                return Err(format!(
                    "tools[{i}]: the name `{}` must be 1 to 64 of a-z, A-Z, 0-9, _ and -",
                    tool.name
                ));
            }
            match &tool.parameters {
                Value::Null => tool.parameters = json!({"type": "object", "properties": {}}),
                Value::Object(_) => {}
                _ => {
                    return Err(format!(
                        "tools[{i}].parameters must be a JSON Schema object"
                    ));
                }
            }
        }
        for (i, tool) in tools.iter().enumerate() {
            if tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(format!("two tools are named `{}`", tool.name));
            }
        }
        if let ToolChoice::Function(name) = &choice
            && !tools.iter().any(|t| &t.name == name)
        {
            return Err(format!(
                "tool_choice names `{name}`, which is not in `tools`"
            ));
        }
        Ok(ToolSet {
            tools,
            choice,
            parallel,
        })
    }

    /// The tools.
    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    /// The choice.
    pub fn choice(&self) -> &ToolChoice {
        &self.choice
    }

    /// Whether several calls may be made at once.
    pub fn parallel(&self) -> bool {
        self.parallel
    }

    /// The tools a call may name under the choice.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(|t| match &self.choice {
            ToolChoice::Function(name) => &t.name == name,
            _ => true,
        })
    }
}

/// How a model writes tool calls, recognised in its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolSyntax {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, the
    /// template printing the tools (Qwen 2.5/3, Hermes, QwQ).
    Hermes,
    /// `{"name": ..., "parameters": {...}}` as the whole reply, one call
    /// (Llama 3.1–3.3).
    Llama3,
    /// `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral Nemo).
    Mistral,
    /// Hermes' syntax, with Realm describing the tools in the system
    /// message: for templates that do not render tools, or whose syntax
    /// Realm does not know.
    Generic,
}

impl ToolSyntax {
    /// The syntax of the template `source`.
    pub fn detect(source: &str) -> Self {
        if !source.contains("tools") {
            ToolSyntax::Generic
        } else if source.contains("<tool_call>")
            && source.contains("arguments")
            && !source.contains("<function=")
        {
            ToolSyntax::Hermes
        } else if source.contains("[TOOL_CALLS]") && !source.contains("[ARGS]") {
            ToolSyntax::Mistral
        } else if source.contains("<|start_header_id|>") && source.contains("\"parameters\"") {
            ToolSyntax::Llama3
        } else {
            ToolSyntax::Generic
        }
    }

    /// Whether the template renders tools, calls and results itself.
    pub fn is_native(self) -> bool {
        self != ToolSyntax::Generic
    }

    /// The text that opens the calls, if the syntax has one.
    pub fn opener(self) -> Option<&'static str> {
        match self {
            ToolSyntax::Hermes | ToolSyntax::Generic => Some(OPEN),
            ToolSyntax::Mistral => Some(MISTRAL_OPEN),
            ToolSyntax::Llama3 => None,
        }
    }

    /// The key of a call's arguments.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolSyntax::Llama3 => "parameters",
            _ => "arguments",
        }
    }
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";

/// The conversation rewritten for the [generic](ToolSyntax::Generic)
/// syntax: the tools described in the system message (one is added if the
/// chat has none; with `in_system` false, at the start of the first user
/// message instead, for templates that refuse system messages), past calls
/// written out in the assistant's turns, and tool results given as user
/// turns.
pub fn generic_messages(
    messages: &[ChatMessage],
    tools: &[Tool],
    in_system: bool,
) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let mut text = m.content.clone();
                for call in &m.tool_calls {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&written_call(ToolSyntax::Generic, call));
                }
                out.push(ChatMessage::new("assistant", text));
            }
            "tool" => {
                let result = format!("<tool_response>\n{}\n</tool_response>", m.content);
                // Results of one turn's calls go together, as one user turn.
                match out.last_mut() {
                    Some(last)
                        if last.role == "user" && last.content.ends_with("</tool_response>") =>
                    {
                        last.content.push('\n');
                        last.content.push_str(&result);
                    }
                    _ => out.push(ChatMessage::new("user", result)),
                }
            }
            _ => {
                let mut m = m.clone();
                m.tool_calls.clear();
                m.tool_call_id = None;
                out.push(m);
            }
        }
    }
    if !tools.is_empty() {
        let described = describe(tools);
        let system = out.first().is_some_and(|m| m.role == "system");
        let user = out.iter().position(|m| m.role == "user");
        match (system, in_system, user) {
            (true, true, _) => {
                out[0].content = format!("{}\n\n{described}", out[0].content);
            }
            (_, false, Some(at)) => {
                out[at].content = format!("{described}\n\n{}", out[at].content);
            }
            _ => out.insert(0, ChatMessage::new("system", described)),
        }
    }
    out
}

/// The generic syntax's description of `tools`, for the system message.
fn describe(tools: &[Tool]) -> String {
    let mut text = String::from(
        "# Tools\n\nYou can call functions to answer the user. Their signatures, one JSON \
         object per line, are between <tools> and </tools>:\n<tools>\n",
    );
    for tool in tools {
        let tool = serde_json::to_value(tool).unwrap_or_default();
        let _ = writeln!(text, "{}", python_json(&tool));
    }
    text.push_str(
        "</tools>\n\nTo call a function, write a JSON object with its name and arguments \
         between <tool_call> and </tool_call>:\n<tool_call>\n{\"name\": \"the function's name\", \
         \"arguments\": {the arguments as a JSON object}}\n</tool_call>\nThe results come back \
         between <tool_response> and </tool_response>.",
    );
    text
}

/// `call` as the syntax writes it.
fn written_call(syntax: ToolSyntax, call: &ToolCall) -> String {
    let mut body = Map::new();
    body.insert("name".into(), Value::from(call.name.as_str()));
    body.insert(syntax.arguments_key().into(), call.arguments.clone());
    let body = python_json(&Value::Object(body));
    match syntax {
        ToolSyntax::Hermes | ToolSyntax::Generic => format!("{OPEN}\n{body}\n{CLOSE}"),
        ToolSyntax::Llama3 => body,
        ToolSyntax::Mistral => format!("{MISTRAL_OPEN}[{body}]"),
    }
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "`), the layout
/// the models saw in training and the grammars force.
fn python_json(value: &Value) -> String {
    let mut out = String::new();
    write_python_json(value, &mut out);
    out
}

fn write_python_json(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::from(k.as_str()).to_string());
                out.push_str(": ");
                write_python_json(v, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// The Lark grammar (llguidance's dialect) that forces `set`'s calls in
/// `syntax`. `control` gives the id of a control token spelled by a text
/// (an opener such as `[TOOL_CALLS]` may be one), which the grammar must
/// name by id since no text can spell it.
pub fn grammar(set: &ToolSet, syntax: ToolSyntax, control: &dyn Fn(&str) -> Option<u32>) -> String {
    let key = syntax.arguments_key();
    let calls: Vec<Value> = set
        .callable()
        .map(|tool| {
            json!({
                "type": "object",
                "properties": {"name": {"const": tool.name}, key: tool.parameters},
                "required": ["name", key],
                "additionalProperties": false,
            })
        })
        .collect();
    let one_call = layout(json!({"anyOf": calls}));
    let forced = set.choice != ToolChoice::Auto;
    let opener = syntax.opener().map(|text| match control(text) {
        Some(id) => (format!("<[{id}]>"), true),
        None => (Value::from(text).to_string(), false),
    });
    match (syntax, opener) {
        (ToolSyntax::Hermes | ToolSyntax::Generic, Some((open, special))) => {
            let close = Value::from(CLOSE).to_string();
            let many = if set.parallel { "*" } else { "?" };
            if forced {
                let more = if set.parallel { "(\"\\n\" call)*" } else { "" };
                format!(
                    "start: call {more}\ncall: {open} \"\\n\" %json {one_call} \"\\n\" {close}\n"
                )
            } else if special {
                // Text cannot spell the opener: free text up to it.
                format!(
                    "start: call{many} TEXT\nTEXT: /(.|\\n)*/\ncall: TEXT {open} \"\\n\" %json {one_call} \"\\n\" {close}\n"
                )
            } else {
                // Text runs up to the first opener; after the calls, text
                // that opens no other.
                format!(
                    "start: call{many} TAIL\nTEXT: /(.|\\n)*/\nTAIL: /(.|\\n)*/ & ~/(.|\\n)*{}(.|\\n)*/\nhead[lazy]: TEXT {open}\ncall: head \"\\n\" %json {one_call} \"\\n\" {close}\n",
                    regex_literal(OPEN)
                )
            }
        }
        (ToolSyntax::Mistral, Some((open, special))) => {
            let mut list = json!({"type": "array", "items": {"anyOf": calls}, "minItems": 1});
            if !set.parallel {
                list["maxItems"] = json!(1);
            }
            let list = layout(list);
            if forced {
                format!("start: {open} %json {list}\n")
            } else if special {
                format!("start: TEXT | {open} %json {list}\nTEXT: /(.|\\n)*/\n")
            } else {
                format!("start: TEXT | {open} %json {list}\nTEXT: /([^\\[]|\\[[^T])(.|\\n)*/\n")
            }
        }
        _ => {
            if forced {
                format!("start: %json {one_call}\n")
            } else {
                format!("start: TEXT | %json {one_call}\nTEXT: /[^{{](.|\\n)*/\n")
            }
        }
    }
}

/// `schema` with Python's JSON layout forced (see [`python_json`]).
fn layout(mut schema: Value) -> Value {
    schema["x-guidance"] = json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    });
    schema
}

/// `text` as a regular expression matching it literally.
fn regex_literal(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A piece of a reply, split into content and calls.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolPiece {
    /// Text for the user.
    Text(String),
    /// A complete call.
    Call(ToolCall),
}

/// Splits a reply into content and calls as it streams: text that may
/// still become a call is held back until it is known.
#[derive(Debug)]
pub struct ToolParser {
    syntax: ToolSyntax,
    names: Vec<String>,
    parallel: bool,
    state: State,
    held: String,
    /// Whitespace held back: shown only if text follows it.
    space: String,
    calls: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet (for syntaxes decided by the first character).
    Start,
    /// Text; may open a call.
    Text,
    /// Inside a tagged call.
    Call,
    /// A whole-reply call (JSON), read at the end.
    Whole,
    /// Text that can open no more calls.
    Rest,
}

impl ToolParser {
    /// A parser of the calls `set` allows, written in `syntax`.
    pub fn new(set: &ToolSet, syntax: ToolSyntax) -> Self {
        ToolParser {
            syntax,
            names: set.tools.iter().map(|t| t.name.clone()).collect(),
            parallel: set.parallel,
            state: match syntax {
                ToolSyntax::Hermes | ToolSyntax::Generic => State::Text,
                ToolSyntax::Llama3 | ToolSyntax::Mistral => State::Start,
            },
            held: String::new(),
            space: String::new(),
            calls: 0,
        }
    }

    /// How many calls were made.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The pieces known once `text` is added.
    pub fn push(&mut self, text: &str) -> Vec<ToolPiece> {
        let mut out = Vec::new();
        self.held.push_str(text);
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.held.trim_start();
                    let Some(first) = trimmed.chars().next() else {
                        return out;
                    };
                    let opens = match self.syntax {
                        ToolSyntax::Llama3 => first == '{' || trimmed.starts_with("<|python_tag|>"),
                        _ => {
                            first == '['
                                && (MISTRAL_OPEN.starts_with(trimmed)
                                    || trimmed.starts_with(MISTRAL_OPEN)
                                    || trimmed.starts_with("[{")
                                    || trimmed == "[")
                        }
                    };
                    self.state = if opens { State::Whole } else { State::Rest };
                }
                State::Whole => return out,
                State::Rest => {
                    let text = std::mem::take(&mut self.held);
                    self.text(text, &mut out);
                    return out;
                }
                State::Text => match self.held.find(OPEN) {
                    Some(at) => {
                        let before = self.take_held(at, OPEN.len());
                        self.text(before, &mut out);
                        self.state = State::Call;
                    }
                    None => {
                        // Keep back a tail that may be the start of an opener.
                        let keep = (1..OPEN.len())
                            .rev()
                            .find(|&n| {
                                self.held.len() >= n
                                    && self.held.is_char_boundary(self.held.len() - n)
                                    && OPEN.starts_with(&self.held[self.held.len() - n..])
                            })
                            .unwrap_or(0);
                        let text = self.take_held(self.held.len() - keep, 0);
                        self.text(text, &mut out);
                        return out;
                    }
                },
                State::Call => match self.held.find(CLOSE) {
                    Some(at) => {
                        let body = self.take_held(at, CLOSE.len());
                        match self.call(&body) {
                            Some(call) => {
                                self.space.clear();
                                out.push(ToolPiece::Call(call));
                            }
                            None => self.text(format!("{OPEN}{body}{CLOSE}"), &mut out),
                        }
                        self.state = if self.parallel {
                            State::Text
                        } else {
                            State::Rest
                        };
                    }
                    None => return out,
                },
            }
        }
    }

    /// The last pieces, at the end of the reply (after which the parser
    /// takes text only).
    pub fn finish(&mut self) -> Vec<ToolPiece> {
        let mut out = self.push("");
        let held = std::mem::take(&mut self.held);
        match std::mem::replace(&mut self.state, State::Rest) {
            // A call cut short by the end (a model may end without the closer).
            State::Call => match self.call(&held) {
                Some(call) => out.push(ToolPiece::Call(call)),
                None => self.text(format!("{OPEN}{held}"), &mut out),
            },
            State::Whole => {
                let calls = self.whole(&held);
                if calls.is_empty() {
                    self.text(held, &mut out);
                } else {
                    out.extend(calls.into_iter().map(ToolPiece::Call));
                }
            }
            _ => self.text(held, &mut out),
        }
        // Whitespace after the last call is not content.
        if self.calls == 0 && !self.space.is_empty() {
            out.push(ToolPiece::Text(std::mem::take(&mut self.space)));
        }
        out
    }

    /// The held text before `at`, taken with the `skip` bytes after it.
    fn take_held(&mut self, at: usize, skip: usize) -> String {
        let front = self.held[..at].to_string();
        self.held.drain(..at + skip);
        front
    }

    /// Emits `text`, holding back whitespace until text follows it.
    fn text(&mut self, text: String, out: &mut Vec<ToolPiece>) {
        if text.is_empty() {
            return;
        }
        if text.trim().is_empty() {
            self.space.push_str(&text);
            return;
        }
        let text = std::mem::take(&mut self.space) + &text;
        let end = text.trim_end().len();
        self.space = text[end..].to_string();
        match out.last_mut() {
            Some(ToolPiece::Text(last)) => last.push_str(&text[..end]),
            _ => out.push(ToolPiece::Text(text[..end].to_string())),
        }
    }

    /// The call in a tagged call's `body`, if it is one of the tools'.
    fn call(&mut self, body: &str) -> Option<ToolCall> {
        let value: Value = serde_json::from_str(body.trim()).ok()?;
        self.call_of(&value)
    }

    /// The call `value` describes, if it is one of the tools'.
    fn call_of(&mut self, value: &Value) -> Option<ToolCall> {
        let name = value.get("name")?.as_str()?;
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        let arguments = match value.get(self.syntax.arguments_key()) {
            Some(Value::Object(args)) => Value::Object(args.clone()),
            // Some models write the arguments as a JSON string.
            Some(Value::String(text)) => match serde_json::from_str(text) {
                Ok(Value::Object(args)) => Value::Object(args),
                _ => return None,
            },
            None => Value::Object(Map::new()),
            Some(_) => return None,
        };
        self.calls += 1;
        Some(ToolCall {
            id: call_id(),
            name: name.to_string(),
            arguments,
        })
    }

    /// The calls of a whole-reply syntax's `text`; none if it is not calls.
    fn whole(&mut self, text: &str) -> Vec<ToolCall> {
        let text = text.trim();
        let json = match self.syntax {
            ToolSyntax::Llama3 => text.strip_prefix("<|python_tag|>").unwrap_or(text),
            _ => text.strip_prefix(MISTRAL_OPEN).unwrap_or(text),
        };
        let values = match serde_json::from_str::<Value>(json.trim()) {
            Ok(Value::Array(items)) if self.syntax == ToolSyntax::Mistral => items,
            Ok(object @ Value::Object(_)) if self.syntax == ToolSyntax::Llama3 => vec![object],
            _ => return Vec::new(),
        };
        let before = self.calls;
        let calls: Option<Vec<ToolCall>> = values.iter().map(|v| self.call_of(v)).collect();
        match calls {
            Some(calls) if !calls.is_empty() && (self.parallel || calls.len() == 1) => calls,
            _ => {
                self.calls = before;
                Vec::new()
            }
        }
    }
}

/// A fresh call id: `call_` and 24 hex digits, unique in the process.
pub fn call_id() -> String {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let hash = std::collections::hash_map::RandomState::new().hash_one(n);
    format!("call_{hash:016x}{:08x}", n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("The weather in a city.".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }
    }

    fn set(choice: ToolChoice, parallel: bool) -> ToolSet {
        let time = Tool {
            name: "get_time".into(),
            description: None,
            parameters: Value::Null,
        };
        ToolSet::new(vec![weather(), time], choice, parallel).unwrap()
    }

    fn parse_in_pieces(
        syntax: ToolSyntax,
        set: &ToolSet,
        text: &str,
        cut: usize,
    ) -> Vec<ToolPiece> {
        let mut parser = ToolParser::new(set, syntax);
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut at = cut.min(rest.len());
            while !rest.is_char_boundary(at) {
                at += 1;
            }
            out.extend(parser.push(&rest[..at]));
            rest = &rest[at..];
        }
        out.extend(parser.finish());
        // Join adjacent texts: how text is cut into pieces may differ.
        let mut joined: Vec<ToolPiece> = Vec::new();
        for piece in out {
            match (joined.last_mut(), piece) {
                (Some(ToolPiece::Text(a)), ToolPiece::Text(b)) => a.push_str(&b),
                (_, piece) => joined.push(piece),
            }
        }
        joined
    }

    /// Parses `text` whole and cut at every size: the same pieces.
    fn parse(syntax: ToolSyntax, set: &ToolSet, text: &str) -> Vec<ToolPiece> {
        let whole = parse_in_pieces(syntax, set, text, usize::MAX);
        for cut in 1..text.len() {
            let cut_up = parse_in_pieces(syntax, set, text, cut);
            let strip = |p: &[ToolPiece]| -> Vec<ToolPiece> {
                p.iter()
                    .map(|p| match p {
                        ToolPiece::Call(c) => ToolPiece::Call(ToolCall {
                            id: String::new(),
                            ..c.clone()
                        }),
                        t => t.clone(),
                    })
                    .collect()
            };
            assert_eq!(strip(&whole), strip(&cut_up), "cut at {cut}: {text:?}");
        }
        whole
    }

    fn call_names(pieces: &[ToolPiece]) -> Vec<(String, Value)> {
        pieces
            .iter()
            .filter_map(|p| match p {
                ToolPiece::Call(c) => Some((c.name.clone(), c.arguments.clone())),
                ToolPiece::Text(_) => None,
            })
            .collect()
    }

    fn texts(pieces: &[ToolPiece]) -> String {
        pieces
            .iter()
            .filter_map(|p| match p {
                ToolPiece::Text(t) => Some(t.as_str()),
                ToolPiece::Call(_) => None,
            })
            .collect()
    }

    #[test]
    fn tool_sets_are_checked() {
        assert!(ToolSet::new(vec![], ToolChoice::Auto, true).is_err());
        let mut bad = weather();
        bad.name = "get weather".into();
        assert!(ToolSet::new(vec![bad], ToolChoice::Auto, true).is_err());
        assert!(ToolSet::new(vec![weather(), weather()], ToolChoice::Auto, true).is_err());
        let e = ToolSet::new(vec![weather()], ToolChoice::Function("nope".into()), true);
        assert!(e.unwrap_err().contains("nope"));
        let mut list = weather();
        list.parameters = json!([1]);
        assert!(ToolSet::new(vec![list], ToolChoice::Auto, true).is_err());
        let s = set(ToolChoice::Auto, true);
        assert_eq!(
            s.tools()[1].parameters,
            json!({"type": "object", "properties": {}})
        );
    }

    #[test]
    fn tagged_calls_are_split_from_text_however_the_text_is_cut() {
        let s = set(ToolChoice::Auto, true);
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n";
        let pieces = parse(ToolSyntax::Hermes, &s, text);
        assert_eq!(texts(&pieces), "Let me check.");
        assert_eq!(
            call_names(&pieces),
            vec![
                ("get_weather".into(), json!({"city": "Paris"})),
                ("get_time".into(), json!({}))
            ]
        );
        // Text that only looks like an opener's start is kept.
        let pieces = parse(ToolSyntax::Generic, &s, "a < b <tool_ c");
        assert_eq!(pieces, vec![ToolPiece::Text("a < b <tool_ c".into())]);
        // A call of an unknown function, or broken JSON, stays text.
        let odd = "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}\n</tool_call>";
        assert_eq!(texts(&parse(ToolSyntax::Hermes, &s, odd)), odd);
        let broken = "<tool_call>\n{\"name\": \"get_time\", \"argu";
        assert_eq!(texts(&parse(ToolSyntax::Hermes, &s, broken)), broken);
        // A call the end cut before its closer still counts.
        let open = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}";
        assert_eq!(call_names(&parse(ToolSyntax::Hermes, &s, open)).len(), 1);
    }

    #[test]
    fn one_call_only_when_not_parallel() {
        let s = set(ToolChoice::Auto, false);
        let two = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let pieces = parse(ToolSyntax::Hermes, &s, two);
        assert_eq!(call_names(&pieces).len(), 1);
        assert!(texts(&pieces).trim_start().starts_with("<tool_call>"));
    }

    #[test]
    fn whole_reply_syntaxes() {
        let s = set(ToolChoice::Auto, true);
        let llama = " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        assert_eq!(
            call_names(&parse(ToolSyntax::Llama3, &s, llama)),
            vec![("get_weather".into(), json!({"city": "Oslo"}))]
        );
        let prose = "It is {sunny} today.";
        assert_eq!(texts(&parse(ToolSyntax::Llama3, &s, prose)), prose);
        let mistral = "[TOOL_CALLS][{\"name\": \"get_time\", \"arguments\": {}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]";
        assert_eq!(
            call_names(&parse(ToolSyntax::Mistral, &s, mistral)).len(),
            2
        );
        // The opener may be a control token the text does not show.
        let bare = "[{\"name\": \"get_time\", \"arguments\": {}}]";
        assert_eq!(call_names(&parse(ToolSyntax::Mistral, &s, bare)).len(), 1);
        let list = "[1, 2] are numbers";
        assert_eq!(texts(&parse(ToolSyntax::Mistral, &s, list)), list);
    }

    #[test]
    fn generic_messages_write_out_the_tools_calls_and_results() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        };
        let mut asked = ChatMessage::new("assistant", "");
        asked.tool_calls = vec![call];
        let mut result = ChatMessage::new("tool", "{\"temp\": 21}");
        result.tool_call_id = Some("call_1".into());
        let messages = vec![
            ChatMessage::new("user", "Weather in Paris?"),
            asked,
            result.clone(),
            result,
        ];
        let out = generic_messages(&messages, &[weather()], true);
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].content.contains("\"name\": \"get_weather\""));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        );
        assert_eq!(
            out[3].content,
            "<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n{\"temp\": 21}\n</tool_response>"
        );
        assert!(out.iter().all(|m| m.tool_calls.is_empty()));
        let out = generic_messages(&messages, &[weather()], false);
        assert_eq!(out[0].role, "user");
        assert!(out[0].content.starts_with("# Tools") && out[0].content.ends_with("Paris?"));
    }

    #[test]
    fn syntaxes_are_told_apart() {
        assert_eq!(ToolSyntax::detect("{{ messages }}"), ToolSyntax::Generic);
        assert_eq!(
            ToolSyntax::detect("{% if tools %}<tool_call>{{ tool_call.arguments }}{% endif %}"),
            ToolSyntax::Hermes
        );
        assert_eq!(
            ToolSyntax::detect("{% if tools %}[TOOL_CALLS][{% endif %}"),
            ToolSyntax::Mistral
        );
        assert_eq!(
            ToolSyntax::detect("{% if tools %}<|start_header_id|>\"parameters\"{% endif %}"),
            ToolSyntax::Llama3
        );
        assert_eq!(
            ToolSyntax::detect("{% if tools %}<tool_call><function=x>{% endif %}"),
            ToolSyntax::Generic
        );
    }
}
