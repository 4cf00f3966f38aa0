//! `{{ path }}` templates in pipeline strings.
//!
//! A string that is exactly one placeholder (`"{{ steps.a.output }}"`) takes
//! the referenced JSON value as is, keeping its type; placeholders mixed with
//! text are interpolated, with non-string values written as compact JSON.

use std::fmt;

use serde_json::Value;

/// One step of a reference path: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// `.name`
    Key(String),
    /// `.0`
    Index(usize),
}

/// A dotted path such as `steps.summary.text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The segments, first one being the root (`inputs` or `steps`).
    pub segments: Vec<Segment>,
}

impl Reference {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty placeholder `{{ }}`".into());
        }
        let mut segments = Vec::new();
        for part in text.split('.') {
            if part.is_empty() {
                return Err(format!("malformed reference `{text}`: empty segment"));
            }
            if part.bytes().all(|b| b.is_ascii_digit()) {
                let index = part
                    .parse()
                    .map_err(|_| format!("index `{part}` in `{text}` is too large"))?;
                segments.push(Segment::Index(index));
            } else if part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                segments.push(Segment::Key(part.to_string()));
            } else {
                return Err(format!(
                    "malformed reference `{text}`: `{part}` is not a name (letters, digits, `_`, `-`) or an index"
                ));
            }
        }
        if !matches!(segments[0], Segment::Key(_)) {
            return Err(format!("reference `{text}` must start with a name"));
        }
        Ok(Reference { segments })
    }

    /// The key at position `i`, if that segment is a key.
    pub fn key(&self, i: usize) -> Option<&str> {
        match self.segments.get(i) {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// Looks the reference up in `scope`.
    pub fn resolve<'v>(&self, scope: &'v Value) -> Result<&'v Value, String> {
        let mut value = scope;
        for (i, segment) in self.segments.iter().enumerate() {
            let next = match (segment, value) {
                (Segment::Key(k), Value::Object(map)) => map.get(k),
                (Segment::Index(n), Value::Array(items)) => items.get(*n),
                _ => None,
            };
            value = next.ok_or_else(|| {
                let prefix = Reference {
                    segments: self.segments[..i].to_vec(),
                };
                format!(
                    "`{self}`: `{prefix}` is {} and has no {}",
                    describe(value),
                    match segment {
                        Segment::Key(k) => format!("field `{k}`"),
                        Segment::Index(n) => format!("item {n}"),
                    }
                )
            })?;
        }
        Ok(value)
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(_) => "a number".into(),
        Value::String(_) => "a string".into(),
        Value::Array(items) => format!("an array of {} items", items.len()),
        Value::Object(_) => "an object".into(),
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            match segment {
                Segment::Key(k) => f.write_str(k)?,
                Segment::Index(n) => write!(f, "{n}")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Ref(Reference),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`, reporting unbalanced braces and malformed references.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed `{{{{` in template `{text}`"))?;
            parts.push(Part::Ref(Reference::parse(&after[..close])?));
            rest = &after[close + 2..];
        }
        if rest.contains("}}") {
            return Err(format!("`}}}}` without `{{{{` in template `{text}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The references this template reads.
    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.parts.iter().filter_map(|p| match p {
            Part::Ref(r) => Some(r),
            Part::Text(_) => None,
        })
    }

    /// Fills the template from `scope`.
    pub fn render(&self, scope: &Value) -> Result<Value, String> {
        if let [Part::Ref(r)] = self.parts.as_slice() {
            return r.resolve(scope).cloned();
        }
        Ok(Value::String(self.render_text(scope)?))
    }

    /// Fills the template from `scope`, always producing text.
    pub fn render_text(&self, scope: &Value) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Ref(r) => match r.resolve(scope)? {
                    Value::String(s) => out.push_str(s),
                    other => out.push_str(&other.to_string()),
                },
            }
        }
        Ok(out)
    }
}

/// A TOML value whose strings may hold templates, rendered to JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueTemplate {
    /// A value with no placeholders.
    Literal(Value),
    /// A string with placeholders.
    Text(Template),
    /// An array with at least one templated item.
    Array(Vec<ValueTemplate>),
    /// A table with at least one templated value.
    Object(Vec<(String, ValueTemplate)>),
}

