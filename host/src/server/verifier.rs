//! Argon2 key verification on a fixed pool of threads.
//!
//! Each verification needs 19 MiB (the default cost) of working memory.
//! Handing each to `spawn_blocking` let a flood of wrong keys run hundreds at
//! once and left gigabytes in the allocator afterwards. Here a few threads
//! each own one buffer, reused for every key, behind a short bounded queue:
//! memory is fixed at start, and a full queue is refused at once instead of
//! piling up. The threads run at a lower scheduling priority (nice 10 on
//! Linux): keys are checked with the CPU the tenants' generations leave, so
//! a flood of wrong keys slows key checks, not the tenants already served.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::keys::StoredHash;

/// One key to check against its candidate hashes.
struct Task {
    key: String,
    hashes: Vec<Arc<StoredHash>>,
    reply: oneshot::Sender<Option<Arc<str>>>,
}

/// The queue is full: too many verifications are waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// The verification threads and their queue.
pub struct Verifier {
    queue: SyncSender<Task>,
}

impl Verifier {
    /// Starts `threads` verification threads (at least one) behind a queue
    /// of `queue` waiting keys.
    pub fn start(threads: usize, queue: usize) -> std::io::Result<Verifier> {
        let (tx, rx) = std::sync::mpsc::sync_channel(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("realm-verify-{i}"))
                .spawn(move || {
                    lower_priority();
                    work(&rx)
                })?;
        }
        Ok(Verifier { queue: tx })
    }

    /// The PHC string of the hash in `hashes` that `key` matches, or `None`
    /// (see [`super::keys::matching`]); [`Busy`] when the queue is full.
    pub async fn verify(
        &self,
        key: &str,
        hashes: Vec<Arc<StoredHash>>,
    ) -> Result<Option<Arc<str>>, Busy> {
        let (reply, answer) = oneshot::channel();
        let task = Task {
            key: key.to_string(),
            hashes,
            reply,
        };
        match self.queue.try_send(task) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(Busy),
            // The threads are gone (they never exit while the sender lives).
            Err(TrySendError::Disconnected(_)) => return Ok(None),
        }
        Ok(answer.await.ok().flatten())
    }
}

/// Lowers the calling thread's scheduling priority (Linux; elsewhere a no-op).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only reads its integer arguments; on Linux,
        // PRIO_PROCESS with id 0 names the calling thread. A failure leaves
        // the priority as it was, which is still correct, only less polite.
        let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    }
}

fn work(tasks: &Mutex<Receiver<Task>>) {
    let mut memory = Vec::new();
    loop {
        let task = {
            let rx = tasks.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(task) => task,
                Err(_) => return,
            }
        };
        // The caller gave up (its client hung up): skip the work.
        if task.reply.is_closed() {
            continue;
        }
        let matched = super::keys::matching(&task.hashes, task.key.as_bytes(), &mut memory);
        let _ = task.reply.send(matched);
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::ApiKey;
    use super::*;

    #[tokio::test]
    async fn keys_verify_and_a_full_queue_is_refused() {
        let key = ApiKey::generate("acme").unwrap();
        let hash = Arc::new(StoredHash::parse(&key.hash().unwrap()).unwrap());
        let verifier = Verifier::start(1, 1).unwrap();
        let phc = verifier.verify(key.as_str(), vec![hash.clone()]).await;
        assert_eq!(phc, Ok(Some(hash.phc().clone())));
        let wrong = ApiKey::generate("acme").unwrap();
        assert_eq!(
            verifier.verify(wrong.as_str(), vec![hash.clone()]).await,
            Ok(None)
        );
        // One running, one queued: the rest are refused without waiting.
        let attempts: Vec<_> = (0..8)
            .map(|_| verifier.verify(wrong.as_str(), vec![hash.clone()]))
            .collect();
        let results = futures_util::future::join_all(attempts).await;
        assert!(results.contains(&Err(Busy)), "{results:?}");
        assert!(results.contains(&Ok(None)), "{results:?}");
    }
}
