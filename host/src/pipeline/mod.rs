//! Pipelines: `pipeline.toml` → validated DAG → concurrent execution of model
//! and component steps.

mod build;
mod error;
mod plan;
mod run;
mod spec;
mod template;
mod validate;

pub use build::{ComponentSource, ensure_built};
pub use error::{Diagnostic, PipelineError, StepError};
pub use plan::{
    AdapterDecl, ComponentDecl, InputDecl, ModelDecl, Pipeline, Sampling, Step, StepKind,
};
pub use run::Runner;
pub use spec::InputType;
pub use template::{Reference, Segment, Template, ValueTemplate};
pub use validate::{load, parse, type_accepts};
