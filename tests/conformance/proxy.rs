//! A TCP proxy between a map and its server, for faults a network makes: every
//! connection cut at once (a firewall or a proxy dropping idle connections, a restart),
//! the server's next answer lost, the answer to a `COMMIT` lost.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// A TCP proxy between the map and the server that can lose the server's next answer
/// and cut the connection, as a network failure would.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    /// Both ends of every connection made so far, to cut them all.
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// Connections cut by `cut_all`.
    pub(crate) cuts: Arc<AtomicUsize>,
    /// While set, nothing is passed on either way (a paused network).
    paused: Arc<AtomicBool>,
    cut_next_answer: Arc<AtomicBool>,
    /// Armed: the answer to the next client packet that holds `COMMIT` is cut.
    cut_commit: Arc<AtomicBool>,
    /// Armed: the answer to the next client packet that holds `INSERT` is replaced by a
    /// PostgreSQL FATAL.
    fatal_after_insert: Arc<AtomicBool>,
    /// While set, new connections are closed as soon as they are made.
    refusing: Arc<AtomicBool>,
}

impl Proxy {
    pub(crate) fn to(server_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let commit = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let paused: Arc<AtomicBool> = Arc::default();
        let paused2 = Arc::clone(&paused);
        let (insert, fatal, refusing): (Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicBool>) =
            Default::default();
        let (insert2, fatal2, refusing2) = (
            Arc::clone(&insert),
            Arc::clone(&fatal),
            Arc::clone(&refusing),
        );
        let (cut2, commit2, open2) = (Arc::clone(&cut), Arc::clone(&commit), Arc::clone(&open));
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if refusing2.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)) else {
                    continue;
                };
                {
                    let mut open = open2.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (cut_up, commit, pause_up) = (
                    Arc::clone(&cut2),
                    Arc::clone(&commit2),
                    Arc::clone(&paused2),
                );
                let (insert, fatal_up) = (Arc::clone(&insert2), Arc::clone(&fatal2));
                thread::spawn(move || {
                    copy_up(
                        client,
                        server,
                        &commit,
                        &cut_up,
                        &pause_up,
                        (&insert, &fatal_up),
                    )
                });
                let (cut, pause, fatal) =
                    (Arc::clone(&cut2), Arc::clone(&paused2), Arc::clone(&fatal2));
                thread::spawn(move || copy(s2, c2, Some(cut), &pause, Some(&fatal)));
            }
        });
        Proxy {
            port,
            open,
            cuts: Arc::default(),
            paused,
            cut_next_answer: cut,
            cut_commit: commit,
            fatal_after_insert: insert,
            refusing,
        }
    }

    /// The server's answer to the next `INSERT` (which it ran) is dropped, and the
    /// client gets instead the FATAL a PostgreSQL backend sends when its postmaster
    /// died, and the connection closes: the statement was done, the client is told the
    /// session ended. (The statement's text must cross: a statement sent whole.)
    pub(crate) fn fatal_instead_of_answer_to_insert(&self) {
        self.fatal_after_insert.store(true, Ordering::SeqCst);
    }

    /// While `on`, new connections are closed at once (a server that is not back yet).
    pub(crate) fn refuse_new(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
    }

    /// Holds everything either way for `how_long`, as a paused network would.
    pub(crate) fn pause(&self, how_long: std::time::Duration) {
        self.paused.store(true, Ordering::SeqCst);
        thread::sleep(how_long);
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Cuts every connection made so far, both ways, as a firewall dropping idle
    /// connections or a restarting server would; new connections go through.
    pub(crate) fn cut_all(&self) {
        let open = std::mem::take(&mut *self.open.lock().unwrap());
        self.cuts.fetch_add(open.len() / 2, Ordering::Relaxed);
        for stream in open {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// The server's answer to the next `COMMIT` is dropped and the connection closed.
    pub(crate) fn cut_answer_to_commit(&self) {
        self.cut_commit.store(true, Ordering::SeqCst);
    }

    /// The server's next answer is dropped and the connection closed.
    pub(crate) fn cut_next_answer(&self) {
        self.cut_next_answer.store(true, Ordering::SeqCst);
    }
}

/// Client to server: when armed, a packet that holds the word `COMMIT` arms the cut of the
/// next answer (one that holds `INSERT`, its FATAL) before it is passed on, so the
/// answer cannot come first.
fn copy_up(
    from: TcpStream,
    to: TcpStream,
    commit: &AtomicBool,
    cut: &AtomicBool,
    paused: &AtomicBool,
    (insert, fatal): (&AtomicBool, &AtomicBool),
) {
    pump(from, to, paused, |bytes| {
        let text = String::from_utf8_lossy(bytes).to_ascii_uppercase();
        if text.contains("INSERT") && insert.swap(false, Ordering::SeqCst) {
            fatal.store(true, Ordering::SeqCst);
        }
        // The word, not `SET autocommit`.
        let is_commit = text
            .match_indices("COMMIT")
            .any(|(i, _)| i == 0 || !text.as_bytes()[i - 1].is_ascii_alphabetic());
        if is_commit && commit.swap(false, Ordering::SeqCst) {
            cut.store(true, Ordering::SeqCst);
        }
        true
    });
}

/// Server to client: an armed cut drops the next answer and closes the connection; an
/// armed FATAL replaces it with a PostgreSQL FATAL first.
fn copy(
    from: TcpStream,
    to: TcpStream,
    cut: Option<Arc<AtomicBool>>,
    paused: &AtomicBool,
    fatal: Option<&AtomicBool>,
) {
    let mut to2 = to.try_clone().unwrap();
    pump(from, to, paused, |_| {
        if fatal.is_some_and(|f| f.swap(false, Ordering::SeqCst)) {
            let _ = to2.write_all(&postgres_fatal());
            // Read before the close, as a backend's last words are.
            thread::sleep(std::time::Duration::from_millis(50));
            return false;
        }
        !cut.as_ref()
            .is_some_and(|cut| cut.swap(false, Ordering::SeqCst))
    });
}

/// A PostgreSQL ErrorResponse: FATAL 57P01, as a backend whose postmaster died says.
fn postgres_fatal() -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P01"),
        (
            b'M',
            "terminating connection due to unexpected postmaster exit",
        ),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    message.extend_from_slice(&fields);
    message
}

/// Passes what `from` sends on to `to`, holding it while paused, until either side
/// closes or `pass` says to drop a packet and cut; then closes both.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    paused: &AtomicBool,
    mut pass: impl FnMut(&[u8]) -> bool,
) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !pass(&buf[..n]) {
            break;
        }
        while paused.load(Ordering::SeqCst) {
            thread::sleep(std::time::Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// What a soak's writers saw: the writes acknowledged (the last value per key), the
/// calls whose outcome was unknown, and those refused with nothing written.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) acked: Mutex<std::collections::HashMap<String, i64>>,
    pub(crate) unknown: AtomicUsize,
    pub(crate) refused: AtomicUsize,
}

impl Tally {
    /// Notes the outcome of writing `value` to `key`. Only an unknown outcome (settled
    /// by the next call) or a retryable refusal may fail a call; anything else panics.
    pub(crate) fn note<T>(&self, key: String, value: i64, outcome: write_thru_hash::Result<T>) {
        use write_thru_hash::Error;
        match outcome {
            Ok(_) => {
                self.acked.lock().unwrap().insert(key, value);
            }
            Err(e) if e.is_outcome_unknown() && !matches!(e, Error::Poisoned { .. }) => {
                self.unknown.fetch_add(1, Ordering::Relaxed);
                // Whatever the table holds now is the key's truth: forget it.
                self.acked.lock().unwrap().remove(&key);
            }
            Err(e) if e.is_retryable() => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("a call failed for good: {e}"),
        }
    }

    /// Every acknowledged write is in `table`.
    pub(crate) fn check(&self, table: &std::collections::HashMap<String, i64>) {
        for (key, value) in self.acked.lock().unwrap().iter() {
            assert_eq!(
                table.get(key),
                Some(value),
                "acknowledged write of {key} lost"
            );
        }
    }
}

/// `url` with its port replaced, and the port it had: a URL's authority, or the
/// `Port=` attribute of an ODBC connection string.
pub(crate) fn via(url: &str, port: u16) -> (String, u16) {
    if let Some(cs) = url.strip_prefix("odbc:") {
        let mut old = 0;
        let parts: Vec<String> = cs
            .split(';')
            .map(|part| match part.split_once('=') {
                Some((k, v)) if k.trim().eq_ignore_ascii_case("port") => {
                    old = v.trim().parse().unwrap();
                    format!("{k}={port}")
                }
                _ => part.to_string(),
            })
            .collect();
        return (format!("odbc:{}", parts.join(";")), old);
    }
    let at = url
        .rfind('@')
        .map_or(url.find("://").unwrap() + 3, |i| i + 1);
    let rest = &url[at..];
    let end = rest.find('/').unwrap_or(rest.len());
    let hostport = &rest[..end];
    let (host, old) = hostport.rsplit_once(':').unwrap();
    (
        format!("{}{host}:{port}{}", &url[..at], &rest[end..]),
        old.parse().unwrap(),
    )
}

/// A proxy in front of the server that `url` names, and `url` through it. The mysql
/// crate is told to keep to TCP (it moves loopback connections to the Unix socket).
pub(crate) fn proxied(url: &str) -> (Proxy, String) {
    let (_, server_port) = via(url, 0);
    let proxy = Proxy::to(server_port);
    let (mut url, _) = via(url, proxy.port);
    if url.starts_with("mysql:") {
        url.push_str(if url.contains('?') {
            "&prefer_socket=false"
        } else {
            "?prefer_socket=false"
        });
    }
    (proxy, url)
}
