//! A throwaway `redis-server` for tests, on a free loopback port, with
//! nothing saved to disk; stopped (and restarted on the same port) at will,
//! killed when dropped. `scripts/setup.sh` installs Debian's redis-server.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) throwaway Redis.
pub struct TempRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// Whether `program` (a fleet test's Debian package of that name) runs,
/// checked with `version_flag`. When it does not, the test skips with a
/// note, or fails when `REALM_REQUIRE_REDIS=1` (`scripts/test.sh`, after
/// `scripts/setup.sh` installed redis-server and haproxy).
pub fn installed(program: &str, version_flag: &str) -> bool {
    let found = Command::new(program)
        .arg(version_flag)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("REALM_REQUIRE_REDIS").as_deref() != Ok("1"),
            "{program} is not installed, and REALM_REQUIRE_REDIS=1 (scripts/setup.sh installs it)"
        );
        eprintln!("skipping: {program} is not installed (apt-get install {program})");
    }
    found
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl TempRedis {
    /// Starts one, or `None` when redis-server is not installed (a failure
    /// instead when `REALM_REQUIRE_REDIS=1`).
    pub fn start() -> Option<TempRedis> {
        if !installed("redis-server", "--version") {
            return None;
        }
        let mut redis = TempRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        redis.restart();
        Some(redis)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again (empty: nothing was saved) on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends it `signal` (`STOP` freezes it: calls to it time out; `CONT`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Stops it (SIGKILL: what it held is gone).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A connection to it (the `redis` crate the host uses), or `None`
    /// while it does not answer.
    pub fn connect(&self) -> Option<redis::Connection> {
        let client = redis::Client::open(self.url()).ok()?;
        client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()
    }

    /// Whether it answers `PING`.
    pub fn answers(&self) -> bool {
        self.connect().is_some_and(|mut c| {
            redis::cmd("PING")
                .query::<String>(&mut c)
                .is_ok_and(|p| p == "PONG")
        })
    }
}

impl Drop for TempRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
