//! `extract`: finds a JSON object in free text (such as a model's answer,
//! with prose or ```json fences around it) and validates it against a small schema.
//!
//! Input:  `{"text": "...", "schema": {"name": "string", "age": "integer", "tags": "array?"}}`
//!         Types: string, number, integer, boolean, array, object, any; a trailing `?` marks a field optional.
//! Output: `{"found": true, "valid": true, "value": {...}, "errors": []}`

use serde_json::{Map, Value, json};

wit_bindgen::generate!({ path: "../../../wit", world: "step" });

use realm::inference::log::{Level, log};

struct Extract;

impl Guest for Extract {
    fn run(input: String) -> Result<String, String> {
        let input: Value =
            serde_json::from_str(&input).map_err(|e| format!("input is not JSON: {e}"))?;
        let text = input
            .get("text")
            .and_then(Value::as_str)
            .ok_or("input needs a string field `text`")?;
        let schema = match input.get("schema") {
            None => Map::new(),
            Some(Value::Object(schema)) => schema.clone(),
            Some(_) => return Err("`schema` must be an object of field name -> type".into()),
        };
        let Some(value) = find_object(text) else {
            log(Level::Info, "no JSON object found in text");
            return Ok(json!({"found": false, "valid": false, "value": null,
                             "errors": ["no JSON object found in the text"]})
            .to_string());
        };
        let errors = validate(&value, &schema)?;
        Ok(
            json!({"found": true, "valid": errors.is_empty(), "value": value, "errors": errors})
                .to_string(),
        )
    }
}

/// The first balanced `{...}` in `text` that parses as a JSON object.
fn find_object(text: &str) -> Option<Value> {
    let bytes = text.as_bytes();
    let mut search_from = 0;
    while let Some(offset) = text[search_from..].find('{') {
        let start = search_from + offset;
        if let Some(end) = matching_brace(&bytes[start..])
            && let Ok(value @ Value::Object(_)) =
                serde_json::from_str(&text[start..start + end + 1])
        {
            return Some(value);
        }
        search_from = start + 1;
    }
    None
}

/// Index of the brace closing the one at `bytes[0]`, skipping strings.
fn matching_brace(bytes: &[u8]) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn validate(value: &Value, schema: &Map<String, Value>) -> Result<Vec<String>, String> {
    let mut errors = Vec::new();
    for (field, ty) in schema {
        let ty = ty.as_str().ok_or_else(|| {
            format!("schema type of `{field}` must be a string such as \"integer\"")
        })?;
        let (ty, optional) = match ty.strip_suffix('?') {
            Some(t) => (t, true),
            None => (ty, false),
        };
        let Some(v) = value.get(field) else {
            if !optional {
                errors.push(format!("missing field `{field}`"));
            }
            continue;
        };
        let ok = match ty {
            "string" => v.is_string(),
            "number" => v.is_number(),
            "integer" => v.is_i64() || v.is_u64(),
            "boolean" => v.is_boolean(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            "any" => true,
            other => return Err(format!("unknown schema type `{other}` for `{field}`")),
        };
        if !ok {
            errors.push(format!("field `{field}` should be {ty}, got {v}"));
        }
    }
    Ok(errors)
}

export!(Extract);
