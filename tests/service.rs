//! `examples/service.rs` as a user runs it: the HTTP key-value and session store
//! over shared maps with `watch()`, on SQLite. Writes go through, reads come from
//! memory, another program's writes show up, and a row it writes that does not decode
//! holds nothing else back.
#![cfg(all(feature = "tokio", feature = "sqlite"))]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use write_thru_hash::DbHashMap;

#[path = "conformance/env.rs"]
#[allow(dead_code, unused_imports)]
mod env;

struct Service {
    child: Child,
    addr: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(db: &str) -> Service {
    let bin = env::example_bin("service");
    let mut child = Command::new(bin)
        .args(["--db", db, "--addr", "127.0.0.1:0", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Service { child, addr }
}

/// One HTTP/1.1 request; the status and the body.
fn call(s: &Service, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    let body = body.unwrap_or("");
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[test]
fn sqlite_service_example_serves_and_watches() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("service.sqlite").display());
    let s = start(&db);
    assert_eq!(call(&s, "PUT", "/kv/greeting", Some("\"hello\"")).0, 204);
    assert_eq!(
        call(&s, "GET", "/kv/greeting", None),
        (200, "\"hello\"".into())
    );
    assert_eq!(call(&s, "GET", "/kv/nothing", None).0, 404);
    let (status, token) = call(&s, "POST", "/sessions", Some("\"ann\""));
    assert_eq!(status, 200);
    let token: String = serde_json::from_str(&token).unwrap();
    for hits in 1..=3 {
        let (status, body) = call(&s, "GET", &format!("/sessions/{token}"), None);
        assert_eq!(status, 200);
        let session: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(session["hits"], hits);
    }

    // Another program writes the same table: the service sees it.
    let mut other: DbHashMap<String, serde_json::Value> = DbHashMap::builder_url(&db)
        .table("kv")
        .coherent()
        .open()
        .unwrap();
    assert_eq!(other["greeting"], "hello");
    other.insert("from elsewhere".into(), 7.into()).unwrap();
    env::eventually("another program's write", Duration::from_secs(10), || {
        call(&s, "GET", "/kv/from%20elsewhere", None) == (200, "7".into())
    });
    // A row that does not decode holds nothing else back.
    let raw = rusqlite::Connection::open(dir.path().join("service.sqlite")).unwrap();
    raw.execute(
        "UPDATE kv SET value = 'not json' WHERE key = '\"greeting\"'",
        [],
    )
    .unwrap();
    other.insert("after".into(), 8.into()).unwrap();
    env::eventually("a write after a bad row", Duration::from_secs(10), || {
        call(&s, "GET", "/kv/after", None) == (200, "8".into())
    });
    assert_eq!(
        call(&s, "GET", "/kv/greeting", None),
        (200, "\"hello\"".into())
    );

    assert_eq!(call(&s, "DELETE", "/kv/after", None).0, 204);
    assert_eq!(call(&s, "DELETE", "/kv/after", None).0, 404);
    let (status, health) = call(&s, "GET", "/health", None);
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("\"sessions\":1"), "{health}");
}
