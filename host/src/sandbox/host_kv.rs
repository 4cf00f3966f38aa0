//! The host side of `realm:inference/kv`, backed by the tenant's
//! [`KvStore`](super::kv_store::KvStore). Each call is disk I/O: it runs on
//! a blocking thread, never on the async threads that serve other tenants.

use std::sync::Arc;

use super::bindings::kv;
use super::bindings::types::Error;
use super::kv_store::{KvError, KvStore};
use super::state::GuestState;

impl From<KvError> for Error {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Invalid(m) => Error::InvalidInput(m),
            KvError::Full => Error::QuotaExceeded(e.to_string()),
            KvError::Storage(_) | KvError::Io(_) => {
                tracing::warn!(error = &e as &dyn std::error::Error, "kv storage failed");
                Error::Runtime(e.to_string())
            }
        }
    }
}

/// Runs `op` on `store` on a blocking thread.
async fn blocking<T: Send + 'static>(
    store: Arc<KvStore>,
    op: impl FnOnce(&KvStore) -> Result<T, KvError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(move || op(&store))
        .await
        .map_err(|e| Error::Runtime(format!("kv task failed: {e}")))?
        .map_err(Error::from)
}

impl kv::Host for GuestState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, Error> {
        blocking(self.kv.clone(), move |s| s.get(&key)).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), Error> {
        blocking(self.kv.clone(), move |s| s.set(&key, &value)).await
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        blocking(self.kv.clone(), move |s| {
            s.compare_and_swap(&key, expected.as_deref(), new.as_deref())
        })
        .await
    }

    async fn delete(&mut self, key: String) -> Result<bool, Error> {
        blocking(self.kv.clone(), move |s| s.delete(&key)).await
    }

    async fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, Error> {
        blocking(self.kv.clone(), move |s| s.list_keys(&prefix)).await
    }
}
