//! Models on the Hugging Face Hub: `hf:OWNER/REPO/PATH.gguf[@REVISION]`.
//!
//! The hub answers `{endpoint}/{repo}/resolve/{revision}/{path}` with a
//! redirect to its storage, and says in headers what the file is: for files
//! kept in Git LFS (every GGUF), `X-Linked-Etag` is the sha256 of the
//! content and `X-Linked-Size` its size. Realm asks first (HEAD, no
//! redirect), downloads from where it points (resumably), and checks the
//! sha256. `HF_TOKEN` is sent to the hub only, never to the storage it
//! redirects to; `HF_ENDPOINT` replaces the hub, as for Hugging Face's own
//! tools.

use std::time::Duration;

use super::store::RegistryError;

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// One file on the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    /// `OWNER/REPO`.
    pub repo: String,
    /// The file's path in the repository.
    pub path: String,
    /// A branch, tag or commit.
    pub revision: String,
}

/// What the hub says about a file before it is downloaded.
#[derive(Debug)]
pub(crate) struct Listing {
    /// Where to download it from.
    pub(crate) location: String,
    /// Its sha256, when the hub gives one.
    pub(crate) sha256: Option<String>,
    /// Its size, when the hub gives one.
    pub(crate) size: Option<u64>,
}

impl HubFile {
    /// `OWNER/REPO/PATH.gguf[@REVISION]` (the part after `hf:`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (rest, revision) = match spec.rsplit_once('@') {
            Some((rest, rev)) if !rev.is_empty() && !rev.contains('/') => (rest, rev),
            Some(_) => return Err("the revision after `@` is empty or has a `/`".into()),
            None => (spec, "main"),
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err("expected OWNER/REPO/FILE.gguf".into());
        };
        let safe = |s: &str| {
            !s.is_empty()
                && s.split('/')
                    .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"?#%\\".contains(&b))
        };
        if !safe(owner) || !safe(name) || !safe(path) || !safe(revision) {
            return Err("owner, repository, path and revision must be plain URL path text".into());
        }
        if !path.ends_with(".gguf") {
            return Err(format!("`{path}` is not a .gguf file"));
        }
        if let Some((no, _)) = split_of(path)
            && no != 1
        {
            return Err(format!(
                "`{path}` is part {no} of a split GGUF: name the first part (`-00001-of-`)"
            ));
        }
        Ok(HubFile {
            repo: format!("{owner}/{name}"),
            path: path.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The model's name: the file's without directories, `.gguf` or a
    /// split's `-00001-of-0000N`.
    pub fn stem(&self) -> &str {
        let name = self.path.rsplit('/').next().unwrap_or(&self.path);
        let name = name.strip_suffix(".gguf").unwrap_or(name);
        match split_of(&self.path) {
            Some(_) => &name[..name.len() - SPLIT_SUFFIX],
            None => name,
        }
    }

    /// The files of the model: this one, or every part of a split one.
    pub fn parts(&self) -> Vec<HubFile> {
        let Some((_, count)) = split_of(&self.path) else {
            return vec![self.clone()];
        };
        let base = &self.path[..self.path.len() - ".gguf".len() - SPLIT_SUFFIX];
        (1..=count)
            .map(|no| HubFile {
                path: format!("{base}-{no:05}-of-{count:05}.gguf"),
                ..self.clone()
            })
            .collect()
    }

    /// Its `resolve` URL on the hub at `endpoint`.
    pub fn url(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            self.repo,
            self.revision,
            self.path
        )
    }

    /// Asks the hub at `endpoint` where the file is and what it is.
    pub(crate) fn list(
        &self,
        endpoint: &str,
        token: Option<&str>,
    ) -> Result<Listing, RegistryError> {
        let url = self.url(endpoint);
        let fail = |m: String| RegistryError::Fetch(format!("{url}: {m}"));
        let agent = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(60))
            .build();
        let mut request = agent.head(&url);
        if let Some(token) = token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(401 | 403, _)) => {
                return Err(fail(
                    "the hub refused access (a gated or private model: set HF_TOKEN)".into(),
                ));
            }
            Err(ureq::Error::Status(404, _)) => {
                return Err(fail(format!(
                    "no such file at revision `{}` (check the repository, path and revision)",
                    self.revision
                )));
            }
            Err(ureq::Error::Status(code, r)) => {
                return Err(fail(format!("HTTP {code} {}", r.status_text())));
            }
            // ureq's transport errors name the URL themselves.
            Err(e) => return Err(RegistryError::Fetch(e.to_string())),
        };
        let location = match response.status() {
            200 => url.clone(),
            301..=308 => {
                let to = response
                    .header("Location")
                    .ok_or_else(|| fail("a redirect without a Location".into()))?;
                if to.contains("://") {
                    to.to_string()
                } else {
                    // Relative to the hub.
                    format!(
                        "{}/{}",
                        endpoint.trim_end_matches('/'),
                        to.trim_start_matches('/')
                    )
                }
            }
            code => return Err(fail(format!("unexpected HTTP {code}"))),
        };
        let etag = response
            .header("X-Linked-Etag")
            .or_else(|| response.header("ETag"))
            .unwrap_or_default();
        let etag = etag.trim_start_matches("W/").trim_matches('"');
        let sha256 = (etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| etag.to_ascii_lowercase());
        let size = response
            .header("X-Linked-Size")
            .and_then(|v| v.parse().ok());
        Ok(Listing {
            location,
            sha256,
            size,
        })
    }
}

