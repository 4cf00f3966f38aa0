//! `realm-host admin|tenants|keys|usage|audit|live|drain`: the control plane
//! from the command line, against a running server's admin API (`--url`,
//! `--admin-key`) or, with `--config`, the database directly (changes are
//! audited as `cli`; running servers pick them up within two seconds).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use realm_host::control::tenants::{self, Change, TenantSpec};
use realm_host::control::{Actor, ControlPlane, audit, keys};
use realm_host::home::RealmHome;
use realm_host::server::{RateConfig, ServerConfig};

/// How to reach the control plane.
#[derive(Debug, Args)]
pub struct Conn {
    /// The admin API of a running server.
    #[arg(
        long,
        env = "REALM_ADMIN_URL",
        default_value = "http://127.0.0.1:9090",
        global = true
    )]
    url: String,
    /// An admin key (`rka_…`), for --url.
    #[arg(long, env = "REALM_ADMIN_KEY", hide_env_values = true, global = true)]
    admin_key: Option<String>,
    /// Use this realm.toml's `[database]` directly instead of a running server.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print the JSON answers.
    #[arg(long, global = true)]
    json: bool,
}

/// `realm-host admin …`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Make an admin principal and key in the database (the first one, or
    /// more); the key is printed once. Needs --config.
    Init {
        #[command(flatten)]
        conn: Conn,
        /// The principal's name (its keys read `rka_NAME_…`).
        #[arg(long, default_value = "root")]
        name: String,
        /// `admin` (read and change) or `viewer` (read only).
        #[arg(long, default_value = "admin")]
        role: String,
        /// The key's name.
        #[arg(long, default_value = "cli")]
        key_name: String,
    },
}

/// `realm-host tenants …`.
#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// List tenants with today's usage.
    List,
    /// Show one tenant.
    Show {
        /// Its id.
        id: String,
    },
    /// Make a tenant.
    Create {
        /// Its id.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Change a tenant's grants or limits (only the options given).
    Update {
        /// Its id.
        id: String,
        #[command(flatten)]
        spec: SpecArgs,
    },
    /// Delete a tenant (its keys go; its usage stays in the ledger).
    Delete {
        /// Its id.
        id: String,
    },
}

/// A tenant's grants and limits as options.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// A model it may use (repeat for more).
    #[arg(long = "model")]
    models: Vec<String>,
    /// An adapter it may use (repeat for more).
    #[arg(long = "adapter")]
    adapters: Vec<String>,
    /// Requests per minute.
    #[arg(long)]
    requests_per_minute: Option<u32>,
    /// Tokens (prompt + generated) per minute.
    #[arg(long)]
    tokens_per_minute: Option<u32>,
    /// Generations at once.
    #[arg(long)]
    concurrent_streams: Option<u32>,
    /// Tokens (prompt + generated) per UTC day.
    #[arg(long)]
    tokens_per_day: Option<u64>,
    /// Share of batch slots.
    #[arg(long)]
    weight: Option<u32>,
}

impl SpecArgs {
    /// The fields given, as the API's JSON.
    fn fields(&self) -> serde_json::Map<String, Value> {
        let mut out = serde_json::Map::new();
        if !self.models.is_empty() {
            out.insert("models".into(), json!(self.models));
        }
        if !self.adapters.is_empty() {
            out.insert("adapters".into(), json!(self.adapters));
        }
        let rate = RateConfig {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            concurrent_streams: self.concurrent_streams,
            tokens_per_day: self.tokens_per_day,
        };
        if rate != RateConfig::default() {
            out.insert(
                "rate".into(),
                serde_json::to_value(rate).unwrap_or_default(),
            );
        }
        if let Some(w) = self.weight {
            out.insert("weight".into(), json!(w));
        }
        out
    }
}

