//! The one owner of the generation rules: what a caller may ask for (every
//! field optional) and the checked [`GenerateParams`] the batcher runs.
//!
//! The WIT host, pipelines and the server all build their requests here, so
//! a temperature refused by one is refused by all, with the same words.

use super::sampler::SamplingParams;

/// Most stop strings one generation may have.
pub const MAX_STOP_STRINGS: usize = 16;
/// Most bytes in one stop string.
pub const MAX_STOP_BYTES: usize = 256;
/// Highest temperature accepted: beyond it sampling is uniform noise.
pub const MAX_TEMPERATURE: f32 = 10.0;
/// Highest repeat penalty accepted.
pub const MAX_REPEAT_PENALTY: f32 = 10.0;
/// Presence and frequency penalties lie in `-2..=2`, as OpenAI's do.
pub const MAX_COUNT_PENALTY: f32 = 2.0;
/// New tokens when a request does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// A generation as a caller asks for it; absent fields take the defaults of
/// [`SamplingParams::default`] and [`DEFAULT_MAX_TOKENS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens (at least 1).
    pub max_tokens: Option<u32>,
    /// Softmax temperature in `0..=10`; 0 is greedy.
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: Option<u32>,
    /// Nucleus cut in `(0, 1]`; 1 keeps all.
    pub top_p: Option<f32>,
    /// Min-p cut in `[0, 1]`; 0 keeps all.
    pub min_p: Option<f32>,
    /// Repeat penalty in `(0, 10]`; 1 disables.
    pub repeat_penalty: Option<f32>,
    /// OpenAI's presence penalty in `-2..=2`; 0 disables.
    pub presence_penalty: Option<f32>,
    /// OpenAI's frequency penalty in `-2..=2`; 0 disables.
    pub frequency_penalty: Option<f32>,
    /// Seed; a random one when absent.
    pub seed: Option<u64>,
    /// Generation ends before any of these strings.
    pub stop: Vec<String>,
}

/// A generation request that breaks a rule: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidParams(String);

/// What to generate, checked.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most new tokens.
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Generation ends before any of these strings.
    pub stop: Vec<String>,
}

impl GenerateOptions {
    /// Checks every rule and fills in the defaults.
    pub fn check(&self) -> Result<GenerateParams, InvalidParams> {
        let d = SamplingParams::default();
        let bad = |m: String| Err(InvalidParams(m));
        let max_tokens = self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        let temperature = self.temperature.unwrap_or(d.temperature);
        if !(0.0..=MAX_TEMPERATURE).contains(&temperature) {
            return bad(format!(
                "temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}"
            ));
        }
        let top_p = self.top_p.unwrap_or(d.top_p);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {top_p}"));
        }
        let min_p = self.min_p.unwrap_or(d.min_p);
        if !(0.0..=1.0).contains(&min_p) {
            return bad(format!("min_p must be in [0, 1], got {min_p}"));
        }
        let repeat_penalty = self.repeat_penalty.unwrap_or(d.repeat_penalty);
        if !(repeat_penalty > 0.0 && repeat_penalty <= MAX_REPEAT_PENALTY) {
            return bad(format!(
                "repeat_penalty must be in (0, {MAX_REPEAT_PENALTY}], got {repeat_penalty}"
            ));
        }
        let count_penalty = |name: &str, value: Option<f32>| match value.unwrap_or(0.0) {
            v if (-MAX_COUNT_PENALTY..=MAX_COUNT_PENALTY).contains(&v) => Ok(v),
            v => Err(InvalidParams(format!(
                "{name} must be between -{MAX_COUNT_PENALTY} and {MAX_COUNT_PENALTY}, got {v}"
            ))),
        };
        let presence_penalty = count_penalty("presence_penalty", self.presence_penalty)?;
        let frequency_penalty = count_penalty("frequency_penalty", self.frequency_penalty)?;
        check_stops(&self.stop).map_err(InvalidParams)?;
        Ok(GenerateParams {
            max_tokens: max_tokens as usize,
            sampling: SamplingParams {
                temperature,
                top_k: self.top_k.map_or(d.top_k, |k| k as usize),
                top_p,
                min_p,
                repeat_penalty,
                repeat_window: d.repeat_window,
                presence_penalty,
                frequency_penalty,
                seed: SamplingParams::seed_or_random(self.seed),
            },
            stop: self.stop.clone(),
        })
    }
}

/// Checks stop strings against the bounds every caller shares: at most
/// [`MAX_STOP_STRINGS`], each non-empty and at most [`MAX_STOP_BYTES`].
fn check_stops(stop: &[String]) -> Result<(), String> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(format!(
            "{} stop strings; at most {MAX_STOP_STRINGS} are allowed",
            stop.len()
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err("stop strings must not be empty".into());
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(format!(
            "a stop string has {} bytes; at most {MAX_STOP_BYTES} are allowed",
            long.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(options: GenerateOptions) -> String {
        options.check().expect_err("refused").to_string()
    }

    #[test]
    fn defaults_fill_absent_fields() {
        let p = GenerateOptions {
            seed: Some(3),
            ..Default::default()
        }
        .check()
        .unwrap();
        assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS as usize);
        assert_eq!(
            p.sampling,
            SamplingParams {
                seed: 3,
                ..SamplingParams::default()
            }
        );
    }

    #[test]
    fn every_rule_is_enforced_with_a_message_naming_the_field() {
        let cases: [(GenerateOptions, &str); 10] = [
            (
                GenerateOptions {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                "max_tokens must be at least 1",
            ),
            (
                GenerateOptions {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
                "temperature must be between 0 and 10, got -1",
            ),
            (
                GenerateOptions {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerateOptions {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p must be in (0, 1], got 0",
            ),
            (
                GenerateOptions {
                    min_p: Some(1.5),
                    ..Default::default()
                },
                "min_p must be in [0, 1], got 1.5",
            ),
            (
                GenerateOptions {
                    repeat_penalty: Some(0.0),
                    ..Default::default()
                },
                "repeat_penalty must be in (0, 10], got 0",
            ),
            (
                GenerateOptions {
                    presence_penalty: Some(2.5),
                    ..Default::default()
                },
                "presence_penalty must be between -2 and 2, got 2.5",
            ),
            (
                GenerateOptions {
                    frequency_penalty: Some(f32::NAN),
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                GenerateOptions {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop strings must not be empty",
            ),
            (
                GenerateOptions {
                    stop: vec!["x".repeat(MAX_STOP_BYTES + 1)],
                    ..Default::default()
                },
                "at most 256 are allowed",
            ),
        ];
        for (options, message) in cases {
            let got = refused(options);
            assert!(got.contains(message), "{got:?} lacks {message:?}");
        }
    }

    #[test]
    fn the_bounds_themselves_are_accepted() {
        let p = GenerateOptions {
            max_tokens: Some(1),
            temperature: Some(MAX_TEMPERATURE),
            top_p: Some(1.0),
            min_p: Some(0.0),
            repeat_penalty: Some(MAX_REPEAT_PENALTY),
            presence_penalty: Some(-MAX_COUNT_PENALTY),
            frequency_penalty: Some(MAX_COUNT_PENALTY),
            stop: vec!["s".repeat(MAX_STOP_BYTES); MAX_STOP_STRINGS],
            ..Default::default()
        };
        assert!(p.check().is_ok());
    }
}
