//! A key-value and session store as an HTTP service, over one shared map that heals
//! itself: copy it as the start of your own. Feature `tokio`; axum for HTTP.
//!
//! ```text
//! cargo run -p write-thru-hash --features tokio --example service                  # SQLite: service.sqlite
//! cargo run -p write-thru-hash --features tokio,postgres --example service -- --db postgres://…
//! curl -X PUT localhost:3000/kv/greeting -d '"hello"'      # 204: written through
//! curl localhost:3000/kv/greeting                           # "hello", from memory
//! curl -X DELETE localhost:3000/kv/greeting                 # 204, or 404
//! curl -X POST localhost:3000/sessions -d '"ann"'           # a new session's token
//! curl localhost:3000/sessions/TOKEN                        # the session, its hits counted
//! curl localhost:3000/health                                # entries, commits, calls
//! ```
//!
//! Reads are memory reads on the runtime's threads; writes are `…_async` calls, which
//! wait for the database off the runtime's threads. Every instance opened with `--watch`
//! on the same table sees the others' writes (coherence). A connection that dies is made
//! again by the map; a write whose outcome was unknown is answered 503 and settled by
//! the next write. What the watcher meets (rows it skips, errors, recoveries) is read
//! from a subscription by a task, with no thread of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::{Deserialize, Serialize};
use write_thru_hash::{DbHashMap, Error, Event, SharedDbHashMap};

#[derive(Parser)]
struct Args {
    /// Database URL: sqlite:PATH, postgres://…, mysql://…, odbc:…
    #[arg(long, default_value = "sqlite:service.sqlite")]
    db: String,
    /// Address to listen on (port 0: any free port; the one taken is printed).
    #[arg(long, default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// See other instances' (and other programs') writes as they commit.
    #[arg(long)]
    watch: bool,
}

/// A session: who, how many requests, when last seen (seconds since 1970).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    user: String,
    hits: u64,
    last_seen: u64,
}

#[derive(Clone)]
struct App {
    kv: SharedDbHashMap<String, serde_json::Value>,
    sessions: SharedDbHashMap<String, Session>,
}

/// An error as an HTTP answer: 503 when trying again may work (the database is busy or
/// away, or the outcome of the write is unknown and the next write settles it), 500
/// otherwise. Messages never hold a password.
struct Failure(Error);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = if self.0.is_retryable() || self.0.is_outcome_unknown() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        (status, self.0.to_string()).into_response()
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(e)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn get_kv(State(app): State<App>, Path(key): Path<String>) -> Response {
    match app.kv.get(&key) {
        Some(value) => Json(value).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn put_kv(
    State(app): State<App>,
    Path(key): Path<String>,
    Json(value): Json<serde_json::Value>,
) -> Result<StatusCode, Failure> {
    app.kv.insert_async(key, value).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_kv(State(app): State<App>, Path(key): Path<String>) -> Result<StatusCode, Failure> {
    Ok(match app.kv.remove_async(key).await? {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::NOT_FOUND,
    })
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(0);

async fn new_session(
    State(app): State<App>,
    Json(user): Json<String>,
) -> Result<Json<String>, Failure> {
    // A real service draws tokens from a CSPRNG; this one needs no more crates.
    let token = format!(
        "{:x}-{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        NEXT_TOKEN.fetch_add(1, Ordering::Relaxed)
    );
    let session = Session {
        user,
        hits: 0,
        last_seen: now(),
    };
    app.sessions.insert_async(token.clone(), session).await?;
    Ok(Json(token))
}

async fn touch_session(
    State(app): State<App>,
    Path(token): Path<String>,
) -> Result<Response, Failure> {
    if !app.sessions.contains_key(&token) {
        return Ok(StatusCode::NOT_FOUND.into_response());
    }
    let now = now();
    // Read-modify-write in one call: no other write to the map comes between.
    let touched = app
        .sessions
        .update_async(token.clone(), move |s| {
            s.hits += 1;
            s.last_seen = now;
        })
        .await?;
    Ok(match (touched, app.sessions.get(&token)) {
        (true, Some(session)) => Json(session).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    })
}

async fn health(State(app): State<App>) -> Json<serde_json::Value> {
    let (commits, calls) = app.kv.commits();
    Json(serde_json::json!({
        "entries": app.kv.len(),
        "sessions": app.sessions.len(),
        "commits": commits,
        "calls": calls,
    }))
}

/// Logs what a watching map meets, awaiting its subscription on the runtime.
fn report<K: std::fmt::Debug + Send + 'static>(
    name: &'static str,
    map: &SharedDbHashMap<K, impl Send + Sync + 'static>,
) {
    let events = map.subscribe();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::Changed(keys) => eprintln!("{name}: others changed {} keys", keys.len()),
                Event::Skipped { key, reason } => {
                    eprintln!("{name}: left out the row of {key}, which does not decode: {reason}")
                }
                other => eprintln!("{name}: {other:?}"),
            }
        }
    });
}

fn open<V>(args: &Args, table: &str) -> Result<SharedDbHashMap<String, V>, Error>
where
    V: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let b = DbHashMap::builder_url(&args.db).table(table);
    if args.watch {
        b.watch().open_shared()
    } else {
        b.open_shared()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // Opening reads the whole table: off the runtime's threads.
    let (kv, sessions) = tokio::task::block_in_place(|| -> Result<_, Error> {
        Ok((open(&args, "kv")?, open(&args, "sessions")?))
    })?;
    if args.watch {
        report("kv", &kv);
        report("sessions", &sessions);
    }
    let app = App { kv, sessions };
    let router = Router::new()
        .route("/kv/{key}", get(get_kv).put(put_kv).delete(delete_kv))
        .route("/sessions", post(new_session))
        .route("/sessions/{token}", get(touch_session))
        .route("/health", get(health))
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Write-through: nothing is waiting; `close` also says so for write-behind maps.
    app.kv.close()?;
    app.sessions.close()?;
    Ok(())
}
