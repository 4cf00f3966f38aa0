//! API keys: `rk_<tenant>_<64 hex digits>`, shown once when made; the server
//! keeps only their Argon2id hashes, parsed once when the configuration loads.
//! A verified key is remembered (by its SHA-256) so only a key's first use
//! pays for Argon2.
//!
//! Verification itself runs in [`super::verifier`], on a fixed set of threads
//! with reused memory: Argon2 needs 19 MiB per attempt, and an unbounded
//! number of attempts at once was a way to exhaust the server's memory
//! without a key.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use sha2::{Digest, Sha256};

/// The prefix of tenant keys.
pub const TENANT_PREFIX: &str = "rk_";

/// Keys remembered as verified before the memory is cleared.
const VERIFIED_CACHE: usize = 10_000;

/// The most memory one stored hash may ask Argon2 for, in KiB (64 MiB: over
/// three times the default). Each verifier thread keeps a buffer this large
/// at most.
pub const MAX_M_COST_KIB: u32 = 64 * 1024;

/// The most passes one stored hash may ask for.
const MAX_T_COST: u32 = 16;

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
        Self::generate_with(TENANT_PREFIX, tenant)
    }

    /// A new random key `<prefix><owner>_<64 hex>` (`rk_` for tenants,
    /// `rka_` for admins).
    pub fn generate_with(prefix: &str, owner: &str) -> Result<Self, KeyError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(KeyError::Random)?;
        Ok(ApiKey(format!("{prefix}{owner}_{}", hex::encode(secret))))
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

/// The tenant a key claims to belong to, if the key has the shape of one
/// (`rk_<tenant>_<64 hex digits>`). The shape is public, so refusing a
/// misshapen key early tells a caller nothing about which tenants exist.
pub fn claimed_tenant(key: &str) -> Option<&str> {
    claimed(TENANT_PREFIX, key)
}

/// The owner a key of the form `<prefix><owner>_<64 hex digits>` claims.
pub fn claimed<'k>(prefix: &str, key: &'k str) -> Option<&'k str> {
    let (tenant, secret) = key.strip_prefix(prefix)?.rsplit_once('_')?;
    let shaped = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && secret.len() == 64
        && secret.bytes().all(|b| b.is_ascii_hexdigit());
    shaped.then_some(tenant)
}

/// Checks that `hash` is an Argon2 PHC string (not, say, a pasted key) whose
/// cost the server will pay.
pub fn check_hash(hash: &str) -> Result<(), String> {
    StoredHash::parse(hash).map(|_| ())
}

/// One stored key hash, parsed once: Argon2 with the hash's own parameters,
/// its salt, and the output a matching key produces.
pub struct StoredHash {
    phc: Arc<str>,
    argon2: Argon2<'static>,
    salt: Vec<u8>,
    expected: Vec<u8>,
}

impl std::fmt::Debug for StoredHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredHash")
            .field("phc", &self.phc)
            .finish()
    }
}

impl StoredHash {
    /// Parses a PHC string, refusing other algorithms and costs above the
    /// server's bounds.
    pub fn parse(phc: &str) -> Result<Self, String> {
        let parsed = PasswordHash::new(phc).map_err(|e| {
            format!("not an argon2 hash ({e}); store the output of `realm-host keys new`")
        })?;
        let algorithm = Algorithm::try_from(parsed.algorithm)
            .map_err(|_| format!("hash algorithm `{}` is not argon2", parsed.algorithm))?;
        let version = match parsed.version {
            Some(v) => Version::try_from(v).map_err(|e| format!("argon2 version {v}: {e}"))?,
            None => Version::default(),
        };
        let params = Params::try_from(&parsed).map_err(|e| format!("argon2 parameters: {e}"))?;
        if params.m_cost() > MAX_M_COST_KIB || params.t_cost() > MAX_T_COST {
            return Err(format!(
                "argon2 cost m={} KiB, t={} is above the server's bound (m <= {MAX_M_COST_KIB}, t <= {MAX_T_COST}); make the key again with `realm-host keys new`",
                params.m_cost(),
                params.t_cost()
            ));
        }
        let salt = parsed.salt.ok_or("the hash has no salt")?;
        let mut buf = [0u8; 64];
        let salt = salt
            .decode_b64(&mut buf)
            .map_err(|e| format!("the hash's salt: {e}"))?
            .to_vec();
        let expected = parsed
            .hash
            .ok_or("the hash has no output")?
            .as_bytes()
            .to_vec();
        Ok(StoredHash {
            phc: Arc::from(phc),
            argon2: Argon2::new(algorithm, version, params),
            salt,
            expected,
        })
    }

    /// Argon2 blocks (1 KiB each) one verification needs.
    pub fn blocks(&self) -> usize {
        self.argon2.params().block_count()
    }

