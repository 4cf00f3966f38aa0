//! Runs a validated pipeline: builds and loads its components, then executes
//! the step DAG, each step as soon as the steps it depends on are done.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::task::JoinSet;

use realm_models::chat::ChatMessage;
use realm_models::engine::{ConstraintSpec, Engine, FinishReason, GenerateParams, Request};

use crate::inference::{AdapterUse, ModelHub};
use crate::metering::{self, Meter, SharedMeter};
use crate::sandbox::{CallContext, LoadedComponent, ModelAccess, Sandbox, SandboxError, Tenant};

use super::build::{built, ensure_built};
use super::error::{PipelineError, StepError};
use super::plan::{Pipeline, StepKind};
use super::validate::type_accepts;

type Models = BTreeMap<String, Arc<dyn Engine>>;

/// Runs pipelines for one tenant.
pub struct Runner {
    sandbox: Arc<Sandbox>,
    models: Arc<ModelHub>,
    tenant: Tenant,
    /// The tenant's share of batch slots.
    weight: u32,
    /// Admits and charges every generation the pipeline starts.
    meter: SharedMeter,
    /// Whether stale or missing components are built before running.
    builds: bool,
}

impl Runner {
    /// A runner whose guests run in `sandbox` with `tenant`'s data, and whose
    /// models come from `models`.
    pub fn new(sandbox: Arc<Sandbox>, models: Arc<ModelHub>, tenant: Tenant) -> Self {
        Runner {
            sandbox,
            models,
            tenant,
            weight: 1,
            meter: None,
            builds: true,
        }
    }

    /// The same runner, using components as they are built: it never runs
    /// a build command (a tenant's request must not start the operator's
    /// builds; the server builds at start and reload).
    pub fn prebuilt(mut self) -> Self {
        self.builds = false;
        self
    }

    /// Builds every component `pipeline` uses that is missing or stale.
    pub async fn build_components(pipeline: &Pipeline) -> Result<(), PipelineError> {
        for (name, decl) in &pipeline.components {
            ensure_built(name, &decl.source).await?;
        }
        Ok(())
    }

    /// The same runner with its generations shared by `weight` and admitted
    /// and charged by `meter`, as the tenant's direct requests are.
    pub fn metered(mut self, meter: Arc<dyn Meter>, weight: u32) -> Self {
        self.meter = Some(meter);
        self.weight = weight;
        self
    }

    /// Runs `pipeline` on `inputs` and returns its outputs as a JSON object.
    pub async fn run(
        &self,
        pipeline: &Pipeline,
        inputs: Map<String, Value>,
    ) -> Result<Value, PipelineError> {
        let inputs = resolve_inputs(pipeline, inputs)?;
        let models = self.load_models(pipeline).await?;
        let components = self.load_components(pipeline, &models).await?;
        let results = self
            .execute(pipeline, &inputs, &models, &components)
            .await?;
        outputs(pipeline, inputs, results)
    }

    /// Loads every model a step, or a component a step runs, may use, before anything runs.
    async fn load_models(&self, pipeline: &Pipeline) -> Result<Models, PipelineError> {
        let mut used: Vec<&String> = Vec::new();
        for step in &pipeline.steps {
            match &step.kind {
                StepKind::Model { model, .. } => used.push(model),
                StepKind::Component { component, .. } => {
                    used.extend(&pipeline.components[component].models)
                }
            }
        }
        let mut models = BTreeMap::new();
        for name in used {
            if models.contains_key(name) {
                continue;
            }
            let decl = &pipeline.models[name];
            let source = &decl.source;
            let failed = |e: crate::inference::InferenceError| PipelineError::Model {
                model: name.clone(),
                source_name: source.clone(),
                message: e.to_string(),
            };
            let mut model = self.models.load(source).await.map_err(failed)?;
            if let Some(adapter) = &decl.adapter {
                let adapted = self
                    .models
                    .adapted(
                        AdapterUse::Pipeline,
                        name,
                        (source, model),
                        &adapter.source,
                        adapter.scale,
                    )
                    .await
                    .map_err(failed)?;
                model = adapted as Arc<dyn Engine>;
            }
            models.insert(name.clone(), model);
        }
        Ok(models)
    }

