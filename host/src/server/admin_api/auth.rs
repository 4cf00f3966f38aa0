//! Who is calling the admin API: an admin key (`rka_<name>_<64 hex>`,
//! verified like tenant keys: the bounded Argon2 pool, the failure
//! throttles, a decoy for unknown names) or a dashboard session made from
//! one.
//!
//! Sessions are random 256-bit tokens in an `HttpOnly; SameSite=Strict`
//! cookie, kept in memory by their SHA-256 (a restart signs everyone out)
//! and bound to the key that opened them: revoking the key ends them.
//! Changes made with a cookie must also carry `X-Realm-Admin: 1`, a header
//! no other site can make a browser send without a CORS grant we never give.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::control::{Actor, ControlPlane, DbError, keys};
use crate::server::auth::{Denied, bearer_key, verify_in};
use crate::server::keys::KeyRing;
use crate::server::listen::Peer;

use super::{AdminApi, AdminError};

/// The session cookie's name.
const COOKIE: &str = "realm_admin";
/// How long a session lasts.
const SESSION: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first.
const MAX_SESSIONS: usize = 1024;
/// The header a cookie-authenticated change must carry.
const CSRF_HEADER: &str = "x-realm-admin";

/// What an admin principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read and change.
    Admin,
    /// Read only.
    Viewer,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

struct Ring {
    keys: KeyRing,
    roles: HashMap<String, Role>,
}

struct Session {
    principal: String,
    key_hash: Arc<str>,
    expires: Instant,
}

/// The admin keys in force and the open sessions.
pub struct Auth {
    ring: RwLock<Arc<Ring>>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    /// One re-read at a time, so an older read never replaces a newer one.
    reloading: tokio::sync::Mutex<()>,
}

async fn ring(control: &ControlPlane) -> Result<Ring, DbError> {
    let (hashes, roles) = keys::admin_ring(&control.db).await?;
    Ok(Ring {
        keys: KeyRing::with_prefix(keys::ADMIN_PREFIX, hashes),
        roles: (roles.into_iter())
            .filter_map(|(id, role)| Some((id, Role::parse(&role)?)))
            .collect(),
    })
}

impl Auth {
    /// The admin keys in `control`'s database.
    pub async fn load(control: &ControlPlane) -> Result<Auth, DbError> {
        Ok(Auth {
            ring: RwLock::new(Arc::new(ring(control).await?)),
            sessions: Mutex::default(),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// Re-reads the admin keys (after one was made or revoked).
    pub async fn reload(&self, control: &ControlPlane) -> Result<(), DbError> {
        let _turn = self.reloading.lock().await;
        let fresh = ring(control).await?;
        let old = self.ring();
        fresh.keys.carry_from(&old.keys);
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(())
    }

    fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An authenticated caller of the admin API.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its address.
    pub peer: IpAddr,
}

impl Principal {
    /// Refuses (403) unless the principal is an `admin`.
    pub fn require_admin(&self) -> Result<(), AdminError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Viewer => Err(AdminError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this admin key has the `viewer` role: it may read, not change",
            )),
        }
    }

    /// The principal as the audit log names it.
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.name.clone(),
            role: self.role.as_str().into(),
            peer: self.peer.to_string(),
        }
    }
}

