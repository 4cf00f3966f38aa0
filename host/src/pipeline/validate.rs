//! `pipeline.toml` text → a validated [`Pipeline`], or every problem found,
//! each with file, line and column.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::Path;

use realm_models::engine::{ConstraintCompiler, ConstraintSpec};
use toml::Spanned;

use crate::sandbox::Limits;

use super::build::ComponentSource;
use super::error::{Diagnostic, PipelineError};
use super::plan::{
    AdapterDecl, ComponentDecl, InputDecl, ModelDecl, Pipeline, Sampling, Step, StepKind,
};
use super::spec::{InputType, PipelineFile, SamplingSpec, StepSpec};
use super::template::{Reference, Segment, Template, ValueTemplate, toml_to_json};

/// Reads and validates the pipeline at `path`.
pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|error| PipelineError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse(path, &text)
}

/// Validates pipeline `text`, read from `file` (relative paths resolve against its directory).
pub fn parse(file: &Path, text: &str) -> Result<Pipeline, PipelineError> {
    let mut v = Validator {
        file,
        text,
        diagnostics: Vec::new(),
    };
    let raw: PipelineFile = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            v.error(e.span().unwrap_or(0..0), e.message().trim_end().to_string());
            return Err(v.into_error());
        }
    };
    let pipeline = v.pipeline(raw);
    if v.diagnostics.is_empty() {
        Ok(pipeline)
    } else {
        Err(v.into_error())
    }
}

/// Whether `value` has the JSON type `ty`.
pub fn type_accepts(ty: InputType, value: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match ty {
        InputType::String => value.is_string(),
        InputType::Integer => value.is_i64() || value.is_u64(),
        InputType::Number => value.is_number(),
        InputType::Boolean => value.is_boolean(),
        InputType::Object => matches!(value, V::Object(_)),
        InputType::Array => matches!(value, V::Array(_)),
        InputType::Any => true,
    }
}

fn is_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    diagnostics: Vec<Diagnostic>,
}

/// What a reference may point at: inputs and the kinds of the steps.
struct Scope<'a> {
    inputs: &'a BTreeMap<String, InputDecl>,
    steps: &'a HashMap<String, Shape>,
}