    async fn load_components(
        &self,
        pipeline: &Pipeline,
        models: &Models,
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
            let wasm = if self.builds {
                ensure_built(name, &decl.source).await?
            } else {
                built(name, &decl.source)?
            };
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
            let mut access =
                ModelAccess::new(decl.models.iter().map(|m| (m.clone(), models[m].clone())))
                    .on_behalf_of(self.tenant.id(), self.weight);
            if let Some(meter) = &self.meter {
                access = access.metered(meter.clone());
            }
            let call = CallContext {
                tenant: self.tenant.clone(),
                limits: decl.limits.clone(),
                models: access,
            };
            loaded.insert(name.clone(), (component, call));
        }
        Ok(loaded)
    }

    async fn execute(
        &self,
        pipeline: &Pipeline,
        inputs: &Map<String, Value>,
        models: &Models,
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
                    StepKind::Model {
                        model,
                        prompt,
                        system,
                        sampling,
                        schema,
                    } => {
                        let prompt = prompt
                            .render_text(&scope)
                            .map_err(|e| fail(StepError::Render(e)))?;
                        let system = match system {
                            Some(t) => Some(
                                t.render_text(&scope)
                                    .map_err(|e| fail(StepError::Render(e)))?,
                            ),
                            None => None,
                        };
                        // Usage is counted as `MODEL:ADAPTER-FILE` when it has one.
                        let name = match &pipeline.models[model].adapter {
                            Some(a) => {
                                let stem = Path::new(&a.source).file_stem();
                                let stem = stem.map_or("adapter".into(), |s| s.to_string_lossy());
                                format!("{model}:{stem}")
                            }
                            None => model.clone(),
                        };
                        let model = models[model].clone();
                        let params = sampling
                            .options()
                            .check()
                            .map_err(|e| fail(StepError::Params(e)))?;
                        let id = step.id.clone();
                        let who = Who {
                            tenant: self.tenant.id().to_string(),
                            weight: self.weight,
                            meter: self.meter.clone(),
                        };
                        tracing::debug!(step = %id, "step started");
                        let schema = schema.clone();
                        running.spawn(async move {
                            let call = ModelCall {
                                system,
                                prompt,
                                params,
                                schema,
                            };
                            let result = run_model(&name, model, who, call).await;
                            (id, result)
                        });
                    }
                }
            }
            let Some(joined) = running.join_next().await else {
                return Ok(results);
            };
            // Steps never panic on guest input; a join error means the host itself broke.
            let (id, result) = joined.map_err(PipelineError::Task)?;
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
    let output: Value = serde_json::from_str(&done.output).map_err(StepError::BadOutput)?;
    Ok(json!({ "output": output }))
}

/// Whose a model step's generation is.
struct Who {
    tenant: String,
    weight: u32,
    meter: SharedMeter,
}

/// What a model step asks of its model, rendered.
struct ModelCall {
    system: Option<String>,
    prompt: String,
    params: GenerateParams,
    schema: Option<Value>,
}

/// A model step: a raw completion, or a chat when the step has a system
/// message; held to its schema, if it has one, and then parsed.
async fn run_model(
    name: &str,
    model: Arc<dyn Engine>,
    who: Who,
    call: ModelCall,
) -> Result<Value, StepError> {
    let ModelCall {
        system,
        prompt,
        params,
        schema,
    } = call;
    let json = schema.is_some();
    let tokenizer = model.clone();
    let (ids, constraint) = tokio::task::spawn_blocking(move || {
        let constraint = schema
            .map(|s| tokenizer.constrain(&ConstraintSpec::JsonSchema(s)))
            .transpose()?;
        let ids = match system {
            None => tokenizer.prompt_tokens(&prompt),
            Some(system) => tokenizer.chat_tokens(
                &[
                    ChatMessage::new("system", system),
                    ChatMessage::new("user", prompt),
                ],
                &[],
            )?,
        };
        Ok::<_, StepError>((ids, constraint))
    })
    .await
    .map_err(StepError::Task)??;
    // A cancelled run drops this future, and with it the generation.
    let mut request = Request::new(ids, params, &who.tenant, who.weight);
    request.constraint = constraint;
    let done = metering::submit(&who.meter, name, model.as_ref(), request, None)
        .await?
        .await?;
    let finish = match done.finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    };
    let mut result = json!({
        "text": done.text,
        "finish": finish,
        "usage": { "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens },
    });
    if json {
        let value: Value = serde_json::from_str(&done.text).map_err(|_| StepError::Unfinished {
            tokens: done.completion_tokens,
        })?;
        result["value"] = value;
    }
    Ok(result)
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
