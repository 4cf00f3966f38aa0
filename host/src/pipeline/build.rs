//! On-demand component builds: run a component's `build` command when its
//! `.wasm` is missing or older than any of its sources.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::SystemTime;

use super::error::PipelineError;

/// Directories never scanned for source changes.
const SKIPPED_DIRS: &[&str] = &["target", "node_modules", "__pycache__"];

/// Where a component's `.wasm` comes from: a file, or sources and the
/// command that builds them (run when the file is missing or stale).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSource {
    /// The component's source directory (the build runs there).
    pub dir: PathBuf,
    /// The shell command that builds it, if any.
    pub build: Option<String>,
    /// The built `.wasm` file.
    pub wasm: PathBuf,
    /// Extra files or directories whose changes make the `.wasm` stale.
    pub watch: Vec<PathBuf>,
}

/// The lock of the build that writes `wasm`: callers that need the same
/// component at once wait for one build instead of each starting their own.
fn build_lock(wasm: &Path) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    type Locks = HashMap<PathBuf, std::sync::Arc<tokio::sync::Mutex<()>>>;
    static LOCKS: OnceLock<std::sync::Mutex<Locks>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    // One entry per configured component: as many as the operator wrote.
    locks.entry(wasm.to_path_buf()).or_default().clone()
}

/// Component `name`'s `.wasm`, which must already exist: for callers that
/// must not start builds (a server's requests; it builds at start and
/// reload).
pub fn built(name: &str, source: &ComponentSource) -> Result<PathBuf, PipelineError> {
    if source.wasm.is_file() {
        Ok(source.wasm.clone())
    } else {
        Err(PipelineError::Build {
            component: name.to_string(),
            message: format!(
                "{} does not exist (components are built when the server starts or reloads)",
                source.wasm.display()
            ),
        })
    }
}

/// Makes sure component `name`'s `.wasm` exists and is fresh, building it if
/// needed (one build at a time per component).
pub async fn ensure_built(name: &str, source: &ComponentSource) -> Result<PathBuf, PipelineError> {
    let fail = |message: String| PipelineError::Build {
        component: name.to_string(),
        message,
    };
    let Some(command) = &source.build else {
        return if source.wasm.is_file() {
            Ok(source.wasm.clone())
        } else {
            Err(fail(format!("{} does not exist", source.wasm.display())))
        };
    };
    let lock = build_lock(&source.wasm);
    let _building = lock.lock().await;
    let wasm_time = std::fs::metadata(&source.wasm)
        .and_then(|m| m.modified())
        .ok();
    if let Some(built) = wasm_time {
        let mut roots = vec![source.dir.clone()];
        roots.extend(source.watch.iter().cloned());
        let wasm = source.wasm.clone();
        let newest = tokio::task::spawn_blocking(move || newest_source(&roots, &wasm))
            .await
            .map_err(|e| fail(format!("scanning sources failed: {e}")))?;
        if newest.is_none_or(|newest| newest <= built) {
            return Ok(source.wasm.clone());
        }
    }
    tracing::info!(component = name, command = %command, dir = %source.dir.display(), "building component");
    let output = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(&source.dir)
        // The build must put its output where `wasm` says, relative to the
        // component, whatever target dir the caller's cargo uses.
        .env_remove("CARGO_TARGET_DIR")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| fail(format!("cannot run `{command}`: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(fail(format!(
            "`{command}` exited with {} in {}:\n{}",
            output.status,
            source.dir.display(),
            tail.join("\n")
        )));
    }
    if !source.wasm.is_file() {
        return Err(fail(format!(
            "`{command}` succeeded but did not produce {}",
            source.wasm.display()
        )));
    }
    Ok(source.wasm.clone())
}

/// The newest modification time of any file under `roots`, skipping build
/// output directories, hidden entries and `wasm` itself.
fn newest_source(roots: &[PathBuf], wasm: &Path) -> Option<SystemTime> {
    let mut newest = None;
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let Ok(entries) = std::fs::read_dir(&path) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || SKIPPED_DIRS.contains(&name.as_ref()) {
                    continue;
                }
                stack.push(entry.path());
            }
        } else if meta.is_file()
            && path != wasm
            && let Ok(modified) = meta.modified()
        {
            newest = newest.max(Some(modified));
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(dir: &Path, build: Option<&str>) -> ComponentSource {
        ComponentSource {
            dir: dir.to_path_buf(),
            build: build.map(String::from),
            wasm: dir.join("out/c.wasm"),
            watch: Vec::new(),
        }
    }

    #[tokio::test]
    async fn builds_when_missing_and_skips_when_fresh() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("src.txt"), "x").unwrap();
        let d = decl(tmp.path(), Some("mkdir -p out && echo built >> out/c.wasm"));
        ensure_built("c", &d).await.unwrap();
        ensure_built("c", &d).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&d.wasm).unwrap(),
            "built\n",
            "second call must not rebuild"
        );
    }

    #[tokio::test]
    async fn reports_failing_and_lying_builds() {
        let tmp = tempfile::tempdir().unwrap();
        let err = ensure_built("c", &decl(tmp.path(), Some("echo broken >&2; exit 3")))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("exit status: 3") && text.contains("broken"),
            "{text}"
        );
        let err = ensure_built("c", &decl(tmp.path(), Some("true")))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not produce"), "{err}");
        let err = ensure_built("c", &decl(tmp.path(), None))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
