//! A throwaway PostgreSQL cluster for tests: `initdb` into a temporary
//! folder, `pg_ctl start` on a free loopback port, `pg_ctl stop` when
//! dropped. The server binaries come from the PATH or Debian's
//! `/usr/lib/postgresql/<version>/bin` (`scripts/setup.sh` installs them).
//! PostgreSQL refuses to run as root, so as root the cluster belongs to the
//! `postgres` user and each command runs through `runuser`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running throwaway cluster.
pub struct TempPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    as_postgres: bool,
    /// `postgres://realm@127.0.0.1:PORT/postgres`.
    pub url: String,
}

fn bin_dir() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

impl TempPostgres {
    /// Starts a cluster, or `None` when PostgreSQL is not installed (a
    /// failure instead when `REALM_REQUIRE_POSTGRES=1`).
    pub fn start() -> Option<TempPostgres> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var("REALM_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "PostgreSQL (initdb, pg_ctl) is not installed; run scripts/setup.sh"
            );
            eprintln!("skipping the PostgreSQL half: initdb is not installed");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("realm-pg")
            .tempdir()
            .unwrap();
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown the cluster folder to postgres");
        }
        let port = {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap().port()
        };
        let pg = TempPostgres {
            bin,
            as_postgres,
            url: format!("postgres://realm@127.0.0.1:{port}/postgres"),
            dir,
        };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "realm",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("log");
        pg.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        );
        Some(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let output = self
            .command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{tool} failed: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}