fn denied(d: &Denied) -> AdminError {
    match d {
        Denied::Invalid => AdminError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "an admin key is required (Authorization: Bearer rka_…), or sign in at /admin/",
        ),
        Denied::Throttled(_) | Denied::Busy => {
            let error = d.error();
            AdminError {
                retry_after: error.retry_after_ms.map(|ms| ms.div_ceil(1000)),
                ..AdminError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", error.message)
            }
        }
    }
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    (headers.get_all(header::COOKIE).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

async fn by_key(
    api: &AdminApi,
    key: &str,
    peer: IpAddr,
) -> Result<(Principal, Arc<str>), AdminError> {
    let ring = api.auth.ring();
    let verified = verify_in(&api.state, &ring.keys, key, peer)
        .await
        .map_err(|d| denied(&d))?;
    let role = *ring
        .roles
        .get(&verified.tenant)
        .ok_or_else(|| denied(&Denied::Invalid))?;
    api.control.ledger.touch(&verified.hash);
    Ok((
        Principal {
            name: verified.tenant,
            role,
            peer,
        },
        verified.hash,
    ))
}

impl FromRequestParts<Arc<AdminApi>> for Principal {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        api: &Arc<AdminApi>,
    ) -> Result<Self, AdminError> {
        let Peer(peer) = Peer::from_request_parts(parts, api)
            .await
            .unwrap_or(Peer(std::net::SocketAddr::from(([0, 0, 0, 0], 0))));
        let peer = peer.ip();
        if let Some(key) = bearer_key(&parts.headers) {
            return by_key(api, key, peer).await.map(|(p, _)| p);
        }
        let Some(token) = cookie_token(&parts.headers) else {
            return Err(denied(&Denied::Invalid));
        };
        let (principal, key_hash) = {
            let mut sessions = api.auth.sessions();
            let d = digest(token);
            match sessions.get(&d) {
                Some(s) if s.expires > Instant::now() => (s.principal.clone(), s.key_hash.clone()),
                Some(_) => {
                    sessions.remove(&d);
                    return Err(denied(&Denied::Invalid));
                }
                None => return Err(denied(&Denied::Invalid)),
            }
        };
        // The key that opened the session must still be in force.
        let ring = api.auth.ring();
        let verified = crate::server::keys::Verified {
            tenant: principal.clone(),
            hash: key_hash,
        };
        let role = match ring.roles.get(&principal) {
            Some(role) if ring.keys.holds(&verified) => *role,
            _ => return Err(denied(&Denied::Invalid)),
        };
        let safe = matches!(parts.method, Method::GET | Method::HEAD);
        if !safe && parts.headers.get(CSRF_HEADER).is_none_or(|v| v != "1") {
            return Err(AdminError::new(
                StatusCode::FORBIDDEN,
                "csrf",
                "a change made with the session cookie must carry the header `X-Realm-Admin: 1`",
            ));
        }
        Ok(Principal {
            name: principal,
            role,
            peer,
        })
    }
}

/// `POST /admin/session {"key": "rka_…"}`: signs in, setting the cookie.
pub async fn sign_in(
    State(api): State<Arc<AdminApi>>,
    Peer(peer): Peer,
    body: axum::body::Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SignIn {
        key: String,
    }
    let Ok(SignIn { key }) = serde_json::from_slice::<SignIn>(&body) else {
        return AdminError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "send {\"key\": \"rka_…\"}",
        )
        .into_response();
    };
    let (principal, hash) = match by_key(&api, &key, peer.ip()).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut secret = [0u8; 32];
    if getrandom::fill(&mut secret).is_err() {
        return AdminError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no random bytes for a session",
        )
        .into_response();
    }
    let token = hex::encode(secret);
    {
        let mut sessions = api.auth.sessions();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = (sessions.iter())
                .min_by_key(|(_, s)| s.expires)
                .map(|(d, _)| *d)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            digest(&token),
            Session {
                principal: principal.name.clone(),
                key_hash: hash,
                expires: now + SESSION,
            },
        );
    }
    // No `Secure`: the listener is plain HTTP on loopback by default; put a
    // TLS proxy in front to reach it from elsewhere.
    let cookie = format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/admin; Max-Age={}",
        SESSION.as_secs()
    );
    (
        [(header::SET_COOKIE, cookie)],
        Json(serde_json::json!({"name": principal.name, "role": principal.role})),
    )
        .into_response()
}

/// `DELETE /admin/session`: signs out.
pub async fn sign_out(State(api): State<Arc<AdminApi>>, headers: HeaderMap) -> Response {
    if let Some(token) = cookie_token(&headers) {
        api.auth.sessions().remove(&digest(token));
    }
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/admin; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], StatusCode::NO_CONTENT).into_response()
}