/// `realm-host keys …` (besides `new`, which edits realm.toml).
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List a tenant's keys (never their text).
    List {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a key for a tenant; printed once.
    Create {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The key's name.
        #[arg(long)]
        name: String,
        /// It stops working after this long (e.g. `90d`).
        #[arg(long)]
        expires_in: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a key at once.
    Revoke {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The key's id (from `keys list`).
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Replace a key with a new one of the same name.
    Rotate {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The key's id.
        id: String,
        /// How long the old key keeps working (e.g. `1h`) [default: 0s].
        #[arg(long)]
        grace: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `realm-host usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// One tenant only.
    #[arg(long)]
    tenant: Option<String>,
    /// One model only.
    #[arg(long)]
    model: Option<String>,
    /// How far back (e.g. `24h`, `7d`).
    #[arg(long, default_value = "24h")]
    last: String,
    /// `minute`, `hour` or `day`.
    #[arg(long, default_value = "hour")]
    bucket: String,
}

enum Target {
    Api { url: String, key: String },
    Db(ControlPlane, Box<ServerConfig>),
}

impl Conn {
    async fn open(&self, home: &RealmHome) -> anyhow::Result<Target> {
        if let Some(path) = &self.config {
            let config = ServerConfig::load(path)?;
            let Some(database) = &config.database else {
                bail!(
                    "{} has no [database] table: the control plane needs one",
                    path.display()
                );
            };
            let control = ControlPlane::open(&database.resolved_url(home))
                .await
                .context("opening the database")?;
            return Ok(Target::Db(control, Box::new(config)));
        }
        let Some(key) = self.admin_key.clone() else {
            bail!(
                "give an admin key (--admin-key or REALM_ADMIN_KEY; `realm-host admin init` makes one), or --config to use the database directly"
            );
        };
        Ok(Target::Api {
            url: self.url.trim_end_matches('/').to_string(),
            key,
        })
    }
}

fn call(
    url: &str,
    key: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let request = ureq::request(method, &format!("{url}{path}"))
        .set("authorization", &format!("Bearer {key}"));
    let response = match body {
        Some(body) => request
            .set("content-type", "application/json")
            .send_string(&body.to_string()),
        None => request.call(),
    };
    let text = match response {
        Ok(r) => r.into_string()?,
        Err(ureq::Error::Status(code, r)) => {
            let text = r.into_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or(text);
            bail!("{method} {path}: {code}: {message}");
        }
        Err(e) => bail!("cannot reach the admin API at {url}: {e}"),
    };
    Ok(if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    })
}

/// `realm-host admin init`.
pub async fn admin(home: &RealmHome, command: AdminCommand) -> anyhow::Result<()> {
    let AdminCommand::Init {
        conn,
        name,
        role,
        key_name,
    } = command;
    let Target::Db(control, _) = conn.open(home).await? else {
        bail!("`admin init` writes the database directly: give --config realm.toml");
    };
    if realm_host::sandbox::Tenant::check_id(&name).is_err() {
        bail!("--name: use 1-64 letters, digits, `-` or `_`");
    }
    if !matches!(role.as_str(), "admin" | "viewer") {
        bail!("--role must be `admin` or `viewer`");
    }
    let key = keys::create_admin_key(&control.db, &Actor::cli(), &name, &role, &key_name).await?;
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&key)?);
    } else {
        eprintln!("admin `{name}` ({role}): this key is shown once; keep it secret:");
        println!("{}", key.key);
    }
    Ok(())
}

fn checker<'a>(
    config: &'a ServerConfig,
    served: &'a ServerConfig,
    id: &'a str,
) -> impl FnOnce(Option<&TenantSpec>) -> Vec<String> + 'a {
    move |spec| {
        let mut candidate = config.clone();
        candidate.tenants = served.tenants.clone();
        match spec {
            Some(spec) => {
                let keys = (candidate.tenants.get(id)).map(|t| t.api_keys.clone());
                candidate
                    .tenants
                    .insert(id.to_string(), spec.to_config(keys.unwrap_or_default()));
            }
            None => {
                candidate.tenants.remove(id);
            }
        }
        candidate.problems()
    }
}

/// `realm-host tenants …`.
pub async fn tenants(home: &RealmHome, conn: Conn, command: TenantsCommand) -> anyhow::Result<()> {
    let target = conn.open(home).await?;
    let out = match (&target, command) {
        (Target::Api { url, key }, command) => {
            let (url, key) = (url.clone(), key.clone());
            tokio::task::spawn_blocking(move || match command {
                TenantsCommand::List => call(&url, &key, "GET", "/admin/api/tenants", None),
                TenantsCommand::Show { id } => {
                    call(&url, &key, "GET", &format!("/admin/api/tenants/{id}"), None)
                }
                TenantsCommand::Create { id, spec } => {
                    let mut body = spec.fields();
                    body.insert("id".into(), json!(id));
                    call(
                        &url,
                        &key,
                        "POST",
                        "/admin/api/tenants",
                        Some(Value::Object(body)),
                    )
                }
                TenantsCommand::Update { id, spec } => call(
                    &url,
                    &key,
                    "PATCH",
                    &format!("/admin/api/tenants/{id}"),
                    Some(Value::Object(spec.fields())),
                ),
                TenantsCommand::Delete { id } => call(
                    &url,
                    &key,
                    "DELETE",
                    &format!("/admin/api/tenants/{id}"),
                    None,
                ),
            })
            .await??
        }
        (Target::Db(control, config), command) => {
            let db = &control.db;
            let mut served = config.clone();
            served.tenants = tenants::serving(db, &config.tenants).await?;
            let apply = async |id: &str, change: Change| -> anyhow::Result<Value> {
                let record =
                    tenants::apply(db, &Actor::cli(), id, change, checker(config, &served, id))
                        .await?;
                Ok(serde_json::to_value(record)?)
            };
            match command {
                TenantsCommand::List => {
                    let all = tenants::load_all(db).await?;
                    json!({"tenants": all.values().collect::<Vec<_>>()})
                }
                TenantsCommand::Show { id } => match tenants::load(db, &id).await? {
                    Some(record) => serde_json::to_value(record)?,
                    None => bail!("no tenant `{id}`"),
                },
                TenantsCommand::Create { id, spec } => {
                    let spec: TenantSpec = serde_json::from_value(Value::Object(spec.fields()))?;
                    apply(&id, Change::Create(spec)).await?
                }
                TenantsCommand::Update { id, spec } => {
                    apply(&id, Change::Patch(spec.fields())).await?
                }
                TenantsCommand::Delete { id } => apply(&id, Change::Delete).await?,
            }
        }
    };
    print(&out, conn.json, |v| {
        if let Some(list) = v["tenants"].as_array() {
            println!(
                "{:<24} {:<7} {:<30} {:>12} {:>14}",
                "TENANT", "SOURCE", "MODELS", "USED TODAY", "TOKENS/DAY"
            );
            for t in list {
                println!(
                    "{:<24} {:<7} {:<30} {:>12} {:>14}",
                    t["id"].as_str().unwrap_or(""),
                    t["source"].as_str().unwrap_or(""),
                    (t["models"].as_array().into_iter().flatten())
                        .filter_map(|m| m.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    t["used-today"]
                        .as_u64()
                        .map_or("-".into(), |n| n.to_string()),
                    t["rate"]["tokens-per-day"]
                        .as_u64()
                        .map_or("unlimited".into(), |n| n.to_string()),
                );
            }
        } else if v.is_null() {
            println!("done");
        } else {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        }
    });
    Ok(())
}

impl KeyCommand {
    fn conn(&self) -> &Conn {
        match self {
            KeyCommand::List { conn, .. }
            | KeyCommand::Create { conn, .. }
            | KeyCommand::Revoke { conn, .. }
            | KeyCommand::Rotate { conn, .. } => conn,
        }
    }
}

/// `realm-host keys list|create|revoke|rotate`.
pub async fn keys_command(home: &RealmHome, command: KeyCommand) -> anyhow::Result<()> {
    let target = command.conn().open(home).await?;
    let json = command.conn().json;
    let out = match target {
        Target::Api { url, key } => {
            tokio::task::spawn_blocking(move || {
                let base = |t: &str| format!("/admin/api/tenants/{t}/keys");
                match command {
                    KeyCommand::List { tenant, .. } => {
                        call(&url, &key, "GET", &base(&tenant), None)
                    }
                    KeyCommand::Create {
                        tenant,
                        name,
                        expires_in,
                        ..
                    } => call(
                        &url,
                        &key,
                        "POST",
                        &base(&tenant),
                        Some(json!({"name": name, "expires-in": expires_in})),
                    ),
                    KeyCommand::Revoke { tenant, id, .. } => call(
                        &url,
                        &key,
                        "DELETE",
                        &format!("{}/{id}", base(&tenant)),
                        None,
                    ),
                    KeyCommand::Rotate {
                        tenant, id, grace, ..
                    } => call(
                        &url,
                        &key,
                        "POST",
                        &format!("{}/{id}/rotate", base(&tenant)),
                        Some(json!({"grace": grace})),
                    ),
                }
            })
            .await??
        }
        Target::Db(control, _) => {
            let db = &control.db;
            let actor = Actor::cli();
            let seconds = |text: &str| -> anyhow::Result<i64> {
                let secs = humantime::parse_duration(text)
                    .with_context(|| format!("`{text}` is not a duration (e.g. 90d, 1h)"))?
                    .as_secs();
                if secs > 100 * 365 * 86_400 {
                    bail!("`{text}`: at most 100 years");
                }
                Ok(secs as i64)
            };
            match command {
                KeyCommand::List { tenant, .. } => json!({"keys": keys::list(db, &tenant).await?}),
                KeyCommand::Create {
                    tenant,
                    name,
                    expires_in,
                    ..
                } => {
                    let expires = match expires_in {
                        Some(text) => Some(realm_host::control::now() + seconds(&text)?),
                        None => None,
                    };
                    serde_json::to_value(keys::create(db, &actor, &tenant, &name, expires).await?)?
                }
                KeyCommand::Revoke { tenant, id, .. } => {
                    if !keys::revoke(db, &actor, &tenant, &id).await? {
                        bail!("tenant `{tenant}` has no key {id} in force");
                    }
                    Value::Null
                }
                KeyCommand::Rotate {
                    tenant, id, grace, ..
                } => {
                    let grace = grace.as_deref().map(seconds).transpose()?.unwrap_or(0);
                    serde_json::to_value(keys::rotate(db, &actor, &tenant, &id, grace).await?)?
                }
            }
        }
    };
    print(&out, json, |v| {
        if let Some(key) = v["key"].as_str() {
            eprintln!(
                "key {} ({}): shown once; keep it secret:",
                v["id"].as_str().unwrap_or(""),
                v["name"].as_str().unwrap_or("")
            );
            println!("{key}");
        } else if let Some(list) = v["keys"].as_array() {
            println!(
                "{:<18} {:<24} {:<7} {:<10}",
                "ID", "NAME", "SOURCE", "STATE"
            );
            for k in list {
                let state = if !k["revoked-at"].is_null() {
                    "revoked"
                } else if k["expires-at"]
                    .as_i64()
                    .is_some_and(|t| t <= realm_host::control::now())
                {
                    "expired"
                } else {
                    "in force"
                };
                println!(
                    "{:<18} {:<24} {:<7} {:<10}",
                    k["id"].as_str().unwrap_or(""),
                    k["name"].as_str().unwrap_or(""),
                    k["source"].as_str().unwrap_or(""),
                    state
                );
            }
        } else {
            println!("done");
        }
    });
    Ok(())
}

/// `realm-host usage`, `audit`, `live` and `drain`.
pub async fn report(home: &RealmHome, conn: Conn, what: Report) -> anyhow::Result<()> {
    let target = conn.open(home).await?;
    let out = match (target, what) {
        (Target::Api { url, key }, what) => {
            tokio::task::spawn_blocking(move || match what {
                Report::Usage(args) => {
                    let last = humantime::parse_duration(&args.last)
                        .with_context(|| format!("--last `{}` is not a duration", args.last))?;
                    let from = realm_host::control::now() - last.as_secs() as i64;
                    let mut path = format!("/admin/api/usage?from={from}&bucket={}", args.bucket);
                    if let Some(t) = args.tenant {
                        path.push_str(&format!("&tenant={t}"));
                    }
                    if let Some(m) = args.model {
                        path.push_str(&format!("&model={m}"));
                    }
                    call(&url, &key, "GET", &path, None)
                }
                Report::Audit { limit } => call(
                    &url,
                    &key,
                    "GET",
                    &format!("/admin/api/audit?limit={limit}"),
                    None,
                ),
                Report::Live => call(&url, &key, "GET", "/admin/api/live", None),
                Report::Drain => call(&url, &key, "POST", "/admin/api/drain", None),
            })
            .await??
        }
        (Target::Db(control, _), Report::Audit { limit }) => {
            json!({"entries": audit::list(&control.db, None, limit).await?})
        }
        (Target::Db(..), _) => {
            bail!(
                "usage, live and drain ask a running server: give --url and --admin-key instead of --config"
            )
        }
    };
    print(&out, conn.json, |v| {
        if let Some(rows) = v["rows"].as_array() {
            println!(
                "{:<20} {:<16} {:<16} {:>10} {:>10} {:>8} {:>7}",
                "START (UTC)", "TENANT", "MODEL", "PROMPT", "GENERATED", "REQS", "ERRORS"
            );
            for r in rows {
                let model = match r["adapter"].as_str() {
                    Some(a) if !a.is_empty() => {
                        format!("{}:{a}", r["model"].as_str().unwrap_or(""))
                    }
                    _ => r["model"].as_str().unwrap_or("").to_string(),
                };
                let start = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(r["start"].as_u64().unwrap_or(0));
                println!(
                    "{:<20} {:<16} {:<16} {:>10} {:>10} {:>8} {:>7}",
                    humantime::format_rfc3339_seconds(start)
                        .to_string()
                        .trim_end_matches('Z'),
                    r["tenant"].as_str().unwrap_or(""),
                    model,
                    r["prompt-tokens"],
                    r["completion-tokens"],
                    r["requests"],
                    r["errors"]
                );
            }
        } else if let Some(entries) = v["entries"].as_array() {
            for e in entries {
                let at = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(e["at"].as_u64().unwrap_or(0));
                println!(
                    "{} {:<12} {:<18} {:<32} {}",
                    humantime::format_rfc3339_seconds(at),
                    e["actor"].as_str().unwrap_or(""),
                    e["action"].as_str().unwrap_or(""),
                    e["target"].as_str().unwrap_or(""),
                    e["detail"]
                );
            }
        } else {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        }
    });
    Ok(())
}

/// What `report` shows.
#[derive(Debug)]
pub enum Report {
    /// Usage from the ledger.
    Usage(UsageArgs),
    /// The newest audit entries.
    Audit {
        /// How many.
        limit: i64,
    },
    /// Live state.
    Live,
    /// Drain the server.
    Drain,
}

fn print(value: &Value, json: bool, human: impl FnOnce(&Value)) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        human(value);
    }
}