impl ValueTemplate {
    /// Parses every string inside `value` as a template.
    pub fn from_toml(value: &toml::Value) -> Result<Self, String> {
        Ok(match value {
            toml::Value::String(s) if s.contains("{{") || s.contains("}}") => {
                ValueTemplate::Text(Template::parse(s)?)
            }
            toml::Value::String(_)
            | toml::Value::Integer(_)
            | toml::Value::Float(_)
            | toml::Value::Boolean(_)
            | toml::Value::Datetime(_) => ValueTemplate::Literal(toml_to_json(value)?),
            toml::Value::Array(items) => ValueTemplate::Array(
                items
                    .iter()
                    .map(Self::from_toml)
                    .collect::<Result<_, _>>()?,
            ),
            toml::Value::Table(table) => ValueTemplate::Object(
                table
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Self::from_toml(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }

    /// Every reference inside this value.
    pub fn references(&self) -> Vec<&Reference> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Reference>) {
        match self {
            ValueTemplate::Literal(_) => {}
            ValueTemplate::Text(t) => out.extend(t.references()),
            ValueTemplate::Array(items) => items.iter().for_each(|i| i.collect(out)),
            ValueTemplate::Object(fields) => fields.iter().for_each(|(_, v)| v.collect(out)),
        }
    }

    /// Renders to JSON, filling placeholders from `scope`.
    pub fn render(&self, scope: &Value) -> Result<Value, String> {
        Ok(match self {
            ValueTemplate::Literal(v) => v.clone(),
            ValueTemplate::Text(t) => t.render(scope)?,
            ValueTemplate::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| i.render(scope))
                    .collect::<Result<_, _>>()?,
            ),
            ValueTemplate::Object(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(scope)?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

/// Converts a TOML value to JSON (datetimes become strings).
pub fn toml_to_json(value: &toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| format!("{f} cannot be represented in JSON"))?,
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => {
            Value::Array(items.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(table) => Value::Object(
            table
                .iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_placeholder_keeps_type_and_mixed_text_interpolates() {
        let scope = json!({"inputs": {"n": 3, "s": "hi", "list": [1, {"a": "x"}]}});
        assert_eq!(
            Template::parse("{{ inputs.n }}")
                .unwrap()
                .render(&scope)
                .unwrap(),
            json!(3)
        );
        assert_eq!(
            Template::parse("n={{inputs.n}}, s={{ inputs.s }}!")
                .unwrap()
                .render(&scope)
                .unwrap(),
            json!("n=3, s=hi!")
        );
        assert_eq!(
            Template::parse("{{ inputs.list.1.a }}")
                .unwrap()
                .render(&scope)
                .unwrap(),
            json!("x")
        );
    }

    #[test]
    fn reports_malformed_templates() {
        assert!(
            Template::parse("{{ inputs.x")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(Template::parse("x }}").unwrap_err().contains("without"));
        assert!(Template::parse("{{ }}").unwrap_err().contains("empty"));
        assert!(
            Template::parse("{{ a..b }}")
                .unwrap_err()
                .contains("empty segment")
        );
        assert!(
            Template::parse("{{ a b }}")
                .unwrap_err()
                .contains("not a name")
        );
        assert!(
            Template::parse("{{ 0.a }}")
                .unwrap_err()
                .contains("start with a name")
        );
    }

    #[test]
    fn missing_fields_are_explained() {
        let scope = json!({"inputs": {"s": "hi"}});
        let err = Template::parse("{{ inputs.s.len }}")
            .unwrap()
            .render(&scope)
            .unwrap_err();
        assert_eq!(
            err,
            "`inputs.s.len`: `inputs.s` is a string and has no field `len`"
        );
    }

    #[test]
    fn value_templates_render_nested() {
        let value: toml::Value =
            toml::from_str("a = \"{{ inputs.s }}\"\nb = [1, \"x{{inputs.s}}\"]").unwrap();
        let t = ValueTemplate::from_toml(&value).unwrap();
        assert_eq!(t.references().len(), 2);
        let out = t.render(&json!({"inputs": {"s": "hi"}})).unwrap();
        assert_eq!(out, json!({"a": "hi", "b": [1, "xhi"]}));
    }
}