    /// The PHC string this was parsed from.
    pub fn phc(&self) -> &Arc<str> {
        &self.phc
    }

    /// Whether `key` hashes to this, computed in `memory` (grown to
    /// [`StoredHash::blocks`] if smaller, never shrunk: the caller reuses it).
    pub fn matches(&self, key: &[u8], memory: &mut Vec<Block>) -> bool {
        if memory.len() < self.blocks() {
            memory.resize(self.blocks(), Block::default());
        }
        let mut out = vec![0u8; self.expected.len()];
        let blocks = self.blocks();
        if self
            .argon2
            .hash_password_into_with_memory(key, &self.salt, &mut out, &mut memory[..blocks])
            .is_err()
        {
            return false;
        }
        // Constant time: every byte is compared whatever the first differing one.
        out.iter()
            .zip(&self.expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The PHC string of the hash in `hashes` that `key` matches, computed in
/// `memory` (reused between calls). Every hash is tried whatever matched,
/// so the time taken tells nothing but the number of hashes.
pub fn matching(
    hashes: &[Arc<StoredHash>],
    key: &[u8],
    memory: &mut Vec<Block>,
) -> Option<Arc<str>> {
    let mut matched = None;
    for hash in hashes {
        if hash.matches(key, memory) && matched.is_none() {
            matched = Some(hash.phc().clone());
        }
    }
    matched
}

/// Who a verified key belongs to, and which stored hash it matched (so a
/// reload can tell whether the key is still configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The tenant.
    pub tenant: String,
    /// The PHC string of the matching hash.
    pub hash: Arc<str>,
}

/// The hashes one key must be checked against.
pub struct Candidates {
    /// The tenant the key claims, when it is configured.
    pub tenant: Option<String>,
    /// That tenant's hashes; for an unknown tenant a decoy of the same cost,
    /// so both answers take as long.
    pub hashes: Vec<Arc<StoredHash>>,
}

/// Every tenant's key hashes; answers "whose key is this?".
pub struct KeyRing {
    prefix: &'static str,
    hashes: BTreeMap<String, Vec<Arc<StoredHash>>>,
    decoy: Arc<StoredHash>,
    verified: Mutex<HashMap<[u8; 32], Verified>>,
}

impl KeyRing {
    /// A ring over `tenant id → key hashes` (PHC strings); hashes that do
    /// not parse are left out (the configuration check reports them).
    pub fn new(hashes: BTreeMap<String, Vec<String>>) -> Self {
        Self::with_prefix(TENANT_PREFIX, hashes)
    }

    /// A ring of keys shaped `<prefix><owner>_<64 hex>` over `owner → key
    /// hashes` (the admin keys use `rka_`).
    pub fn with_prefix(prefix: &'static str, hashes: BTreeMap<String, Vec<String>>) -> Self {
        let hashes: BTreeMap<String, Vec<Arc<StoredHash>>> = hashes
            .into_iter()
            .map(|(tenant, list)| {
                let parsed = list
                    .iter()
                    .filter_map(|h| StoredHash::parse(h).ok().map(Arc::new))
                    .collect();
                (tenant, parsed)
            })
            .collect();
        KeyRing {
            prefix,
            hashes,
            decoy: decoy(),
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The prefix of this ring's keys (`rk_` or `rka_`).
    pub fn prefix(&self) -> &'static str {
        self.prefix
    }

    /// The owner `key` claims, if it has this ring's shape.
    pub fn claimed<'k>(&self, key: &'k str) -> Option<&'k str> {
        claimed(self.prefix, key)
    }

    /// The tenant of `key` if it was verified before, without Argon2.
    pub fn cached(&self, key: &str) -> Option<Verified> {
        self.lock().get(&digest(key)).cloned()
    }

    /// What `key` must be checked against; `None` for a misshapen key.
    pub fn candidates(&self, key: &str) -> Option<Candidates> {
        let claimed = claimed(self.prefix, key)?;
        Some(match self.hashes.get(claimed) {
            Some(hashes) if !hashes.is_empty() => Candidates {
                tenant: Some(claimed.to_string()),
                hashes: hashes.clone(),
            },
            _ => Candidates {
                tenant: None,
                hashes: vec![self.decoy.clone()],
            },
        })
    }

    /// Remembers that `key` verified as `verified`.
    pub fn remember(&self, key: &str, verified: Verified) {
        let mut cache = self.lock();
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(digest(key), verified);
    }

    /// Whether `verified` still stands: its tenant still holds its hash.
    pub fn holds(&self, verified: &Verified) -> bool {
        self.hashes
            .get(&verified.tenant)
            .is_some_and(|hashes| hashes.iter().any(|h| *h.phc == *verified.hash))
    }

    /// Carries over `old`'s verified keys that still stand here (a reload
    /// should not make every client pay for Argon2 again).
    pub fn carry_from(&self, old: &KeyRing) {
        let kept: HashMap<[u8; 32], Verified> = old
            .lock()
            .iter()
            .filter(|(_, v)| self.holds(v))
            .map(|(d, v)| (*d, v.clone()))
            .collect();
        *self.lock() = kept;
    }

    /// The tenant `key` belongs to, or `None`, verified on the calling
    /// thread (blocking; for the CLI and tests — the server uses the
    /// bounded verifier).
    pub fn tenant_of(&self, key: &str) -> Option<String> {
        if let Some(v) = self.cached(key) {
            return Some(v.tenant);
        }
        let candidates = self.candidates(key)?;
        let hash = matching(&candidates.hashes, key.as_bytes(), &mut Vec::new())?;
        let tenant = candidates.tenant?;
        self.remember(
            key,
            Verified {
                tenant: tenant.clone(),
                hash,
            },
        );
        Some(tenant)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Verified>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A stored hash with the default parameters (those `keys new` uses) whose
/// expected output is random, so no key matches it: checked for keys of
/// unknown tenants.
fn decoy() -> Arc<StoredHash> {
    static DECOY: std::sync::OnceLock<Arc<StoredHash>> = std::sync::OnceLock::new();
    DECOY
        .get_or_init(|| {
            let mut salt = [7u8; 16];
            let mut expected = [0u8; 32];
            // Without randomness the decoy still costs the same; only its
            // output becomes guessable, and it never grants a tenant anyway.
            let _ = getrandom::fill(&mut salt);
            let _ = getrandom::fill(&mut expected);
            Arc::new(StoredHash {
                phc: Arc::from("decoy"),
                argon2: Argon2::default(),
                salt: salt.to_vec(),
                expected: expected.to_vec(),
            })
        })
        .clone()
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
        assert!(ring.cached(key.as_str()).is_some(), "remembered");
        assert_eq!(ring.tenant_of(other.as_str()), None);
        assert_eq!(
            ring.tenant_of(&format!("rk_nobody_{}", "0".repeat(64))),
            None
        );
        assert_eq!(ring.tenant_of("rk_nobody_00"), None);
        assert_eq!(ring.tenant_of("garbage"), None);
        assert_eq!(ring.tenant_of(""), None);
    }

    #[test]
    fn unknown_tenants_are_checked_against_a_decoy_of_the_same_cost() {
        let key = ApiKey::generate("acme").unwrap();
        let ring = KeyRing::new(BTreeMap::from([(
            "acme".to_string(),
            vec![key.hash().unwrap()],
        )]));
        let known = ring
            .candidates(ApiKey::generate("acme").unwrap().as_str())
            .unwrap();
        let unknown = ring
            .candidates(ApiKey::generate("ghost").unwrap().as_str())
            .unwrap();
        assert_eq!(known.tenant.as_deref(), Some("acme"));
        assert_eq!(unknown.tenant, None);
        assert_eq!(known.hashes.len(), unknown.hashes.len());
        assert_eq!(known.hashes[0].blocks(), unknown.hashes[0].blocks());
        assert!(ring.candidates("rk_acme_short").is_none());
    }

    #[test]
    fn a_reload_keeps_verified_keys_only_while_their_hash_stays() {
        let key = ApiKey::generate("acme").unwrap();
        let hash = key.hash().unwrap();
        let old = KeyRing::new(BTreeMap::from([("acme".to_string(), vec![hash.clone()])]));
        assert!(old.tenant_of(key.as_str()).is_some());
        let verified = old.cached(key.as_str()).unwrap();
        let same = KeyRing::new(BTreeMap::from([("acme".to_string(), vec![hash])]));
        same.carry_from(&old);
        assert!(same.holds(&verified));
        assert_eq!(same.cached(key.as_str()), Some(verified.clone()));
        let rotated = ApiKey::generate("acme").unwrap().hash().unwrap();
        let revoked = KeyRing::new(BTreeMap::from([("acme".to_string(), vec![rotated])]));
        revoked.carry_from(&old);
        assert!(!revoked.holds(&verified));
        assert_eq!(revoked.cached(key.as_str()), None);
    }

    #[test]
    fn hashes_are_checked_for_shape_and_cost() {
        assert!(check_hash(&ApiKey::generate("a").unwrap().hash().unwrap()).is_ok());
        assert!(check_hash("rk_a_0123").is_err());
        let costly = "$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHRzYWx0$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let err = check_hash(costly).unwrap_err();
        assert!(err.contains("above the server's bound"), "{err}");
    }
}
