//! Hyperparameters of the supported architectures, read from GGUF metadata.

use crate::gguf::{GgufError, GgufFile};

/// How rotary position embeddings pair up dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)` (llama.cpp's "norm"; GGUF llama weights are permuted for it).
    Interleaved,
    /// Halves `(i, i + d/2)` (llama.cpp's "neox").
    Halves,
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU-gated (llama).
    Silu,
    /// GELU-gated, tanh approximation (gemma).
    GeluTanh,
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `general.architecture`: `llama` or `gemma3`.
    pub architecture: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    /// Rope base of global-attention layers.
    pub rope_base: f32,
    /// Rope base of sliding-window layers.
    pub rope_base_local: f32,
    /// Dimensions of each head that rotate.
    pub rope_dims: usize,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    /// Embeddings are multiplied by this (gemma: sqrt(n_embd)).
    pub embed_scale: f32,
    /// Queries are multiplied by this before attention.
    pub query_scale: f32,
    /// Per-head RMS norms on queries and keys (gemma3).
    pub qk_norm: bool,
    /// Extra RMS norms after attention and feed-forward (gemma).
    pub post_norms: bool,
    /// Sliding-window size, for layers that use one.
    pub sliding_window: Option<usize>,
    /// Every `n`th layer (the last of each group) attends globally; the
    /// others use the window. 0: every layer uses it (Mistral).
    pub sliding_window_pattern: usize,
    /// Attention scores are squashed to `(-cap, cap)` by `cap·tanh(s/cap)` (gemma2).
    pub attn_softcap: Option<f32>,
    /// Logits are squashed the same way (gemma2).
    pub final_softcap: Option<f32>,
    /// Positions are multiplied by this before rotating (linear rope scaling).
    pub rope_freq_scale: f32,
    /// Rotated values are multiplied by this (`rope.scaling.attn_factor`).
    pub rope_attn_factor: f32,
}

/// The architectures Realm runs, by `general.architecture`.
pub const ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"];

