//! Loopback HTTP servers for the registry's tests: a package index, a
//! hub, its storage, each a closure from request to reply.

use std::io::Write;

/// A request as the loopback servers below see it.
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A reply: status line, headers, body, and how much of the body to
/// send before hanging up.
pub(crate) struct Reply {
    pub(crate) status: &'static str,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) cut: usize,
}

/// A reply of `status` and nothing else.
pub(crate) fn empty(status: &'static str) -> Reply {
    Reply {
        status,
        headers: vec![],
        body: vec![],
        cut: 0,
    }
}

pub(crate) fn ok(body: Vec<u8>) -> Reply {
    Reply {
        status: "200 OK",
        headers: vec![],
        cut: body.len(),
        body,
    }
}

/// Serves `handle`'s replies on loopback until the test ends; returns
/// `http://ADDR`. Ranges are honoured for every body.
pub(crate) fn server(handle: impl Fn(&Seen) -> Reply + Send + 'static) -> String {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            let mut words = first.split_whitespace();
            let (method, path) = (
                words.next().unwrap_or("").to_string(),
                words.next().unwrap_or("").to_string(),
            );
            let mut headers = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
            let seen = Seen {
                method,
                path,
                headers,
            };
            let reply = handle(&seen);
            let from: usize = seen
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse().ok())
                .unwrap_or(0);
            let (status, rest) = match (from, reply.status) {
                (0, status)
                | (_, status @ ("302 Found" | "404 Not Found" | "401 Unauthorized")) => {
                    (status, &reply.body[..])
                }
                (from, _) => (
                    "206 Partial Content",
                    &reply.body[from.min(reply.body.len())..],
                ),
            };
            let mut head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                rest.len()
            );
            for (k, v) in &reply.headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes()).unwrap();
            if seen.method != "HEAD" {
                let cut = reply.cut.saturating_sub(from).min(rest.len());
                let _ = stream.write_all(&rest[..cut]);
            }
        }
    });
    format!("http://{addr}")
}
