//! Any bytes as the body of `/v1/chat/completions` or `/v1/completions`:
//! read into a generation whose sampling settings are then checked, or
//! refused with an error — never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use realm_host::server::OpenAiRequest;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let chat = first & 1 == 1;
    if let Ok((generation, _stream)) = OpenAiRequest::parse(body, chat) {
        let _ = generation.params();
    }
});
