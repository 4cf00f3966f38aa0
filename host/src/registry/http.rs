//! Fetching model files over HTTP(S), resumable, with a progress bar.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::store::RegistryError;

/// Downloads `url` into `partial`, continuing where an earlier attempt stopped.
pub(crate) fn download(url: &str, partial: &Path) -> Result<(), RegistryError> {
    download_with(url, partial, None)
}

/// [`download`] with an `Authorization` header.
pub(crate) fn download_with(
    url: &str,
    partial: &Path,
    authorization: Option<&str>,
) -> Result<(), RegistryError> {
    let fail = |m: String| RegistryError::Fetch(format!("{url}: {m}"));
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let mut request = agent.get(url);
    if let Some(value) = authorization {
        request = request.set("Authorization", value);
    }
    if have > 0 {
        request = request.set("Range", &format!("bytes={have}-"));
    }
    let response = match request.call() {
        Ok(r) => r,
        // The partial file is already complete.
        Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
        Err(ureq::Error::Status(code, r)) => {
            return Err(fail(format!("HTTP {code} {}", r.status_text())));
        }
        // ureq's transport errors name the URL themselves.
        Err(e) => return Err(RegistryError::Fetch(e.to_string())),
    };
    let resumed = response.status() == 206;
    let remaining: Option<u64> = response
        .header("Content-Length")
        .and_then(|v| v.parse().ok());
    let start = if resumed { have } else { 0 };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(partial)
        .map_err(RegistryError::Store)?;
    if resumed {
        tracing::info!(url, bytes = have, "resuming download");
    }
    let bar = progress_bar(remaining.map(|r| r + start), start);
    let mut reader = response.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(fail(format!(
                    "download interrupted ({e}); run the same pull again to resume"
                )));
            }
        };
        file.write_all(&buf[..n]).map_err(RegistryError::Store)?;
        bar.inc(n as u64);
    }
    file.flush().map_err(RegistryError::Store)?;
    bar.finish_and_clear();
    let got = std::fs::metadata(partial)
        .map_err(RegistryError::Store)?
        .len();
    if let Some(total) = remaining.map(|r| r + start)
        && got != total
    {
        return Err(fail(format!(
            "got {got} of {total} bytes; run the same pull again to resume"
        )));
    }
    Ok(())
}

fn progress_bar(total: Option<u64>, position: u64) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::new_spinner(),
    };
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar.set_position(position);
    bar
}