/// What a step's result holds, for checking references to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `text`, `finish`, `usage`, and `value` when it has a `schema`.
    Model { json: bool },
    /// `output`.
    Component,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(start, |nl| start - nl - 1) + 1;
        self.diagnostics.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }

    fn into_error(self) -> PipelineError {
        PipelineError::Invalid {
            diagnostics: self.diagnostics,
        }
    }

    fn pipeline(&mut self, raw: PipelineFile) -> Pipeline {
        let base = self.file.parent().unwrap_or(Path::new(".")).to_path_buf();
        if raw.name.get_ref().trim().is_empty() {
            self.error(raw.name.span(), "`name` must not be empty");
        }
        let inputs = self.inputs(raw.inputs);
        let models = self.models(raw.models);
        let components = self.components(&base, raw.components, &models);
        let kinds = step_kinds(&raw.steps);
        let steps = self.steps(raw.steps, &kinds, &inputs, &models, &components);
        let scope = Scope {
            inputs: &inputs,
            steps: &kinds,
        };
        let outputs = raw.outputs.map(|outputs| {
            outputs
                .into_iter()
                .filter_map(|(name, value)| {
                    let span = value.span();
                    let template = match ValueTemplate::from_toml(value.get_ref()) {
                        Ok(t) => t,
                        Err(e) => {
                            self.error(span, format!("output `{}`: {e}", name.get_ref()));
                            return None;
                        }
                    };
                    for r in template.references() {
                        if let Err(e) = self.check_reference(r, &scope, None) {
                            self.error(span.clone(), format!("output `{}`: {e}", name.get_ref()));
                        }
                    }
                    Some((name.into_inner(), template))
                })
                .collect()
        });
        let steps = self.order(steps);
        Pipeline {
            name: raw.name.into_inner(),
            description: raw.description,
            file: self.file.to_path_buf(),
            inputs,
            models,
            components,
            steps,
            outputs,
        }
    }

    fn inputs(
        &mut self,
        raw: BTreeMap<Spanned<String>, Spanned<super::spec::InputSpec>>,
    ) -> BTreeMap<String, InputDecl> {
        let mut inputs = BTreeMap::new();
        for (name, spec) in raw {
            if !is_name(name.get_ref()) {
                self.error(
                    name.span(),
                    format!(
                        "input name `{}` must be a name (letters, digits, `_`, `-`)",
                        name.get_ref()
                    ),
                );
            }
            let span = spec.span();
            let spec = spec.into_inner();
            let default = match spec.default.as_ref().map(toml_to_json) {
                None => None,
                Some(Ok(value)) if type_accepts(spec.ty, &value) => Some(value),
                Some(Ok(value)) => {
                    self.error(
                        span.clone(),
                        format!(
                            "default of input `{}` is {value}, which is not of type {:?}",
                            name.get_ref(),
                            spec.ty
                        )
                        .to_lowercase(),
                    );
                    None
                }
                Some(Err(e)) => {
                    self.error(span.clone(), e);
                    None
                }
            };
            inputs.insert(
                name.into_inner(),
                InputDecl {
                    ty: spec.ty,
                    default,
                    description: spec.description,
                },
            );
        }
        inputs
    }

    fn models(
        &mut self,
        raw: BTreeMap<Spanned<String>, Spanned<super::spec::ModelSpec>>,
    ) -> BTreeMap<String, ModelDecl> {
        let mut models = BTreeMap::new();
        for (name, spec) in raw {
            if !is_name(name.get_ref()) {
                self.error(
                    name.span(),
                    format!(
                        "model name `{}` must be a name (letters, digits, `_`, `-`)",
                        name.get_ref()
                    ),
                );
            }
            if spec.get_ref().source.trim().is_empty() {
                self.error(
                    spec.span(),
                    format!("model `{}` needs a `source`", name.get_ref()),
                );
            }
            let span = spec.span();
            let spec = spec.into_inner();
            let adapter = match (spec.adapter, spec.scale) {
                (None, Some(_)) => {
                    self.error(
                        span.clone(),
                        format!(
                            "model `{}` has a `scale` but no `adapter` to apply it to",
                            name.get_ref()
                        ),
                    );
                    None
                }
                (None, None) => None,
                (Some(source), scale) => {
                    let scale = scale.unwrap_or(1.0);
                    if !scale.is_finite() || scale.abs() > 100.0 {
                        self.error(
                            span.clone(),
                            format!(
                                "model `{}`: scale {scale} is outside -100..=100",
                                name.get_ref()
                            ),
                        );
                    }
                    let local = Path::new(&source);
                    let source = if source.ends_with(".gguf") && local.is_relative() {
                        let base = self.file.parent().unwrap_or(Path::new("."));
                        base.join(local).display().to_string()
                    } else {
                        source
                    };
                    Some(AdapterDecl { source, scale })
                }
            };
            models.insert(
                name.into_inner(),
                ModelDecl {
                    source: spec.source,
                    adapter,
                },
            );
        }
        models
    }

    fn components(
        &mut self,
        base: &Path,
        raw: BTreeMap<Spanned<String>, Spanned<super::spec::ComponentSpec>>,
        models: &BTreeMap<String, ModelDecl>,
    ) -> BTreeMap<String, ComponentDecl> {
        let mut components = BTreeMap::new();
        for (name, spec) in raw {
            let span = spec.span();
            let spec = spec.into_inner();
            let name_ref = name.get_ref();
            if !is_name(name_ref) {
                self.error(
                    name.span(),
                    format!(
                        "component name `{name_ref}` must be a name (letters, digits, `_`, `-`)"
                    ),
                );
            }
            let dir = base.join(spec.path.as_deref().unwrap_or("."));
            if !dir.is_dir() {
                self.error(
                    span.clone(),
                    format!(
                        "component `{name_ref}`: `path` {} is not a directory",
                        dir.display()
                    ),
                );
            }
            let wasm = dir.join(spec.wasm.get_ref());
            if spec.wasm.get_ref().trim().is_empty() {
                self.error(
                    spec.wasm.span(),
                    format!("component `{name_ref}`: `wasm` must not be empty"),
                );
            } else if spec.build.is_none() && !wasm.is_file() {
                self.error(
                    spec.wasm.span(),
                    format!(
                        "component `{name_ref}`: {} does not exist and no `build` command is given to make it",
                        wasm.display()
                    ),
                );
            }
            if spec.build.as_deref().is_some_and(|b| b.trim().is_empty()) {
                self.error(
                    span.clone(),
                    format!("component `{name_ref}`: `build` must not be empty"),
                );
            }
            let limits = match &spec.limits {
                None => Limits::default(),
                Some(over) => over
                    .get_ref()
                    .apply(&Limits::default())
                    .unwrap_or_else(|e| {
                        self.error(over.span(), format!("component `{name_ref}`: {e}"));
                        Limits::default()
                    }),
            };
            for model in &spec.models {
                if !models.contains_key(model.get_ref()) {
                    self.error(model.span(), format!(
                        "component `{name_ref}` may use model `{}`, which is not declared in [models]",
                        model.get_ref()
                    ));
                }
            }
            components.insert(
                name.into_inner(),
                ComponentDecl {
                    source: ComponentSource {
                        watch: spec.watch.iter().map(|w| dir.join(w)).collect(),
                        dir,
                        build: spec.build,
                        wasm,
                    },
                    limits,
                    models: spec.models.into_iter().map(Spanned::into_inner).collect(),
                },
            );
        }
        components
    }

    /// Checks each step on its own; returns them with their spans, in file order.
    fn steps(
        &mut self,
        raw: Vec<Spanned<StepSpec>>,
        kinds: &HashMap<String, Shape>,
        inputs: &BTreeMap<String, InputDecl>,
        models: &BTreeMap<String, ModelDecl>,
        components: &BTreeMap<String, ComponentDecl>,
    ) -> Vec<(Step, Range<usize>)> {
        let mut seen = BTreeSet::new();
        for step in &raw {
            let id = &step.get_ref().id;
            if !is_name(id.get_ref()) {
                self.error(
                    id.span(),
                    format!(
                        "step id `{}` must be a name (letters, digits, `_`, `-`)",
                        id.get_ref()
                    ),
                );
            }
            if !seen.insert(id.get_ref()) {
                self.error(id.span(), format!("duplicate step id `{}`", id.get_ref()));
            }
        }
        let scope = Scope {
            inputs,
            steps: kinds,
        };
        let mut steps = Vec::new();
        for spanned in raw {
            let span = spanned.span();
            let spec = spanned.into_inner();
            let id = spec.id.get_ref().clone();
            let mut depends_on = BTreeSet::new();
            for after in &spec.after {
                if !kinds.contains_key(after.get_ref()) {
                    self.error(
                        after.span(),
                        format!("step `{id}` runs after unknown step `{}`", after.get_ref()),
                    );
                } else if after.get_ref() == &id {
                    self.error(after.span(), format!("step `{id}` cannot run after itself"));
                } else {
                    depends_on.insert(after.get_ref().clone());
                }
            }
            let kind = match (&spec.model, &spec.component) {
                (Some(_), Some(c)) => {
                    self.error(
                        c.span(),
                        format!(
                            "step `{id}` sets both `model` and `component`; a step does one thing"
                        ),
                    );
                    continue;
                }
                (None, None) => {
                    self.error(
                        span.clone(),
                        format!("step `{id}` needs either `model` (with `prompt`) or `component`"),
                    );
                    continue;
                }
                (Some(model), None) => {
                    self.model_step(&id, &spec, model, models, &scope, &mut depends_on)
                }
                (None, Some(component)) => {
                    self.component_step(&id, &spec, component, components, &scope, &mut depends_on)
                }
            };
            if let Some(kind) = kind {
                steps.push((
                    Step {
                        id,
                        kind,
                        depends_on: depends_on.into_iter().collect(),
                    },
                    span,
                ));
            }
        }
        steps
    }

    fn model_step(
        &mut self,
        id: &str,
        spec: &StepSpec,
        model: &Spanned<String>,
        models: &BTreeMap<String, ModelDecl>,
        scope: &Scope<'_>,
        depends_on: &mut BTreeSet<String>,
    ) -> Option<StepKind> {
        if !models.contains_key(model.get_ref()) {
            self.error(
                model.span(),
                format!(
                    "step `{id}` uses model `{}`, which is not declared in [models]",
                    model.get_ref()
                ),
            );
        }
        if let Some(input) = &spec.input {
            self.error(
                input.span(),
                format!("step `{id}` is a model step: it takes `prompt`, not `input`"),
            );
        }
        let Some(prompt) = &spec.prompt else {
            self.error(model.span(), format!("model step `{id}` needs a `prompt`"));
            return None;
        };
        let prompt = self.template(id, prompt, scope, depends_on)?;
        let system = match &spec.system {
            Some(system) => Some(self.template(id, system, scope, depends_on)?),
            None => None,
        };
        let sampling = match &spec.sampling {
            Some(s) => self.sampling(id, s)?,
            None => Sampling::default(),
        };
        let schema = match &spec.schema {
            Some(schema) => Some(self.schema(id, schema)?),
            None => None,
        };
        Some(StepKind::Model {
            model: model.get_ref().clone(),
            prompt,
            system,
            sampling,
            schema,
        })
    }

    /// A model step's `schema`: an inline table or `"@file.json"` beside
    /// the pipeline, holding a JSON Schema that compiles.
    fn schema(&mut self, id: &str, schema: &Spanned<toml::Value>) -> Option<serde_json::Value> {
        let span = schema.span();
        let value = match schema.get_ref() {
            toml::Value::Table(_) => toml_to_json(schema.get_ref()).ok(),
            toml::Value::String(path) if path.starts_with('@') => {
                let base = self.file.parent().unwrap_or(Path::new("."));
                let file = base.join(&path[1..]);
                let read = std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))
                    .and_then(|text| {
                        serde_json::from_str(&text)
                            .map_err(|e| format!("{} is not JSON: {e}", file.display()))
                    });
                match read {
                    Ok(value) => Some(value),
                    Err(e) => {
                        self.error(span, format!("step `{id}` schema: {e}"));
                        return None;
                    }
                }
            }
            _ => None,
        };
        let Some(value) = value.filter(serde_json::Value::is_object) else {
            self.error(
                span,
                format!(
                    "step `{id}` schema: give a JSON Schema as a table, or \"@file.json\" beside the pipeline"
                ),
            );
            return None;
        };
        // Checked now on a byte vocabulary, so a bad schema fails at load
        // with its place, not at the step's run.
        let spec = ConstraintSpec::JsonSchema(value.clone());
        if let Err(e) = ConstraintCompiler::for_bytes().compile(&spec) {
            self.error(span, format!("step `{id}` schema: {e}"));
            return None;
        }
        Some(value)
    }

    fn component_step(
        &mut self,
        id: &str,
        spec: &StepSpec,
        component: &Spanned<String>,
        components: &BTreeMap<String, ComponentDecl>,
        scope: &Scope<'_>,
        depends_on: &mut BTreeSet<String>,
    ) -> Option<StepKind> {
        if !components.contains_key(component.get_ref()) {
            self.error(
                component.span(),
                format!(
                    "step `{id}` uses component `{}`, which is not declared in [components]",
                    component.get_ref()
                ),
            );
        }
        for (field, span) in [
            ("prompt", spec.prompt.as_ref().map(|p| p.span())),
            ("system", spec.system.as_ref().map(|p| p.span())),
            ("sampling", spec.sampling.as_ref().map(|p| p.span())),
            ("schema", spec.schema.as_ref().map(|p| p.span())),
        ] {
            if let Some(span) = span {
                self.error(
                    span,
                    format!("step `{id}` is a component step: `{field}` belongs to model steps"),
                );
            }
        }
        let input = match &spec.input {
            None => ValueTemplate::Literal(serde_json::Value::Object(Default::default())),
            Some(input) => match ValueTemplate::from_toml(input.get_ref()) {
                Ok(t) => {
                    for r in t.references() {
                        match self.check_reference(r, scope, Some(id)) {
                            Ok(Some(dep)) => {
                                depends_on.insert(dep);
                            }
                            Ok(None) => {}
                            Err(e) => self.error(input.span(), format!("step `{id}`: {e}")),
                        }
                    }
                    t
                }
                Err(e) => {
                    self.error(input.span(), format!("step `{id}`: {e}"));
                    return None;
                }
            },
        };
        Some(StepKind::Component {
            component: component.get_ref().clone(),
            input,
        })
    }

    fn template(
        &mut self,
        id: &str,
        text: &Spanned<String>,
        scope: &Scope<'_>,
        depends_on: &mut BTreeSet<String>,
    ) -> Option<Template> {
        match Template::parse(text.get_ref()) {
            Ok(t) => {
                for r in t.references() {
                    match self.check_reference(r, scope, Some(id)) {
                        Ok(Some(dep)) => {
                            depends_on.insert(dep);
                        }
                        Ok(None) => {}
                        Err(e) => self.error(text.span(), format!("step `{id}`: {e}")),
                    }
                }
                Some(t)
            }
            Err(e) => {
                self.error(text.span(), format!("step `{id}`: {e}"));
                None
            }
        }
    }

    fn sampling(&mut self, id: &str, spec: &Spanned<SamplingSpec>) -> Option<Sampling> {
        let d = Sampling::default();
        let s = spec.get_ref();
        let sampling = Sampling {
            max_tokens: s.max_tokens.unwrap_or(d.max_tokens),
            temperature: s.temperature.unwrap_or(d.temperature),
            top_k: s.top_k.unwrap_or(d.top_k),
            top_p: s.top_p.unwrap_or(d.top_p),
            min_p: s.min_p.unwrap_or(d.min_p),
            repeat_penalty: s.repeat_penalty.unwrap_or(d.repeat_penalty),
            presence_penalty: s.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: s.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: s.seed,
            stop: s.stop.clone(),
        };
        let problem = sampling.options().check().err().map(|e| e.to_string());
        match problem {
            Some(p) => {
                self.error(spec.span(), format!("step `{id}`: {p}"));
                None
            }
            None => Some(sampling),
        }
    }

    /// Checks one reference; returns the step it depends on, if any.
    fn check_reference(
        &self,
        r: &Reference,
        scope: &Scope<'_>,
        current: Option<&str>,
    ) -> Result<Option<String>, String> {
        match r.key(0) {
            Some("inputs") => {
                let Some(name) = r.key(1) else {
                    return Err(format!("`{r}`: name an input, as in `inputs.text`"));
                };
                let Some(decl) = scope.inputs.get(name) else {
                    let known: Vec<&str> = scope.inputs.keys().map(String::as_str).collect();
                    return Err(format!(
                        "`{r}` refers to undeclared input `{name}` (declared: {})",
                        list(&known)
                    ));
                };
                if r.segments.len() > 2
                    && !matches!(
                        decl.ty,
                        InputType::Object | InputType::Array | InputType::Any
                    )
                {
                    return Err(format!(
                        "`{r}` reaches into input `{name}`, which is of type {:?}",
                        decl.ty
                    )
                    .to_lowercase());
                }
                Ok(None)
            }
            Some("steps") => {
                let Some(id) = r.key(1) else {
                    return Err(format!("`{r}`: name a step, as in `steps.summary.text`"));
                };
                if Some(id) == current {
                    return Err(format!("`{r}`: a step cannot use its own result"));
                }
                let Some(&shape) = scope.steps.get(id) else {
                    let mut known: Vec<&str> = scope.steps.keys().map(String::as_str).collect();
                    known.sort();
                    return Err(format!(
                        "`{r}` refers to unknown step `{id}` (steps: {})",
                        list(&known)
                    ));
                };
                let field = r.segments.get(2);
                let is_model = shape != Shape::Component;
                let json = shape == Shape::Model { json: true };
                let ok = if is_model {
                    match (field, r.segments.len()) {
                        (None, _) => true,
                        (Some(Segment::Key(k)), _) if k == "value" => json,
                        (Some(Segment::Key(k)), 3) => {
                            matches!(k.as_str(), "text" | "finish" | "usage")
                        }
                        (Some(Segment::Key(k)), 4) => {
                            k == "usage"
                                && matches!(r.key(3), Some("prompt_tokens" | "completion_tokens"))
                        }
                        _ => false,
                    }
                } else {
                    matches!(field, None | Some(Segment::Key(_)))
                        && r.key(2).is_none_or(|k| k == "output")
                };
                if !ok {
                    return Err(if is_model {
                        format!(
                            "`{r}`: model step `{id}` has `text`, `finish` and `usage` (`usage.prompt_tokens`, `usage.completion_tokens`){}",
                            if json {
                                ", and `value`"
                            } else {
                                "; `value` only with a `schema`"
                            }
                        )
                    } else {
                        format!("`{r}`: component step `{id}` has one field, `output`")
                    });
                }
                Ok(Some(id.to_string()))
            }
            _ => Err(format!(
                "`{r}`: references start with `inputs.` or `steps.`"
            )),
        }
    }

    /// Orders steps so dependencies come first (file order among equals);
    /// reports a cycle if there is one.
    fn order(&mut self, steps: Vec<(Step, Range<usize>)>) -> Vec<Step> {
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut pending = steps;
        let mut ordered = Vec::new();
        loop {
            let before = pending.len();
            let mut still = Vec::new();
            for (step, span) in pending {
                if step.depends_on.iter().all(|d| done.contains(d)) {
                    done.insert(step.id.clone());
                    ordered.push(step);
                } else {
                    still.push((step, span));
                }
            }
            pending = still;
            if pending.is_empty() {
                return ordered;
            }
            if pending.len() == before {
                let names: Vec<&str> = pending.iter().map(|(s, _)| s.id.as_str()).collect();
                let span = pending[0].1.clone();
                self.error(
                    span,
                    format!(
                        "steps {} can never run: their dependencies form a cycle",
                        names.join(", ")
                    ),
                );
                return ordered;
            }
        }
    }
}

/// Every declared step id, and whether it is a model step.
fn step_kinds(steps: &[Spanned<StepSpec>]) -> HashMap<String, Shape> {
    steps
        .iter()
        .map(|s| {
            let spec = s.get_ref();
            let shape = match spec.model {
                Some(_) => Shape::Model {
                    json: spec.schema.is_some(),
                },
                None => Shape::Component,
            };
            (spec.id.get_ref().clone(), shape)
        })
        .collect()
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}