/// Bytes of a split's `-00001-of-00003` suffix.
const SPLIT_SUFFIX: usize = 15;

/// The part number and count of a split GGUF's part
/// (`NAME-00001-of-00003.gguf`); `None` for a whole file.
fn split_of(path: &str) -> Option<(u32, u32)> {
    let stem = path.strip_suffix(".gguf")?;
    let tail = stem.get(stem.len().checked_sub(SPLIT_SUFFIX)?..)?;
    let (no, count) = tail.strip_prefix('-')?.split_once("-of-")?;
    let digits = |s: &str| {
        (s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (no, count): (u32, u32) = (digits(no)?, digits(count)?);
    (no >= 1 && no <= count).then_some((no, count))
}

/// Whether `url` is on the hub at `endpoint` (so the token may go with it).
pub(crate) fn on_hub(url: &str, endpoint: &str) -> bool {
    fn origin(u: &str) -> Option<String> {
        let (scheme, rest) = u.split_once("://")?;
        let host = rest.split('/').next()?;
        Some(format!("{scheme}://{host}").to_ascii_lowercase())
    }
    origin(url).is_some() && origin(url) == origin(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        let f = HubFile::parse("Qwen/Qwen3-0.6B-GGUF/Qwen3-0.6B-Q8_0.gguf").unwrap();
        assert_eq!(
            (f.repo.as_str(), f.path.as_str(), f.revision.as_str()),
            ("Qwen/Qwen3-0.6B-GGUF", "Qwen3-0.6B-Q8_0.gguf", "main")
        );
        assert_eq!(f.stem(), "Qwen3-0.6B-Q8_0");
        assert_eq!(
            f.url("https://huggingface.co/"),
            "https://huggingface.co/Qwen/Qwen3-0.6B-GGUF/resolve/main/Qwen3-0.6B-Q8_0.gguf"
        );
        let f = HubFile::parse("a/b/dir/x.gguf@v1.0").unwrap();
        assert_eq!(
            (f.path.as_str(), f.revision.as_str(), f.stem()),
            ("dir/x.gguf", "v1.0", "x")
        );
        for bad in [
            "a/b",
            "a/b/x.bin",
            "a/b/../x.gguf",
            "a/b/x.gguf@",
            "a//x.gguf",
            "a/b/x y.gguf",
        ] {
            assert!(HubFile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_stays_on_the_hub() {
        assert!(on_hub(
            "https://huggingface.co/a/b/resolve/main/x.gguf",
            "https://huggingface.co"
        ));
        assert!(!on_hub("https://cdn-lfs.hf.co/x", "https://huggingface.co"));
        assert!(!on_hub(
            "https://huggingface.co.evil/x",
            "https://huggingface.co"
        ));
    }
}