impl ModelConfig {
    /// Reads the configuration of `file`, or says what is missing or unsupported.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, GgufError> {
        let arch = file.get_str("general.architecture")?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let get = |k: &str| file.get_u64(&key(k)).map(|v| v as usize);
        let n_embd = get("embedding_length")?;
        let n_head = get("attention.head_count")?;
        let n_head_kv = get("attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(GgufError::Malformed(format!(
                "{n_head} heads cannot share {n_head_kv} key/value heads"
            )));
        }
        let head_dim = get("attention.key_length").unwrap_or(n_embd / n_head);
        let vocab_size = match get("vocab_size") {
            Ok(v) => v,
            Err(_) => file.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_base = file.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0) as f32;
        let rope_freq_scale = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            None | Some("none") => 1.0,
            Some("linear") => {
                let factor = file.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0) as f32;
                if !(factor > 0.0 && factor.is_finite()) {
                    return Err(GgufError::Malformed(format!(
                        "rope scaling factor {factor} must be positive"
                    )));
                }
                1.0 / factor
            }
            Some(other) => {
                return Err(GgufError::Malformed(format!(
                    "rope scaling `{other}` is not supported (supported: none, linear, and \
                     per-dimension factors in `rope_freqs.weight`)"
                )));
            }
        };
        let common = ModelConfig {
            n_layer: get("block_count")?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: get("feed_forward_length")?,
            vocab_size,
            context_length: get("context_length").unwrap_or(2048),
            rms_eps: file
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            rope_base,
            rope_base_local: rope_base,
            rope_dims: get("rope.dimension_count").unwrap_or(head_dim),
            rope_style: RopeStyle::Interleaved,
            activation: Activation::Silu,
            embed_scale: 1.0,
            query_scale: 1.0 / (head_dim as f32).sqrt(),
            qk_norm: false,
            post_norms: false,
            sliding_window: None,
            sliding_window_pattern: 1,
            attn_softcap: None,
            final_softcap: None,
            rope_freq_scale,
            rope_attn_factor: file
                .get_f64(&key("rope.scaling.attn_factor"))
                .unwrap_or(1.0) as f32,
            architecture: arch.clone(),
        };
        let softcap = |k: &str, default: f64| file.get_f64(&key(k)).unwrap_or(default) as f32;
        let config = match arch.as_str() {
            // Mistral-style files window every layer.
            "llama" => ModelConfig {
                sliding_window: get("attention.sliding_window").ok(),
                sliding_window_pattern: 0,
                ..common
            },
            // Q/K/V biases, where a file has them, are found by the loader.
            "qwen2" | "phi3" => ModelConfig {
                rope_style: RopeStyle::Halves,
                ..common
            },
            "qwen3" => ModelConfig {
                rope_style: RopeStyle::Halves,
                qk_norm: true,
                ..common
            },
            "gemma2" => ModelConfig {
                rope_style: RopeStyle::Halves,
                rope_base_local: file
                    .get_f64(&key("rope.freq_base_swa"))
                    .map_or(rope_base, |v| v as f32),
                activation: Activation::GeluTanh,
                embed_scale: (n_embd as f32).sqrt(),
                // Gemma 2 27B (46 layers) scales by the model's width per head.
                query_scale: match get("block_count")? {
                    46 => 1.0 / ((n_embd / n_head) as f32).sqrt(),
                    _ => common.query_scale,
                },
                post_norms: true,
                sliding_window: Some(get("attention.sliding_window").unwrap_or(4096)),
                sliding_window_pattern: 2,
                attn_softcap: Some(softcap("attn_logit_softcapping", 50.0)),
                final_softcap: Some(softcap("final_logit_softcapping", 30.0)),
                ..common
            },
            "gemma3" => ModelConfig {
                rope_base_local: 10_000.0,
                rope_style: RopeStyle::Halves,
                activation: Activation::GeluTanh,
                embed_scale: (n_embd as f32).sqrt(),
                // Gemma 3 27B (62 layers) scales by the model's width per
                // head, as llama.cpp does (its head size is 128, not 168).
                query_scale: match get("block_count")? {
                    62 => 1.0 / ((n_embd / n_head) as f32).sqrt(),
                    _ => common.query_scale,
                },
                qk_norm: true,
                post_norms: true,
                sliding_window: get("attention.sliding_window").ok(),
                sliding_window_pattern: 6,
                ..common
            },
            other => {
                return Err(GgufError::Malformed(format!(
                    "architecture `{other}` is not supported (supported: {})",
                    ARCHITECTURES.join(", ")
                )));
            }
        };
        if config.head_dim == 0 || config.n_embd == 0 {
            return Err(GgufError::Malformed(format!(
                "head dimension {} and embedding length {} must be positive",
                config.head_dim, config.n_embd
            )));
        }
        if config.sliding_window == Some(0) {
            return Err(GgufError::Malformed(
                "a sliding window of 0 tokens would let no token see any other".into(),
            ));
        }
        for cap in [config.attn_softcap, config.final_softcap]
            .into_iter()
            .flatten()
        {
            if !(cap > 0.0 && cap.is_finite()) {
                return Err(GgufError::Malformed(format!(
                    "a soft-capping value of {cap} must be positive"
                )));
            }
        }
        if config.rope_dims > config.head_dim || !config.rope_dims.is_multiple_of(2) {
            return Err(GgufError::Malformed(format!(
                "rope dimension {} does not fit head dimension {}",
                config.rope_dims, config.head_dim
            )));
        }
        Ok(config)
    }

    /// True if layer `layer` attends only within the sliding window.
    pub fn is_local(&self, layer: usize) -> bool {
        self.sliding_window.is_some()
            && (self.sliding_window_pattern == 0
                || !(layer + 1).is_multiple_of(self.sliding_window_pattern))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, MetaValue};

    /// The configuration of a file holding only `arch`'s metadata, with `extra`.
    fn config(arch: &str, extra: &[(&str, u32)]) -> Result<ModelConfig, GgufError> {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String(arch.into()));
        for (key, value) in [
            ("block_count", 2),
            ("embedding_length", 64),
            ("attention.head_count", 4),
            ("feed_forward_length", 128),
            ("vocab_size", 96),
            ("context_length", 64),
        ]
        .iter()
        .filter(|(key, _)| !extra.iter().any(|(k, _)| k == key))
        .chain(extra)
        {
            w.meta(&format!("{arch}.{key}"), MetaValue::U32(*value));
        }
        ModelConfig::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap())
    }

    #[test]
    fn gemma_27b_models_scale_queries_by_width_per_head() {
        let shape = |layers| {
            [
                ("block_count", layers),
                ("embedding_length", 5376),
                ("attention.head_count", 32),
                ("attention.head_count_kv", 16),
                ("attention.key_length", 128),
                ("attention.sliding_window", 1024),
            ]
        };
        let scale = |arch, layers| config(arch, &shape(layers)).unwrap().query_scale;
        let by_width = 1.0 / 168f32.sqrt();
        assert_eq!(scale("gemma3", 62), by_width);
        assert_eq!(scale("gemma2", 46), by_width);
        assert_eq!(scale("gemma3", 48), 1.0 / 128f32.sqrt());
    }

    #[test]
    fn degenerate_shapes_are_refused_with_a_reason() {
        assert!(config("llama", &[]).is_ok());
        assert!(config("gemma3", &[("attention.sliding_window", 4)]).is_ok());
        let err = config("gemma3", &[("attention.sliding_window", 0)]).unwrap_err();
        assert!(err.to_string().contains("sliding window of 0"), "{err}");
        let err = config("llama", &[("attention.key_length", 0)]).unwrap_err();
        assert!(err.to_string().contains("head dimension 0"), "{err}");
    }
}
