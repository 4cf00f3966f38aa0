//! Runs a validated pipeline: builds and loads its components, then executes
//! the step DAG, each step as soon as the steps it depends on are done.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::task::JoinSet;

use crate::sandbox::{CallContext, LoadedComponent, ModelAccess, Sandbox, SandboxError, Tenant};

use super::build::ensure_built;
use super::error::{PipelineError, StepError};
use super::plan::{Pipeline, StepKind};
use super::validate::type_accepts;

/// Runs pipelines for one tenant.
pub struct Runner {
    sandbox: Arc<Sandbox>,
    tenant: Tenant,
}

impl Runner {
    /// A runner whose guests run in `sandbox` with `tenant`'s data.
    pub fn new(sandbox: Arc<Sandbox>, tenant: Tenant) -> Self {
        Runner { sandbox, tenant }
    }

    /// Runs `pipeline` on `inputs` and returns its outputs as a JSON object.
    pub async fn run(
        &self,
        pipeline: &Pipeline,
        inputs: Map<String, Value>,
    ) -> Result<Value, PipelineError> {
        let inputs = resolve_inputs(pipeline, inputs)?;
        check_models(pipeline)?;
        let components = self.load_components(pipeline).await?;
        let results = self.execute(pipeline, &inputs, &components).await?;
        outputs(pipeline, inputs, results)
    }

    async fn load_components(
        &self,
        pipeline: &Pipeline,
    ) -> Result<BTreeMap<String, (LoadedComponent, CallContext)>, PipelineError> {
        let used: HashSet<&str> = pipeline
            .steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Component { component, .. } => Some(component.as_str()),
                StepKind::Model { .. } => None,
            })
            .collect();
        let mut loaded = BTreeMap::new();
        for (name, decl) in &pipeline.components {
            if !used.contains(name.as_str()) {
                continue;
            }
            let wasm = ensure_built(name, decl).await?;
            let load_error = |error: SandboxError| PipelineError::Load {
                component: name.clone(),
                error,
            };
            let component = self.sandbox.load(name, &wasm).await.map_err(load_error)?;
            if !component.is_step() {
                return Err(load_error(SandboxError::WorldMismatch {
                    component: name.clone(),
                    world: "step",
                    message: "pipeline steps must export `run` (the `step` world)".into(),
                }));
            }
            let call = CallContext {
                tenant: self.tenant.clone(),
                limits: decl.limits.clone(),
                models: ModelAccess::new(decl.models.iter().cloned()),
            };
            loaded.insert(name.clone(), (component, call));
        }
        Ok(loaded)
    }

    async fn execute(
        &self,
        pipeline: &Pipeline,
        inputs: &Map<String, Value>,
        components: &BTreeMap<String, (LoadedComponent, CallContext)>,
    ) -> Result<Map<String, Value>, PipelineError> {
        let mut results = Map::new();
        let mut started = HashSet::new();
        let mut running = JoinSet::new();
        loop {
            for step in &pipeline.steps {
                if started.contains(&step.id)
                    || !step.depends_on.iter().all(|d| results.contains_key(d))
                {
                    continue;
                }
                started.insert(step.id.clone());
                let scope = json!({ "inputs": inputs, "steps": results });
                let fail = |error: StepError| PipelineError::Step {
                    step: step.id.clone(),
                    error,
                };
                match &step.kind {
                    StepKind::Component { component, input } => {
                        let input = input
                            .render(&scope)
                            .map_err(|e| fail(StepError::Render(e)))?;
                        let (loaded, call) = components[component].clone();
                        let sandbox = self.sandbox.clone();
                        let id = step.id.clone();
                        tracing::debug!(step = %id, component = %component, "step started");
                        running.spawn(async move {
                            let result = run_component(&sandbox, &loaded, &call, &input).await;
                            (id, result)
                        });
                    }
                    StepKind::Model { model, .. } => {
                        return Err(fail(StepError::Model(format!(
                            "model `{model}` is not loaded"
                        ))));
                    }
                }
            }
            let Some(joined) = running.join_next().await else {
                return Ok(results);
            };
            // Steps never panic on guest input; a join error means the host itself broke.
            let (id, result) =
                joined.map_err(|e| PipelineError::Internal(format!("step task failed: {e}")))?;
            match result {
                Ok(value) => {
                    tracing::debug!(step = %id, "step finished");
                    results.insert(id, value);
                }
                Err(error) => {
                    running.abort_all();
                    return Err(PipelineError::Step { step: id, error });
                }
            }
        }
    }
}

async fn run_component(
    sandbox: &Sandbox,
    component: &LoadedComponent,
    call: &CallContext,
    input: &Value,
) -> Result<Value, StepError> {
    let done = sandbox
        .run_step(component, call, &input.to_string())
        .await?;
    tracing::debug!(
        component = component.name(),
        fuel = done.fuel_used,
        elapsed_us = done.elapsed.as_micros() as u64,
        "component call finished"
    );
    let output: Value =
        serde_json::from_str(&done.output).map_err(|e| StepError::BadOutput(format!("{e}")))?;
    Ok(json!({ "output": output }))
}

/// Fails before anything runs if a step needs a model: this build links no
/// inference engine, and a pipeline must not half-run.
fn check_models(pipeline: &Pipeline) -> Result<(), PipelineError> {
    for step in &pipeline.steps {
        if let StepKind::Model { model, .. } = &step.kind {
            let source_name = pipeline
                .models
                .get(model)
                .map(|m| m.source.clone())
                .unwrap_or_default();
            return Err(PipelineError::Model {
                model: model.clone(),
                source_name,
                message: "this realm-host build has no inference engine".into(),
            });
        }
    }
    Ok(())
}

/// Checks given inputs against the declarations and fills in defaults.
fn resolve_inputs(
    pipeline: &Pipeline,
    mut given: Map<String, Value>,
) -> Result<Map<String, Value>, PipelineError> {
    if let Some(unknown) = given.keys().find(|k| !pipeline.inputs.contains_key(*k)) {
        let declared: Vec<&str> = pipeline.inputs.keys().map(String::as_str).collect();
        return Err(PipelineError::Input {
            name: unknown.clone(),
            message: format!(
                "pipeline `{}` has no such input (it takes: {})",
                pipeline.name,
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ),
        });
    }
    let mut resolved = Map::new();
    for (name, decl) in &pipeline.inputs {
        let value = match given.remove(name).or_else(|| decl.default.clone()) {
            Some(value) => value,
            None => {
                return Err(PipelineError::Input {
                    name: name.clone(),
                    message: format!("required; pass it with --input {name}=VALUE"),
                });
            }
        };
        if !type_accepts(decl.ty, &value) {
            return Err(PipelineError::Input {
                name: name.clone(),
                message: format!(
                    "expected {}, got {value}",
                    format!("{:?}", decl.ty).to_lowercase()
                ),
            });
        }
        resolved.insert(name.clone(), value);
    }
    Ok(resolved)
}

fn outputs(
    pipeline: &Pipeline,
    inputs: Map<String, Value>,
    results: Map<String, Value>,
) -> Result<Value, PipelineError> {
    let Some(templates) = &pipeline.outputs else {
        return Ok(Value::Object(results));
    };
    let scope = json!({ "inputs": inputs, "steps": results });
    let mut out = Map::new();
    for (name, template) in templates {
        let value = template
            .render(&scope)
            .map_err(|message| PipelineError::Output {
                name: name.clone(),
                message,
            })?;
        out.insert(name.clone(), value);
    }
    Ok(Value::Object(out))
}
