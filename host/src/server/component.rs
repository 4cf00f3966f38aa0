//! A tenant's own component in `realm.toml`: either a built `.wasm` file,
//!
//! ```toml
//! component = "guests/rust/target/wasm32-wasip2/release/notes.wasm"
//! ```
//!
//! or sources that Realm builds on demand (at start and on reload, when the
//! `.wasm` is missing or older than its sources), exactly like a pipeline's
//! component: `wasm` and `watch` are relative to `path`.
//!
//! ```toml
//! component = { path = "guests/python/assistant", build = "…", wasm = "target/assistant.wasm", watch = ["../../../wit"] }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::pipeline::ComponentSource;

/// The `component` of a tenant, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantComponent(pub ComponentSource);

/// The table form, with the same keys as a pipeline's component.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuiltSpec {
    path: PathBuf,
    build: String,
    wasm: PathBuf,
    #[serde(default)]
    watch: Vec<PathBuf>,
}

impl TenantComponent {
    /// Makes relative paths relative to `base` (the config file's directory),
    /// and `wasm`/`watch` of a built component relative to its `path`.
    pub fn resolve(&mut self, base: &Path) {
        let source = &mut self.0;
        source.dir = base.join(&source.dir);
        if source.build.is_some() {
            source.wasm = source.dir.join(&source.wasm);
            for watched in &mut source.watch {
                *watched = source.dir.join(&*watched);
            }
        } else {
            source.wasm = base.join(&source.wasm);
        }
    }

    /// What is wrong with it, if anything (`at` names it in messages).
    pub fn problem(&self, at: &str) -> Option<String> {
        let source = &self.0;
        match &source.build {
            None if !source.wasm.is_file() => {
                Some(format!("{at}: {} does not exist", source.wasm.display()))
            }
            Some(command) if command.trim().is_empty() => {
                Some(format!("{at}.build: the build command is empty"))
            }
            Some(_) if !source.dir.is_dir() => Some(format!(
                "{at}.path: {} is not a directory",
                source.dir.display()
            )),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for TenantComponent {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ComponentVisitor)
    }
}

struct ComponentVisitor;

impl<'de> Visitor<'de> for ComponentVisitor {
    type Value = TenantComponent;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a path to a `.wasm` file, or a table { path, build, wasm, watch }")
    }

    fn visit_str<E: de::Error>(self, wasm: &str) -> Result<TenantComponent, E> {
        Ok(TenantComponent(ComponentSource {
            dir: PathBuf::new(),
            build: None,
            wasm: wasm.into(),
            watch: Vec::new(),
        }))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TenantComponent, A::Error> {
        let spec = BuiltSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(TenantComponent(ComponentSource {
            dir: spec.path,
            build: Some(spec.build),
            wasm: spec.wasm,
            watch: spec.watch,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Holder {
        component: TenantComponent,
    }

    fn parse(toml_text: &str) -> Result<TenantComponent, String> {
        toml::from_str::<Holder>(toml_text)
            .map(|h| h.component)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_path_or_a_built_table_resolve_against_the_config() {
        let mut plain = parse(r#"component = "c/x.wasm""#).unwrap();
        plain.resolve(Path::new("/etc/realm"));
        assert_eq!(plain.0.wasm, Path::new("/etc/realm/c/x.wasm"));
        assert_eq!(plain.0.build, None);

        let mut built = parse(
            r#"component = { path = "g/a", build = "make", wasm = "out/a.wasm", watch = ["../wit"] }"#,
        )
        .unwrap();
        built.resolve(Path::new("/etc/realm"));
        assert_eq!(built.0.dir, Path::new("/etc/realm/g/a"));
        assert_eq!(built.0.wasm, Path::new("/etc/realm/g/a/out/a.wasm"));
        assert_eq!(built.0.watch, [Path::new("/etc/realm/g/a/../wit")]);
        assert_eq!(built.0.build.as_deref(), Some("make"));
    }

    #[test]
    fn bad_forms_are_refused_with_their_reason() {
        let err =
            parse(r#"component = { path = "a", build = "make", wasm = "a.wasm", colour = 1 }"#)
                .unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
        let err = parse(r#"component = { path = "a", wasm = "a.wasm" }"#).unwrap_err();
        assert!(err.contains("missing field `build`"), "{err}");
        let err = parse("component = 3").unwrap_err();
        assert!(
            err.contains("a path to a `.wasm` file, or a table"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let mut missing = parse(r#"component = "nope.wasm""#).unwrap();
        missing.resolve(dir.path());
        assert!(missing.problem("t").unwrap().contains("does not exist"));
        let mut no_dir =
            parse(r#"component = { path = "nope", build = "make", wasm = "a.wasm" }"#).unwrap();
        no_dir.resolve(dir.path());
        assert!(no_dir.problem("t").unwrap().contains("t.path:"));
        let empty = parse(r#"component = { path = ".", build = " ", wasm = "a.wasm" }"#).unwrap();
        assert!(
            empty
                .problem("t")
                .unwrap()
                .contains("t.build: the build command is empty")
        );
    }
}
