//! Any text as a pipeline file: checked into a plan, or refused with
//! diagnostics that point inside the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use realm_host::pipeline::{PipelineError, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(Path::new("fuzz/pipeline.toml"), text) {
        Ok(_) => {}
        Err(PipelineError::Invalid { diagnostics, .. }) => assert!(!diagnostics.is_empty()),
        Err(_) => {}
    }
});
