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
    /// With TLS: the certificate authority that signed the server's
    /// certificate (made by `openssl` for the test).
    pub ca: Option<PathBuf>,
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
        Self::start_with(false)
    }

    /// A cluster that also offers TLS, with a certificate for 127.0.0.1
    /// signed by a throwaway authority (`ca`).
    pub fn start_tls() -> Option<TempPostgres> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Option<TempPostgres> {
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
        let ca = tls.then(|| make_certificates(dir.path()));
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
            ca,
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
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            pg.dir.path().display()
        );
        if tls {
            let d = pg.dir.path().display();
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
            ));
        }
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

    /// `url` with `sslmode=require`.
    pub fn url_requiring_tls(&self) -> String {
        format!("{}?sslmode=require", self.url)
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

/// A throwaway certificate authority and a server certificate for
/// 127.0.0.1 signed by it, in `dir`; returns the authority's path.
fn make_certificates(dir: &Path) -> PathBuf {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=realm test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    ]);
    // PostgreSQL refuses a key others may read.
    let key = dir.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    dir.join("ca.crt")
}
