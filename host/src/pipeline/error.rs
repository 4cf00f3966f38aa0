//! Typed errors of loading and running pipelines.

use std::fmt;
use std::path::PathBuf;

use crate::sandbox::SandboxError;

/// A problem at a place in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The pipeline file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Why a pipeline could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The file could not be read.
    #[error("cannot read pipeline {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file is malformed; every problem found is listed.
    #[error("{}", diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid { diagnostics: Vec<Diagnostic> },
    /// An input is missing, unknown or of the wrong type.
    #[error("input `{name}`: {message}")]
    Input { name: String, message: String },
    /// A component could not be built.
    #[error("component `{component}` could not be built: {message}")]
    Build { component: String, message: String },
    /// A component could not be loaded into the sandbox.
    #[error("component `{component}` could not be loaded: {error}")]
    Load {
        component: String,
        error: SandboxError,
    },
    /// A model could not be loaded.
    #[error("model `{model}` (source `{source_name}`) cannot be loaded: {message}")]
    Model {
        model: String,
        source_name: String,
        message: String,
    },
    /// A step failed while running.
    #[error("step `{step}` failed: {error}")]
    Step { step: String, error: StepError },
    /// A step's host task died (a bug).
    #[error("a step's task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// An output template could not be filled.
    #[error("output `{name}`: {message}")]
    Output { name: String, message: String },
}

/// Why one step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Its template referenced a value that is not there.
    #[error("{0}")]
    Render(String),
    /// The component call failed (limit, trap, or the guest's own error).
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    /// The step's sampling settings break the generation rules.
    #[error(transparent)]
    Params(#[from] realm_models::engine::InvalidParams),
    /// The tenant's limits refused the step's generation.
    #[error(transparent)]
    Refused(#[from] crate::metering::Refused),
    /// The model could not format the prompt or generate.
    #[error(transparent)]
    Engine(#[from] realm_models::engine::EngineError),
    /// The step's host task died (a bug).
    #[error("the step's task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The component returned text that is not JSON.
    #[error("component returned invalid JSON: {0}")]
    BadOutput(#[source] serde_json::Error),
    /// A model step's JSON was cut off by its token limit.
    #[error(
        "the model's JSON was cut off after {tokens} tokens, before it was complete; raise the step's `sampling.max-tokens`"
    )]
    Unfinished {
        /// Tokens generated.
        tokens: usize,
    },
}
