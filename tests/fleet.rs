//! A fleet of hosts sharing limits in a real `redis-server` (`[fleet]`):
//! several servers in this process on one Redis, driven over HTTP. Rates,
//! streams and daily quotas hold across hosts, the counts in Redis equal
//! what was served, and a Redis outage follows `on-redis-error` and heals
//! without restarting a host. `fleet_behind_haproxy` runs the real binary
//! three times behind HAProxy (`just fleet-test`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis_server::TempRedis;
use realm_host::home::RealmHome;
use realm_host::inference::ModelHub;
use realm_host::registry::ModelStore;
use serde_json::{Value, json};

/// Servers sharing one Redis, each with the same tenants and keys.
struct Hosts {
    addrs: Vec<SocketAddr>,
    keys: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Hosts {
    /// `n` servers whose `[fleet]` is `fleet` (TOML lines), serving
    /// `small` (a fake engine that echoes at once) and `slow` (10 ms a
    /// token), with `tenants` (id, TOML lines).
    async fn start(n: usize, fleet: &str, tenants: &[(&str, &str)]) -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let tables: Vec<(&str, String)> = (tenants.iter())
            .map(|(tenant, table)| (*tenant, format!("models = [\"small\", \"slow\"]\n{table}")))
            .collect();
        let tables: Vec<(&str, &str)> = tables.iter().map(|(t, s)| (*t, s.as_str())).collect();
        let (tables, keys) = common::tenant_tables(&tables);
        let mut addrs = Vec::new();
        for i in 0..n {
            let config = format!(
                "listen = \"127.0.0.1:0\"\npublic-metrics = true\ndrain-timeout = \"2s\"\n\
                 admin-socket = \"admin{i}.sock\"\n\
                 [models]\nsmall = \"fake\"\nslow = \"fake-slow\"\n[fleet]\n{fleet}\n{tables}"
            );
            let path = dir.path().join(format!("realm{i}.toml"));
            std::fs::write(&path, config).unwrap();
            let home = RealmHome::resolve(Some(dir.path().join(format!("home{i}")))).unwrap();
            let hub = Arc::new(ModelHub::new(
                ModelStore::new(dir.path().join("models")),
                Default::default(),
            ));
            common::provide_fakes(&hub);
            addrs.push(common::serve_in_process(path, home, hub).await);
        }
        Hosts {
            addrs,
            keys,
            _dir: dir,
        }
    }

    fn auth(&self, tenant: &str) -> String {
        let key = &self.keys.iter().find(|(t, _)| t == tenant).unwrap().1;
        format!("Bearer {key}")
    }

    /// POSTs a completion of `prompt` with `max_tokens` to host `host`.
    async fn complete(
        &self,
        host: usize,
        tenant: &str,
        model: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> (u16, Value) {
        let url = format!("http://{}/v1/completions", self.addrs[host]);
        let body =
            json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
        common::post_status(&url, &self.auth(tenant), &body).await
    }

    /// GETs `path` from host `host` as `tenant`: the status.
    async fn get_status(&self, host: usize, tenant: &str, path: &str) -> u16 {
        let url = format!("http://{}{path}", self.addrs[host]);
        let auth = self.auth(tenant);
        tokio::task::spawn_blocking(move || {
            match ureq::get(&url).set("authorization", &auth).call() {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(code, _)) => code,
                Err(e) => panic!("{e}"),
            }
        })
        .await
        .unwrap()
    }

    /// Host `host`'s `/metrics` (all tenants: `public-metrics`).
    async fn metrics(&self, host: usize) -> String {
        common::get_text(format!("http://{}/metrics", self.addrs[host]), None).await
    }
}

/// The tokens a completion's `usage` says it used.
fn used(reply: &Value) -> u64 {
    reply["usage"]["total_tokens"].as_u64().unwrap()
}

/// Redis's count of `tenant`'s tokens today (under prefix `realm`).
fn redis_today(redis: &TempRedis, tenant: &str) -> u64 {
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let mut c = redis.connect().unwrap();
    redis::cmd("GET")
        .arg(format!("realm:{{{tenant}}}:day:{day}"))
        .query::<Option<u64>>(&mut c)
        .unwrap()
        .unwrap_or(0)
}

/// The streams Redis counts as running for `tenant`.
fn redis_streams(redis: &TempRedis, tenant: &str) -> u64 {
    let mut c = redis.connect().unwrap();
    redis::cmd("ZCARD")
        .arg(format!("realm:{{{tenant}}}:streams"))
        .query(&mut c)
        .unwrap()
}

