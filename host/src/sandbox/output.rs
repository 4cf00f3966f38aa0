//! Guest stdout/stderr, captured line by line into the host's `tracing` log.
//! The last lines are also kept, so an error from a trapping guest can say
//! what the guest printed last (a Python traceback, a Rust panic message).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Which guest stream a [`GuestOutput`] captures.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug)]
struct Lines {
    tenant: Arc<str>,
    component: Arc<str>,
    stream: Stream,
    pending: Vec<u8>,
    budget: usize,
    truncated: bool,
    /// The last lines written, newest last (at most [`TAIL_LINES`]).
    tail: VecDeque<String>,
}

/// Lines kept for error messages, and the most characters kept of each.
const TAIL_LINES: usize = 8;
const TAIL_LINE_CHARS: usize = 300;

impl Lines {
    fn accept(&mut self, bytes: &[u8]) {
        let kept = bytes.len().min(self.budget);
        self.budget -= kept;
        self.pending.extend_from_slice(&bytes[..kept]);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line[..end]);
        }
        if kept < bytes.len() && !self.truncated {
            self.truncated = true;
            self.flush_partial();
            tracing::warn!(
                tenant = %self.tenant,
                component = %self.component,
                stream = self.stream.name(),
                "guest output exceeded its log limit; the rest of this call's output is dropped"
            );
        }
    }

    fn flush_partial(&mut self) {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
    }

    fn emit(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail
            .push_back(text.chars().take(TAIL_LINE_CHARS).collect());
        tracing::info!(
            target: "realm::guest",
            tenant = %self.tenant,
            component = %self.component,
            stream = self.stream.name(),
            "{text}"
        );
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        self.flush_partial();
    }
}

/// A WASI output stream that logs each line the guest writes, up to a byte
/// budget per call; output past the budget is dropped (the guest never sees an
/// error, so chatty guests are not killed for logging).
#[derive(Debug, Clone)]
pub(crate) struct GuestOutput(Arc<Mutex<Lines>>);

impl GuestOutput {
    pub(crate) fn new(
        tenant: Arc<str>,
        component: Arc<str>,
        stream: Stream,
        budget: usize,
    ) -> Self {
        GuestOutput(Arc::new(Mutex::new(Lines {
            tenant,
            component,
            stream,
            pending: Vec::new(),
            budget,
            truncated: false,
            tail: VecDeque::new(),
        })))
    }

    /// The last lines written so far (a partial last line included), oldest first.
    pub(crate) fn tail(&self) -> Vec<String> {
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.flush_partial();
        lines.tail.iter().cloned().collect()
    }

    fn write(&self, bytes: &[u8]) {
        // A poisoned lock only means an earlier write panicked mid-log; keep logging.
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.accept(bytes);
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// Writes complete synchronously: logging never blocks the guest.
#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestOutput::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(1 << 20)
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_output_within_budget() {
        let out = GuestOutput::new("t".into(), "c".into(), Stream::Stdout, 10);
        out.write(b"hello\nwor");
        out.write(b"ld and much more\n");
        let lines = out.0.lock().unwrap();
        assert!(lines.truncated);
        assert_eq!(lines.budget, 0);
        assert!(
            lines.pending.is_empty(),
            "partial line flushed on truncation"
        );
    }

    #[test]
    fn keeps_the_last_lines_for_errors() {
        let out = GuestOutput::new("t".into(), "c".into(), Stream::Stderr, 1 << 20);
        for i in 0..20 {
            out.write(format!("line {i}\n").as_bytes());
        }
        out.write(b"ValueError: boom");
        let tail = out.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.first().unwrap(), "line 13");
        assert_eq!(tail.last().unwrap(), "ValueError: boom");
    }
}
