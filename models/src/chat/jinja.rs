//! The Jinja environment chat templates are written for: Hugging Face's
//! `apply_chat_template` conventions (`trim_blocks`, `lstrip_blocks`,
//! `raise_exception`, `strftime_now`, and a `tojson` that writes JSON as
//! Python's `json.dumps` does), on minijinja with Python's string methods.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

/// A civil date and time (UTC) for `strftime_now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Year, e.g. 2026.
    pub year: i32,
    /// Month, 1–12.
    pub month: u32,
    /// Day of the month, 1–31.
    pub day: u32,
    /// Hour, 0–23.
    pub hour: u32,
    /// Minute, 0–59.
    pub minute: u32,
    /// Second, 0–59.
    pub second: u32,
}

impl DateTime {
    /// The current time, UTC.
    pub fn now() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self::from_unix(secs)
    }

    /// The time `secs` seconds after 1970-01-01T00:00:00Z.
    pub fn from_unix(secs: u64) -> Self {
        let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
        // Howard Hinnant's days-to-civil algorithm.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        DateTime {
            year,
            month,
            day,
            hour: (rest / 3600) as u32,
            minute: (rest / 60 % 60) as u32,
            second: (rest % 60) as u32,
        }
    }

    /// Day of the week, 0 = Monday.
    fn weekday(&self) -> usize {
        // Sakamoto's method (0 = Sunday), shifted to Monday first.
        const T: [i32; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
        let y = if self.month < 3 {
            self.year - 1
        } else {
            self.year
        };
        let sunday_first =
            (y + y / 4 - y / 100 + y / 400 + T[self.month as usize - 1] + self.day as i32) % 7;
        ((sunday_first + 6) % 7) as usize
    }

    /// The time written by the C `strftime` directives Python supports
    /// (in the C locale); an unknown directive is an error.
    pub fn format(&self, fmt: &str) -> Result<String, Error> {
        const MONTHS: [&str; 12] = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ];
        const DAYS: [&str; 7] = [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday",
        ];
        let month = MONTHS[self.month as usize - 1];
        let weekday = DAYS[self.weekday()];
        let mut out = String::new();
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('Y') => out.push_str(&self.year.to_string()),
                Some('y') => out.push_str(&format!("{:02}", self.year.rem_euclid(100))),
                Some('m') => out.push_str(&format!("{:02}", self.month)),
                Some('d') => out.push_str(&format!("{:02}", self.day)),
                Some('e') => out.push_str(&format!("{:2}", self.day)),
                Some('B') => out.push_str(month),
                Some('b') | Some('h') => out.push_str(&month[..3]),
                Some('A') => out.push_str(weekday),
                Some('a') => out.push_str(&weekday[..3]),
                Some('H') => out.push_str(&format!("{:02}", self.hour)),
                Some('M') => out.push_str(&format!("{:02}", self.minute)),
                Some('S') => out.push_str(&format!("{:02}", self.second)),
                Some('%') => out.push('%'),
                other => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "strftime_now: unsupported directive `%{}`",
                            other.map(String::from).unwrap_or_default()
                        ),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// A Jinja environment with Hugging Face's conventions; `strftime_now`
/// reads `now`.
pub(crate) fn environment(now: DateTime) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", move |fmt: String| now.format(&fmt));
    env.add_filter("tojson", tojson);
    env
}

/// `value` as Python's `json.dumps(value, ensure_ascii=False, indent=...)`
/// writes it: `", "` and `": "` between items, or one per line with `indent`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    level: usize,
    out: &mut String,
) -> Result<(), Error> {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(value.clone()) {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float(f));
            }
        }
        ValueKind::String => write_string(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                write_json(item, indent, sort_keys, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(separator);
                }
                newline(out, level + 1);
                write_string(&key.to_string(), out);
                out.push_str(": ");
                write_json(&value.get_item(key)?, indent, sort_keys, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot write a {} as JSON", value.kind()),
            ));
        }
    }
    Ok(())
}

/// A float as Python's `repr` writes it (`1.0`, `0.5`, `1e+20`).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f.fract() == 0.0 && f.abs() < 1e16 {
        return format!("{f:.1}");
    }
    let shortest = format!("{f}");
    if f.abs() >= 1e16 || (f != 0.0 && f.abs() < 1e-4) {
        // Python switches to exponents here: `1e+20`, `1e-05`.
        let e = format!("{f:e}");
        if let Some((mantissa, exp)) = e.split_once('e')
            && let Ok(exp) = exp.parse::<i32>()
        {
            let sign = if exp < 0 { '-' } else { '+' };
            return format!("{mantissa}e{sign}{:02}", exp.abs());
        }
    }
    shortest
}

/// `s` as a JSON string, escaped as Python's `json.dumps` with
/// `ensure_ascii=False` escapes it.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: Value) -> Result<String, Error> {
        let env = environment(DateTime::from_unix(1_796_592_600));
        env.render_str(source, ctx)
    }

    #[test]
    fn dates_format_like_python() {
        // 2026-12-06T21:30:00Z, a Sunday.
        let t = DateTime::from_unix(1_796_592_600);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute),
            (2026, 12, 6, 21, 30)
        );
        assert_eq!(t.format("%d %b %Y").unwrap(), "06 Dec 2026");
        assert_eq!(
            t.format("%A, %B %e %H:%M:%S %%").unwrap(),
            "Sunday, December  6 21:30:00 %"
        );
        assert_eq!(
            DateTime::from_unix(951_782_400)
                .format("%Y-%m-%d %a")
                .unwrap(),
            "2000-02-29 Tue"
        );
        assert!(t.format("%Q").is_err());
    }

    #[test]
    fn tojson_writes_like_python() {
        let ctx = minijinja::context! { x => serde_json::json!({"a": null, "b": [1, 2.5, "é\n\"q\""], "e": {}, "t": true}) };
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()).unwrap(),
            r#"{"a": null, "b": [1, 2.5, "é\n\"q\""], "e": {}, "t": true}"#
        );
        assert_eq!(
            render("{{ x.b | tojson(indent=2) }}", ctx).unwrap(),
            "[\n  1,\n  2.5,\n  \"é\\n\\\"q\\\"\"\n]"
        );
        assert_eq!(python_float(1e20), "1e+20");
        assert_eq!(python_float(0.00001), "1e-05");
        assert_eq!(python_float(3.0), "3.0");
    }

    #[test]
    fn raise_exception_fails_the_render_with_its_message() {
        let err = render("{{ raise_exception('no system role') }}", Value::UNDEFINED).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }
}
