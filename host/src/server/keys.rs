//! API keys: `rk_<tenant>_<64 hex digits>`, shown once when made; the server
//! keeps only their Argon2id hashes. A verified key is remembered (by its
//! SHA-256) so only a key's first use pays for Argon2.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::{Digest, Sha256};

/// Keys remembered as verified before the memory is cleared.
const VERIFIED_CACHE: usize = 10_000;

/// Why a key or its hash could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system gave no random bytes.
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    /// Argon2 refused to hash (only with invalid parameters).
    #[error("hashing the key failed: {0}")]
    Hash(argon2::password_hash::Error),
}

/// A freshly generated key, in plain text: print it once, store its hash.
pub struct ApiKey(String);

impl ApiKey {
    /// A new random key for `tenant`.
    pub fn generate(tenant: &str) -> Result<Self, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(KeyError::Random)?;
        Ok(ApiKey(format!("rk_{tenant}_{}", hex::encode(secret))))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its Argon2id hash in PHC form (`$argon2id$v=19$...`), with a random salt.
    pub fn hash(&self) -> Result<String, KeyError> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(KeyError::Random)?;
        let salt = SaltString::encode_b64(&salt).map_err(KeyError::Hash)?;
        Ok(Argon2::default()
            .hash_password(self.0.as_bytes(), &salt)
            .map_err(KeyError::Hash)?
            .to_string())
    }
}

/// Checks that `hash` is an Argon2 PHC string (not, say, a pasted key).
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|e| {
        format!("not an argon2 hash ({e}); store the output of `realm-host keys new`")
    })?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "hash algorithm `{}` is not argon2",
            parsed.algorithm
        ));
    }
    Ok(())
}

/// Every tenant's key hashes; answers "whose key is this?".
pub struct KeyRing {
    hashes: BTreeMap<String, Vec<String>>,
    verified: Mutex<HashMap<[u8; 32], String>>,
}

impl KeyRing {
    /// A ring over `tenant id → key hashes`.
    pub fn new(hashes: BTreeMap<String, Vec<String>>) -> Self {
        KeyRing {
            hashes,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The tenant `key` belongs to, or `None`. Blocking (Argon2) on a key's first use.
    pub fn tenant_of(&self, key: &str) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some(tenant) = self.lock().get(&digest) {
            return Some(tenant.clone());
        }
        let (prefix, _) = key.strip_prefix("rk_")?.rsplit_once('_')?;
        let hashes = self.hashes.get(prefix)?;
        let matched = hashes.iter().any(|hash| {
            PasswordHash::new(hash).is_ok_and(|h| {
                Argon2::default()
                    .verify_password(key.as_bytes(), &h)
                    .is_ok()
            })
        });
        if !matched {
            return None;
        }
        let mut verified = self.lock();
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(digest, prefix.to_string());
        Some(prefix.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], String>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_verify_against_their_hash_only() {
        let key = ApiKey::generate("acme_corp").unwrap();
        let other = ApiKey::generate("acme_corp").unwrap();
        let ring = KeyRing::new(BTreeMap::from([(
            "acme_corp".to_string(),
            vec![key.hash().unwrap()],
        )]));
        assert_eq!(ring.tenant_of(key.as_str()).as_deref(), Some("acme_corp"));
        assert_eq!(
            ring.tenant_of(key.as_str()).as_deref(),
            Some("acme_corp"),
            "cached"
        );
        assert_eq!(ring.tenant_of(other.as_str()), None);
        assert_eq!(ring.tenant_of("rk_nobody_00"), None);
        assert_eq!(ring.tenant_of("garbage"), None);
        assert_eq!(ring.tenant_of(""), None);
    }

    #[test]
    fn hashes_are_checked_for_shape() {
        assert!(check_hash(&ApiKey::generate("a").unwrap().hash().unwrap()).is_ok());
        assert!(check_hash("rk_a_0123").is_err());
    }
}
