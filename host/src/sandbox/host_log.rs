//! The host side of `realm:inference/log`: guest records become `tracing`
//! events tagged with tenant and component.

use super::bindings::log::{self, Level};
use super::bindings::types;
use super::state::GuestState;

/// Longest guest log message kept; longer ones are cut.
const MAX_MESSAGE_BYTES: usize = 8 << 10;

impl log::Host for GuestState {
    async fn log(&mut self, level: Level, mut message: String) {
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        let (tenant, component) = (&*self.tenant, &*self.component);
        match level {
            Level::Trace => tracing::trace!(target: "realm::guest", tenant, component, "{message}"),
            Level::Debug => tracing::debug!(target: "realm::guest", tenant, component, "{message}"),
            Level::Info => tracing::info!(target: "realm::guest", tenant, component, "{message}"),
            Level::Warn => tracing::warn!(target: "realm::guest", tenant, component, "{message}"),
            Level::Error => tracing::error!(target: "realm::guest", tenant, component, "{message}"),
        }
    }
}

impl types::Host for GuestState {}
