//! Any text as a WebSocket frame from a client: parsed into a request, or
//! refused with an error that carries the frame's id when it has one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use realm_host::server::protocol::{frame_id, parse_frame};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_frame(text) {
        Ok(frame) => assert_eq!(frame.id().map(str::to_string), frame_id(text)),
        Err((id, error)) => {
            assert!(!error.message.is_empty());
            if let Some(id) = id {
                assert_eq!(Some(id), frame_id(text));
            }
        }
    }
});
