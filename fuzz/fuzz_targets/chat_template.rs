//! Any conversation (roles and contents from the input) through real chat
//! templates: rendered or refused, and where contents are located they are
//! exactly the contents, in order.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use realm_fuzz::{CHATML, template};
use realm_models::chat::{ChatMessage, ChatTemplate};

static TEMPLATES: LazyLock<[ChatTemplate; 2]> =
    LazyLock::new(|| [template("llama", Some(CHATML)), template("gemma3", None)]);

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    // Messages separated by NUL; each `role\ncontent` (a missing role is `user`).
    let messages: Vec<ChatMessage> = text
        .split('\0')
        .take(16)
        .map(|m| match m.split_once('\n') {
            Some((role, content)) => ChatMessage::new(role, content),
            None => ChatMessage::new("user", m),
        })
        .collect();
    let template = &TEMPLATES[first as usize % 2];
    let Ok((rendered, spans)) = template.render_with_contents(&messages, &[]) else {
        return;
    };
    // Located contents are contents (a template may repeat, drop or trim
    // them), in order, without overlaps: what the tokenizer keeps as text.
    let mut end = 0;
    for span in spans.iter().flatten() {
        assert!(
            span.start >= end && span.end <= rendered.len(),
            "spans in order"
        );
        let found = &rendered[span.clone()];
        assert!(
            messages
                .iter()
                .any(|m| found == m.content || found == m.content.trim()),
            "{found:?} is no message's content"
        );
        end = span.end;
    }
});
