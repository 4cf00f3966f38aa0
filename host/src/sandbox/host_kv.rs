//! The host side of `realm:inference/kv`, backed by the tenant's [`KvStore`](super::kv_store::KvStore).

use super::bindings::kv;
use super::bindings::types::Error;
use super::kv_store::KvError;
use super::state::GuestState;

impl From<KvError> for Error {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Invalid(m) => Error::InvalidInput(m),
            KvError::Full => Error::QuotaExceeded(e.to_string()),
            KvError::Io(_) => Error::Runtime(e.to_string()),
        }
    }
}

impl kv::Host for GuestState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.kv.get(&key)?)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), Error> {
        Ok(self.kv.set(&key, &value)?)
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        Ok(self
            .kv
            .compare_and_swap(&key, expected.as_deref(), new.as_deref())?)
    }

    async fn delete(&mut self, key: String) -> Result<bool, Error> {
        Ok(self.kv.delete(&key)?)
    }

    async fn list_keys(&mut self, prefix: String) -> Result<Vec<String>, Error> {
        Ok(self.kv.list_keys(&prefix)?)
    }
}
