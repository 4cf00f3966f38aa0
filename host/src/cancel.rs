//! Cancelling blocking work when the async caller goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Sets its flag when dropped. An async task holds the guard while blocking
/// work (a generation) polls the flag; when the task is abandoned (a client
/// hangs up, a request is cancelled, a guest hits its deadline) the guard is
/// dropped and the work stops at its next check.
pub struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    /// A guard and the flag it sets.
    pub fn new() -> (CancelOnDrop, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (CancelOnDrop(flag.clone()), flag)
    }

    /// A guard for an existing `flag`.
    pub fn on(flag: Arc<AtomicBool>) -> CancelOnDrop {
        CancelOnDrop(flag)
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_guard_sets_the_flag() {
        let (guard, flag) = CancelOnDrop::new();
        assert!(!flag.load(Ordering::Relaxed));
        drop(guard);
        assert!(flag.load(Ordering::Relaxed));
    }
}