/// The reservations still held in Redis for `tenant`.
fn redis_reservations(redis: &TempRedis, tenant: &str) -> Vec<String> {
    let mut c = redis.connect().unwrap();
    redis::cmd("KEYS")
        .arg(format!("realm:{{{tenant}}}:res:*"))
        .query(&mut c)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rates_streams_and_quotas_hold_across_hosts() {
    let Some(redis) = TempRedis::start() else {
        return;
    };
    let fleet = format!("redis = \"{}\"", redis.url());
    let hosts = Hosts::start(
        3,
        &fleet,
        &[
            ("acme", "rate = { requests-per-minute = 30 }"),
            ("beta", "rate = { tokens-per-day = 100 }"),
            ("gamma", "rate = { concurrent-streams = 1 }"),
            ("delta", "rate = { tokens-per-minute = 20 }"),
        ],
    )
    .await;

    // 90 requests spread over three hosts: 30 admitted (the bucket refills
    // one every 2 s, so a slow run may admit one more per 2 s it took).
    let started = Instant::now();
    let mut admitted = 0;
    let mut limited = 0;
    for i in 0..90 {
        match hosts.get_status(i % 3, "acme", "/v1/models").await {
            200 => admitted += 1,
            429 => limited += 1,
            other => panic!("status {other}"),
        }
    }
    let refilled = (started.elapsed().as_secs_f64() / 2.0).floor() as u32;
    println!(
        "acme, 30 requests a minute, 90 sent over 3 hosts in {:?}: {admitted} admitted, {limited} refused",
        started.elapsed()
    );
    assert!(
        (30..=30 + refilled).contains(&admitted),
        "{admitted} admitted"
    );
    assert_eq!(admitted + limited, 90);
    // Another tenant's limits are its own: acme's spent rate refuses
    // nothing of gamma's, on any host.
    for host in 0..3 {
        assert_eq!(hosts.get_status(host, "gamma", "/v1/models").await, 200);
    }

    // The daily quota, reserved and reconciled across hosts: "Hello" is 5
    // of the fake's byte tokens; 5 + 8 reserved, 10 used (echo).
    let mut spent = 0;
    let mut host = 0;
    let refusal = loop {
        let (status, reply) = hosts.complete(host % 3, "beta", "small", "Hello", 8).await;
        host += 1;
        if status != 200 {
            break reply;
        }
        spent += used(&reply);
        // Each reply is reconciled in Redis before it is sent.
        assert_eq!(redis_today(&redis, "beta"), spent);
    };
    assert_eq!(refusal["error"]["code"], "quota_exceeded", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{} are left", 100 - spent)),
        "{message} after {spent}"
    );
    assert!(100 - spent < 13, "refused with {} left", 100 - spent);
    assert!(redis_reservations(&redis, "beta").is_empty());
    println!("beta, 100 tokens a day over 3 hosts: {spent} spent, then refused");

    // A token rate shared by the fleet: 20 a minute; each request reserves
    // 13 ("Hello" and 8) and returns 3 when it ends, so the bucket goes
    // 20 -> 10 -> 0 on hosts 0 and 1, and host 2 finds it empty (one token
    // comes back every 3 s).
    for host in 0..2 {
        let (status, reply) = hosts.complete(host, "delta", "small", "Hello", 8).await;
        assert_eq!(status, 200, "{reply}");
    }
    let (status, refused) = hosts.complete(2, "delta", "small", "Hello", 8).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    assert!(
        (refused["error"]["message"].as_str().unwrap()).starts_with("token rate limit"),
        "{refused}"
    );

    // One stream fleet-wide: a slow generation on host 0 holds it (seen in
    // Redis), host 1 refuses, and it is free again once the generation ends.
    let slow = {
        let url = format!("http://{}/v1/completions", hosts.addrs[0]);
        let auth = hosts.auth("gamma");
        tokio::spawn(async move {
            let body =
                json!({"model": "slow", "prompt": "Hi", "max_tokens": 300, "temperature": 0});
            common::post_status(&url, &auth, &body).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_streams(&redis, "gamma") == 0 {
        assert!(
            Instant::now() < deadline,
            "the slow generation never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, refused) = hosts.complete(1, "gamma", "small", "Hi", 2).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["code"], "too_many_streams", "{refused}");
    let (status, _) = slow.await.unwrap();
    assert_eq!(status, 200);
    let (status, reply) = hosts.complete(2, "gamma", "small", "Hi", 2).await;
    assert_eq!(status, 200, "{reply}");

    // The fleet's state is in the operator's metrics only: a tenant's
    // view of /metrics has its own series and nothing host-wide.
    let metrics = hosts.metrics(0).await;
    assert!(metrics.contains("realm_fleet_redis_up 1"), "{metrics}");
    let url = format!("http://{}/metrics", hosts.addrs[0]);
    let own = common::get_text(url, Some(hosts.auth("acme"))).await;
    assert!(own.contains("tenant=\"acme\""), "{own}");
    for other in [
        "realm_fleet",
        "vllm:",
        "tenant=\"beta\"",
        "tenant=\"gamma\"",
    ] {
        assert!(!own.contains(other), "{other} in acme's metrics: {own}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_follows_the_policy_and_heals() {
    let Some(mut redis) = TempRedis::start() else {
        return;
    };
    let tenant = [("acme", "rate = { tokens-per-day = 1000000 }")];
    let open = Hosts::start(1, &format!("redis = \"{}\"", redis.url()), &tenant).await;
    let closed = Hosts::start(
        1,
        &format!(
            "redis = \"{}\"\non-redis-error = \"closed\"\ntimeout = \"200ms\"",
            redis.url()
        ),
        &tenant,
    )
    .await;
    let mut served = 0;
    for hosts in [&open, &closed] {
        let (status, reply) = hosts.complete(0, "acme", "small", "Hello", 4).await;
        assert_eq!(status, 200, "{reply}");
        served += used(&reply);
    }
    assert_eq!(redis_today(&redis, "acme"), served);

    // Redis stops answering (frozen) while a generation runs: the closed
    // host refuses at once rather than hang, and the running generation's
    // tokens are reconciled when Redis is back.
    let slow = {
        let url = format!("http://{}/v1/completions", closed.addrs[0]);
        let auth = closed.auth("acme");
        tokio::spawn(async move {
            let body = json!({"model": "slow", "prompt": "Hi", "max_tokens": 80, "temperature": 0});
            common::post_status(&url, &auth, &body).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.signal("STOP");
    let asked = Instant::now();
    let (status, reply) = closed.complete(0, "acme", "small", "Hello", 4).await;
    let waited = asked.elapsed();
    assert_eq!(status, 503, "{reply}");
    assert_eq!(reply["error"]["code"], "overloaded", "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Redis")
    );
    assert!(waited < Duration::from_secs(3), "refused after {waited:?}");
    let (status, reply) = slow.await.unwrap();
    assert_eq!(status, 200, "{reply}");
    served += used(&reply);
    assert!(closed.metrics(0).await.contains("realm_fleet_redis_up 0"));
    redis.signal("CONT");
    let healed = wait_until_served(&closed).await;
    served += healed;
    // The settlement made while Redis was frozen is applied now.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_today(&redis, "acme") != served && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis_today(&redis, "acme"), served);
    assert!(redis_reservations(&redis, "acme").is_empty());
    println!("frozen Redis: refused in {waited:?} (closed), {served} tokens reconciled after");

    // Redis killed (its counts lost) and started again: the open host
    // serves throughout on its own limits, the closed one refuses until
    // Redis answers, and both reconnect by themselves.
    redis.stop();
    let (status, reply) = closed.complete(0, "acme", "small", "Hello", 4).await;
    assert_eq!(status, 503, "{reply}");
    let (status, reply) = open.complete(0, "acme", "small", "Hello", 4).await;
    assert_eq!(status, 200, "{reply}");
    let (status, _) = open.complete(0, "acme", "small", "Hello", 4).await;
    assert_eq!(status, 200);
    assert!(open.metrics(0).await.contains("realm_fleet_redis_up 0"));
    redis.restart();
    wait_until_served(&closed).await;
    wait_until_served(&open).await;
    for hosts in [&open, &closed] {
        let metrics = hosts.metrics(0).await;
        assert!(metrics.contains("realm_fleet_redis_up 1"), "{metrics}");
        assert!(
            !metrics.contains("realm_fleet_redis_errors_total 0"),
            "{metrics}"
        );
    }
}

/// Asks host 0 of `hosts` until it serves (within 10 s); the tokens used.
async fn wait_until_served(hosts: &Hosts) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, reply) = hosts.complete(0, "acme", "small", "Hello", 4).await;
        if status == 200 {
            return used(&reply);
        }
        assert_eq!(status, 503, "{reply}");
        assert!(Instant::now() < deadline, "still refused: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// HAProxy running `deploy/haproxy/haproxy.cfg` (the file operators use)
/// in front of `hosts`; killed when dropped.
struct Haproxy {
    child: std::process::Child,
    url: String,
    stats: String,
}

impl Haproxy {
    /// Starts it, or `None` when haproxy is not installed (a failure
    /// instead when `REALM_REQUIRE_REDIS=1`: `scripts/setup.sh` installs both).
    fn start(hosts: &[SocketAddr]) -> Option<Haproxy> {
        if !common::redis_server::installed("haproxy", "-v") {
            return None;
        }
        let listen = format!("127.0.0.1:{}", common::redis_server::free_port());
        let stats = format!("127.0.0.1:{}", common::redis_server::free_port());
        let mut command = std::process::Command::new("haproxy");
        command
            .arg("-db")
            .arg("-f")
            .arg(common::repo().join("deploy/haproxy/haproxy.cfg"))
            .env("REALM_LISTEN", &listen)
            .env("HAPROXY_STATS", &stats)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (i, host) in hosts.iter().enumerate() {
            command.env(format!("REALM_HOST_{}", i + 1), host.to_string());
        }
        let haproxy = Haproxy {
            child: command.spawn().expect("start haproxy"),
            url: format!("http://{listen}"),
            stats: format!("http://{stats}/stats;csv"),
        };
        Some(haproxy)
    }

    /// The state HAProxy's health checks give each server (`UP`, `DOWN`, ...).
    fn states(&self) -> Vec<String> {
        let Ok(response) = ureq::get(&self.stats).call() else {
            return Vec::new();
        };
        let csv = response.into_string().unwrap();
        (csv.lines())
            .filter(|l| l.starts_with("realm_hosts,realm"))
            .map(|l| l.split(',').nth(17).unwrap_or("").to_string())
            .collect()
    }

    /// Waits until the servers' states are `want` (10 s at most); how long it took.
    async fn wait_for(&self, want: &[&str]) -> Duration {
        let started = Instant::now();
        loop {
            let states = self.states();
            if states
                .iter()
                .map(|s| s.split(' ').next().unwrap())
                .eq(want.iter().copied())
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "servers {states:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a client got for one request.
#[derive(Debug)]
enum Outcome {
    Done(u64),
    Refused(u16, String),
    Failed(String),
}

/// POSTs a short chat through `url` with `key`, routed as `route` (the
/// affinity header; the tenant is the key's). Never waits more than 60 s.
fn chat(url: &str, key: &str, route: Option<&str>, max_tokens: u32) -> Outcome {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut request = agent
        .post(&format!("{url}/v1/chat/completions"))
        .set("authorization", &format!("Bearer {key}"));
    if let Some(route) = route {
        request = request.set("x-realm-tenant", route);
    }
    let body = json!({"model": "small", "max_tokens": max_tokens, "temperature": 0,
                      "messages": [{"role": "user", "content": "Name a colour."}]});
    match (request.set("content-type", "application/json")).send_string(&body.to_string()) {
        Ok(r) => {
            let reply: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            Outcome::Done(used(&reply))
        }
        Err(ureq::Error::Status(code, r)) => {
            Outcome::Refused(code, r.into_string().unwrap_or_default())
        }
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// `tenant`'s requests of `kind` that host `addr` counted (its metrics, read
/// with the tenant's own key).
fn requests_on(addr: SocketAddr, key: &str, kind: &str) -> u64 {
    let Ok(response) = ureq::get(&format!("http://{addr}/metrics"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
    else {
        return 0;
    };
    let text = response.into_string().unwrap();
    (text.lines())
        .filter(|l| {
            l.starts_with("realm_requests_total{") && l.contains(&format!("kind=\"{kind}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `clients` clients of `key`, each sending chats through `url`
/// (spread over the hosts by the affinity header) until `stop`; every
/// outcome.
fn load(
    url: &str,
    key: &str,
    clients: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Outcome>>> {
    (0..clients)
        .map(|c| {
            let (url, key, stop) = (url.to_string(), key.to_string(), stop.clone());
            tokio::task::spawn_blocking(move || {
                let mut outcomes = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    outcomes.push(chat(&url, &key, Some(&format!("load-{c}-{i}")), 6));
                    i += 1;
                }
                outcomes
            })
        })
        .collect()
}

/// Stops `clients` after `after` and gathers what they got.
async fn finish(
    clients: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<Outcome> {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.unwrap());
    }
    all
}

/// The fleet test: three `realm-host serve` processes on SmolLM2, one
/// `redis-server`, Debian's HAProxy with the shipped configuration. It
/// prints what it measured, so it runs on its own (`just fleet-test`, a
/// stage of `scripts/test.sh`) rather than captured with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run with its numbers printed by `just fleet-test` (a stage of scripts/test.sh)"]
async fn fleet_behind_haproxy() {
    let dir = tempfile::tempdir().unwrap();
    let Some(home) = common::home_with_smollm2(dir.path()) else {
        return;
    };
    let Some(mut redis) = TempRedis::start() else {
        return;
    };
    let (tables, keys) = common::tenant_tables(&[
        (
            "acme",
            "models = [\"small\"]\nrate = { requests-per-minute = 30 }",
        ),
        (
            "beta",
            "models = [\"small\"]\nrate = { tokens-per-day = 600 }",
        ),
        (
            "gamma",
            "models = [\"small\"]\nrate = { concurrent-streams = 64 }",
        ),
    ]);
    let keys: std::collections::HashMap<&str, String> = (keys.iter())
        .map(|(tenant, key)| (tenant.as_str(), key.clone()))
        .collect();
    let mut hosts = Vec::new();
    for i in 0..3 {
        let config = dir.path().join(format!("realm{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\npublic-metrics = true\ndrain-timeout = \"20s\"\nadmin-socket = \"admin{i}.sock\"\n\
                 [models]\nsmall = \"smollm2-135m-instruct\"\n\
                 [fleet]\nredis = \"{}\"\nstream-lease = \"2s\"\n{tables}",
                redis.url()
            ),
        )
        .unwrap();
        hosts.push(common::spawn_serve(&config, &home).await);
    }
    let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.1).collect();
    let Some(haproxy) = Haproxy::start(&addrs) else {
        return;
    };
    let url = haproxy.url.clone();
    haproxy.wait_for(&["UP", "UP", "UP"]).await;

    // Affinity: one tenant's requests land on one host while it is healthy.
    let gamma = keys["gamma"].clone();
    let sent = 30;
    let mut gamma_served = 0;
    for _ in 0..sent {
        let (url, key) = (url.clone(), gamma.clone());
        match tokio::task::spawn_blocking(move || chat(&url, &key, None, 2))
            .await
            .unwrap()
        {
            Outcome::Done(n) => gamma_served += n,
            other => panic!("{other:?}"),
        }
    }
    let per_host: Vec<u64> = addrs
        .iter()
        .map(|a| requests_on(*a, &gamma, "chat"))
        .collect();
    let top = *per_host.iter().max().unwrap();
    println!("affinity: gamma's {sent} requests per host {per_host:?}");
    assert!(top * 10 >= sent * 9, "{per_host:?}");

    // A request rate shared by the fleet: 90 requests spread over the
    // hosts (the affinity header overridden), 30 admitted.
    let acme = keys["acme"].clone();
    let started = Instant::now();
    let statuses = {
        let (url, acme) = (url.clone(), acme.clone());
        tokio::task::spawn_blocking(move || {
            (0..90)
                .map(|i| {
                    match ureq::get(&format!("{url}/v1/models"))
                        .set("authorization", &format!("Bearer {acme}"))
                        .set("x-realm-tenant", &format!("spread-{i}"))
                        .call()
                    {
                        Ok(r) => r.status(),
                        Err(ureq::Error::Status(code, _)) => code,
                        Err(e) => panic!("{e}"),
                    }
                })
                .collect::<Vec<u16>>()
        })
        .await
        .unwrap()
    };
    let took = started.elapsed();
    let admitted = statuses.iter().filter(|s| **s == 200).count() as u32;
    let spread: Vec<u64> = addrs
        .iter()
        .map(|a| requests_on(*a, &acme, "models"))
        .collect();
    println!(
        "rate: acme (30 a minute) sent 90 over hosts {spread:?} in {took:?}: {admitted} admitted"
    );
    assert!(spread.iter().all(|n| *n > 0), "{spread:?}");
    let refilled = (took.as_secs_f64() / 2.0).floor() as u32;
    assert!(
        (30..=30 + refilled).contains(&admitted),
        "{admitted} admitted"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count() as u32,
        90 - admitted
    );

    // A daily quota shared by the fleet.
    let beta = keys["beta"].clone();
    let mut spent = 0;
    let mut i = 0;
    let refusal = loop {
        let (url, key) = (url.clone(), beta.clone());
        let route = format!("quota-{i}");
        i += 1;
        match tokio::task::spawn_blocking(move || chat(&url, &key, Some(&route), 8))
            .await
            .unwrap()
        {
            Outcome::Done(n) => spent += n,
            Outcome::Refused(code, body) => break (code, body),
            Outcome::Failed(e) => panic!("{e}"),
        }
    };
    println!("quota: beta (600 a day) spent {spent} over {i} requests, then {refusal:?}");
    assert_eq!(refusal.0, 429);
    assert!(refusal.1.contains("quota_exceeded"), "{}", refusal.1);
    assert!(spent <= 600);
    assert_eq!(redis_today(&redis, "beta"), spent);

    // SIGKILL one host under load.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = load(&url, &gamma, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = hosts[1].0.id().unwrap();
    hosts[1].0.start_kill().unwrap();
    let out_after = haproxy.wait_for(&["UP", "DOWN", "UP"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcomes = finish(clients, &stop).await;
    let done: Vec<u64> = (outcomes.iter())
        .filter_map(|o| match o {
            Outcome::Done(n) => Some(*n),
            _ => None,
        })
        .collect();
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !matches!(o, Outcome::Done(_)))
        .collect();
    println!(
        "SIGKILL under load: {} requests, {} completed, {} failed {failed:?}; host out after {out_after:?}",
        outcomes.len(),
        done.len(),
        failed.len()
    );
    for outcome in &failed {
        // A clear error, never a hang.
        assert!(
            matches!(outcome, Outcome::Refused(502..=504, _)),
            "{outcome:?}"
        );
    }
    // Every token is accounted once: the replies', plus the dead host's
    // reservations, charged in full.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = redis.connect().unwrap();
    let mut orphaned = 0;
    for key in redis_reservations(&redis, "gamma") {
        let held: String = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
        let (tokens, host) = held.split_once(' ').unwrap();
        assert!(
            host.ends_with(&format!(":{killed}")),
            "{held} is not the dead host's"
        );
        orphaned += tokens.parse::<u64>().unwrap();
    }
    let served: u64 = done.iter().sum::<u64>() + gamma_served;
    println!("accounting: {served} tokens served, {orphaned} reserved by the dead host");
    assert_eq!(redis_today(&redis, "gamma"), served + orphaned);
    // The dead host's stream leases lapse (2 s here): the next admission
    // drops them, and no stream is counted once it ends.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (url1, key) = (url.clone(), gamma.clone());
    let outcome = tokio::task::spawn_blocking(move || chat(&url1, &key, Some("lapse"), 2))
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    assert_eq!(
        redis_streams(&redis, "gamma"),
        0,
        "the dead host's leases lapsed"
    );

    // A graceful drain loses nothing: SIGTERM the second live host.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = load(&url, &gamma, 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drained = &mut hosts[2].0;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &drained.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), drained.wait())
        .await
        .expect("the drained host exits")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outcomes = finish(clients, &stop).await;
    let lost: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !matches!(o, Outcome::Done(_)))
        .collect();
    println!(
        "drain: {} requests, {} not served",
        outcomes.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "{lost:?}");

    // Redis stopped and started again: the last host fails open (serves on
    // its own limits) and reconnects by itself.
    redis.stop();
    let (key, url0) = (gamma.clone(), url.clone());
    let outage = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|i| chat(&url0, &key, Some(&format!("o{i}")), 2))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        outage.iter().all(|o| matches!(o, Outcome::Done(_))),
        "{outage:?}"
    );
    let metrics = common::get_text(format!("http://{}/metrics", addrs[0]), None).await;
    assert!(metrics.contains("realm_fleet_redis_up 0"), "{metrics}");
    redis.restart();
    let healed = Instant::now();
    loop {
        let (url, key) = (url.clone(), gamma.clone());
        let outcome = tokio::task::spawn_blocking(move || chat(&url, &key, Some("healed"), 2))
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
        if redis_today(&redis, "gamma") > 0 {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "Redis not used again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "Redis restart: served throughout, counting in Redis again after {:?}",
        healed.elapsed()
    );
}
