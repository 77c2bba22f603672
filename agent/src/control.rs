//! The local control socket: how `cacheprobe diagnose` asks a running daemon for its history.
//!
//! A Unix stream socket (default [`DEFAULT_SOCKET_PATH`]) that only root (or the daemon's own
//! user) may use: the socket is 0600, its directory is created 0700, and every peer's
//! credentials are checked. One request per connection: a single JSON line of at most
//! [`MAX_REQUEST_BYTES`], e.g. `{"version":1,"op":"history","since":1700000000}`, answered by
//! one JSON line `{"version":1,"ok":true,"history":{...}}` or `{"version":1,"ok":false,
//! "error":"..."}`. Ops: `history` (optional `since`, unix seconds: `cacheprobe top` asks for
//! the last few seconds every refresh), `keys`, `counters` (OpenMetrics text of the gauges and
//! counters the history does not keep: connections, bytes, queues, process fds) and `ping`.
//!
//! Sharing: the daemon keeps its [`History`] in an `Arc<Mutex<_>>`; the pipeline locks it to
//! record each batch of facts, and this server locks it only to copy a snapshot (a few ms for
//! 15 minutes), serialising outside the lock on a blocking thread so the pipeline never waits
//! for JSON encoding or a slow client.

use std::{
    io::{Read, Write},
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::history::{History, HistorySnapshot};

pub const DEFAULT_SOCKET_PATH: &str = "/run/cacheprobe/cacheprobe.sock";
pub const PROTOCOL_VERSION: u32 = 1;
pub const MAX_REQUEST_BYTES: usize = 4096;
/// 15 minutes of a busy host serialise to ~10 MB; this leaves room without trusting the peer.
pub const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// Connections served at once; each may hold a serialised history in memory.
const MAX_CONCURRENT: usize = 4;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Unread input discarded after answering, so closing does not reset the connection.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub op: String,
    /// For `history`: the first unix second wanted (default: everything kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySnapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<crate::keystats::KeysReport>,
    /// For `counters`: OpenMetrics text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<String>,
}

impl Response {
    fn error(message: impl Into<String>) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: false,
            error: Some(message.into()),
            history: None,
            keys: None,
            counters: None,
        }
    }

    fn ok() -> Response {
        Response {
            version: PROTOCOL_VERSION,
            ok: true,
            error: None,
            history: None,
            keys: None,
            counters: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens at the path: no daemon is running (or it uses another socket).
    #[error("no cacheprobe daemon at {0}")]
    NoDaemon(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("another cacheprobe daemon already answers on {0}")]
    InUse(PathBuf),
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the daemon's answer exceeds {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
    #[error("the daemon refused: {0}")]
    Daemon(String),
}

/// `err` from reaching the daemon, for a command that needs it (`what` it could not do): said
/// once, with the fix when it is a missing privilege.
pub fn unreachable(err: ControlError, what: &str) -> anyhow::Error {
    let denied = matches!(
        &err,
        ControlError::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied
    );
    if denied {
        anyhow::anyhow!("{what}: {err} (the control socket is root's: run as root)")
    } else {
        anyhow::anyhow!("{what}: {err}")
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ControlError + '_ {
    move |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Binds the control socket at `path`, root-only. Creates the parent directory (0700) when
/// missing; replaces a stale socket left by a dead daemon but never a live one or a non-socket.
/// The socket is bound under a temporary name, set to 0600, then renamed into place, so it is
/// never reachable with looser permissions. Must run inside a tokio runtime.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                .map_err(io_error(parent))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io_error(path))?;
        }
        Ok(_) => return Err(ControlError::NotASocket(path.to_path_buf())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error(path)(err)),
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary).map_err(io_error(&temporary))?;
    let placed = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(err) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(io_error(path)(err));
    }
    Ok(listener)
}

/// Serves requests until the listener fails. Spawn it as a task next to the pipeline.
pub async fn serve(listener: UnixListener, history: Arc<Mutex<History>>) {
    serve_with_counters(listener, history, None).await
}

/// [`serve`], also answering `counters` from `registry` (`Metrics::top_registry`).
pub async fn serve_with_counters(
    listener: UnixListener,
    history: Arc<Mutex<History>>,
    registry: Option<Arc<prometheus_client::registry::Registry>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = respond(&mut stream, &Response::error("busy, try again")).await;
            });
            continue;
        };
        let history = history.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            handle(stream, history, registry).await;
            drop(permit);
        });
    }
}

fn peer_allowed(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == 0 || cred.uid() == own_uid)
}

async fn handle(
    mut stream: UnixStream,
    history: Arc<Mutex<History>>,
    registry: Option<Arc<prometheus_client::registry::Registry>>,
) {
    if !peer_allowed(&stream) {
        let _ = respond(&mut stream, &Response::error("permission denied")).await;
        return;
    }
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(request)) => request,
        Ok(Err(message)) => {
            let _ = respond(&mut stream, &Response::error(message)).await;
            return;
        }
        Err(_) => {
            let _ = respond(&mut stream, &Response::error("request timed out")).await;
            return;
        }
    };
    let answer = answer(request, history, registry).await;
    let _ = respond_raw(&mut stream, answer).await;
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST_BYTES as u64 + 1);
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|err| format!("cannot read the request: {err}"))?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_slice(&line).map_err(|err| format!("bad request: {err}"))
}

/// The serialised response line for a request.
async fn answer(
    request: Request,
    history: Arc<Mutex<History>>,
    registry: Option<Arc<prometheus_client::registry::Registry>>,
) -> Vec<u8> {
    let response = if request.version != PROTOCOL_VERSION {
        Response::error(format!(
            "protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION})",
            request.version
        ))
    } else {
        match request.op.as_str() {
            "ping" => Response::ok(),
            "counters" => {
                let Some(registry) = registry else {
                    return encode(&Response::error("this daemon serves no counters here"))
                        .unwrap_or_default();
                };
                let text = tokio::task::spawn_blocking(move || {
                    crate::export::encode::encode(
                        &registry,
                        crate::export::encode::Format::OpenMetrics,
                    )
                })
                .await;
                match text {
                    Ok(Ok(text)) => Response {
                        counters: Some(text),
                        ..Response::ok()
                    },
                    _ => Response::error("cannot encode the counters"),
                }
            }
            "keys" => Response {
                keys: Some(
                    history
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .keys()
                        .clone(),
                ),
                ..Response::ok()
            },
            "history" => {
                let since = request.since.unwrap_or(0);
                let encoded = tokio::task::spawn_blocking(move || {
                    let snapshot = history
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .snapshot(since);
                    encode(&Response {
                        history: Some(snapshot),
                        ..Response::ok()
                    })
                })
                .await;
                return match encoded {
                    Ok(Some(bytes)) if bytes.len() <= MAX_RESPONSE_BYTES => bytes,
                    Ok(Some(_)) => encode(&Response::error(
                        "history too large for one answer; ask for a later `since`",
                    ))
                    .unwrap_or_default(),
                    _ => encode(&Response::error("cannot encode the history")).unwrap_or_default(),
                };
            }
            other => Response::error(format!(
                "unknown op {other:?} (known: history, keys, counters, ping)"
            )),
        }
    };
    encode(&response).unwrap_or_default()
}

fn encode(response: &Response) -> Option<Vec<u8>> {
    let mut bytes = serde_json::to_vec(response).ok()?;
    bytes.push(b'\n');
    Some(bytes)
}

async fn respond(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    respond_raw(stream, encode(response).unwrap_or_default()).await
}

async fn respond_raw(stream: &mut UnixStream, bytes: Vec<u8>) -> std::io::Result<()> {
    stream.write_all(&bytes).await?;
    stream.shutdown().await?;
    // Closing with unread input would reset the connection and could destroy the answer
    // (e.g. the error for an over-long request): discard what is left, within bounds.
    let mut sink = [0u8; 8192];
    let mut drained = 0usize;
    let drain = async {
        while drained < DRAIN_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    Ok(())
}

/// Asks a running daemon for its hot keys and key splits.
pub fn fetch_keys(
    path: &Path,
    timeout: Duration,
) -> Result<crate::keystats::KeysReport, ControlError> {
    let response = call(
        path,
        &Request {
            version: PROTOCOL_VERSION,
            op: "keys".to_string(),
            since: None,
        },
        timeout,
    )?;
    Ok(response.keys.unwrap_or_default())
}

/// Asks a running daemon for the counters `top` shows, as OpenMetrics text.
pub fn fetch_counters(path: &Path, timeout: Duration) -> Result<String, ControlError> {
    let response = call(
        path,
        &Request {
            version: PROTOCOL_VERSION,
            op: "counters".to_string(),
            since: None,
        },
        timeout,
    )?;
    response
        .counters
        .ok_or_else(|| ControlError::Protocol("the answer has no counters".to_string()))
}

/// Asks the daemon at `path` for its history from `since` on. Blocking, bounded by `timeout`
/// overall and by [`MAX_RESPONSE_BYTES`].
pub fn fetch_history(
    path: &Path,
    since: u64,
    timeout: Duration,
) -> Result<HistorySnapshot, ControlError> {
    let response = call(
        path,
        &Request {
            version: PROTOCOL_VERSION,
            op: "history".to_string(),
            since: Some(since),
        },
        timeout,
    )?;
    let history = response
        .history
        .ok_or_else(|| ControlError::Protocol("the answer has no history".to_string()))?;
    if history.version != crate::history::snapshot::SNAPSHOT_VERSION {
        return Err(ControlError::Protocol(format!(
            "history version {} is not supported",
            history.version
        )));
    }
    Ok(history)
}

/// Sends one request and reads the answer; a refused answer is [`ControlError::Daemon`].
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ControlError::NoDaemon(path.to_path_buf())
            }
            _ => io_error(path)(err),
        })?;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ControlError::Timeout(timeout))
    };
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(io_error(path))?;
    let mut line =
        serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_error(path))?;
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(io_error(path))?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                if answer.len() + n > MAX_RESPONSE_BYTES + 1 {
                    return Err(ControlError::TooLarge);
                }
                answer.extend_from_slice(&chunk[..n]);
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ControlError::Timeout(timeout))
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(path)(err)),
        }
    }
    let response: Response =
        serde_json::from_slice(&answer).map_err(|err| ControlError::Protocol(err.to_string()))?;
    if !response.ok {
        return Err(ControlError::Daemon(
            response
                .error
                .unwrap_or_else(|| "no reason given".to_string()),
        ));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::history::{Fact, HistoryLimits};

    use crate::model::{Role, Status};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "cacheprobe-control-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn history_with_traffic() -> Arc<Mutex<History>> {
        let mut history = History::new(900, HistoryLimits::default());
        for t in 0..5 {
            history.record(
                1_700_000_000 + t,
                Fact::Request {
                    service: "memcached".into(),
                    server: "10.0.0.1:11211".into(),
                    role: Role::Client,
                    comm: Some("php".into()),
                    command: "get".into(),
                    status: Status::Hit,
                    latency_us: Some(200),
                },
            );
        }
        Arc::new(Mutex::new(history))
    }

    fn raw_exchange(path: &Path, request: &[u8]) -> Response {
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(request);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        serde_json::from_slice(&answer).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_history_over_a_root_only_socket() {
        let dir = TempDir::new();
        let path = dir.0.join("sub").join("cacheprobe.sock");
        let listener = bind(&path).unwrap();
        let history = history_with_traffic();
        let expected = history.lock().unwrap().snapshot(1_700_000_002);
        let server = tokio::spawn(serve(listener, history));

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);

        let client_path = path.clone();
        let snapshot = tokio::task::spawn_blocking(move || {
            fetch_history(&client_path, 1_700_000_002, Duration::from_secs(10))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(snapshot, expected);
        assert_eq!(snapshot.seconds.len(), 3);

        let client_path = path.clone();
        let (unknown, garbage, huge, old, ping) = tokio::task::spawn_blocking(move || {
            (
                raw_exchange(&client_path, br#"{"version":1,"op":"shutdown"}"#),
                raw_exchange(&client_path, b"\x00\xffnot json\n"),
                raw_exchange(&client_path, &vec![b'{'; MAX_REQUEST_BYTES * 4]),
                raw_exchange(&client_path, br#"{"version":7,"op":"history"}"#),
                raw_exchange(&client_path, b"{\"version\":1,\"op\":\"ping\"}\n"),
            )
        })
        .await
        .unwrap();
        assert!(!unknown.ok && unknown.error.unwrap().contains("unknown op"));
        assert!(!garbage.ok && garbage.error.unwrap().contains("bad request"));
        assert!(!huge.ok && huge.error.unwrap().contains("longer than"));
        assert!(!old.ok && old.error.unwrap().contains("version 7"));
        assert!(ping.ok && ping.history.is_none());

        // Still serving after the bad requests.
        let client_path = path.clone();
        let again = tokio::task::spawn_blocking(move || {
            fetch_history(&client_path, 0, Duration::from_secs(10))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(again.seconds.len(), 5);

        // A second daemon must not steal the socket of a live one.
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_counters_when_given_a_registry() {
        let dir = TempDir::new();
        let with = dir.0.join("with.sock");
        let without = dir.0.join("without.sock");
        let mut registry = prometheus_client::registry::Registry::default();
        let counter: prometheus_client::metrics::counter::Counter = Default::default();
        counter.inc_by(7);
        registry.register("cacheprobe_top_test", "a test counter", counter);
        let servers = [
            tokio::spawn(serve_with_counters(
                bind(&with).unwrap(),
                history_with_traffic(),
                Some(Arc::new(registry)),
            )),
            tokio::spawn(serve(bind(&without).unwrap(), history_with_traffic())),
        ];
        let (text, refused) = tokio::task::spawn_blocking(move || {
            (
                fetch_counters(&with, Duration::from_secs(10)),
                fetch_counters(&without, Duration::from_secs(10)),
            )
        })
        .await
        .unwrap();
        assert!(
            text.unwrap().contains("cacheprobe_top_test_total 7"),
            "the registry's text"
        );
        assert!(
            matches!(refused, Err(ControlError::Daemon(ref m)) if m.contains("no counters")),
            "{refused:?}"
        );
        for server in servers {
            server.abort();
        }
    }

    #[tokio::test]
    async fn stale_sockets_are_replaced_but_other_files_are_not() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("cacheprobe.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(bind(&path).is_ok(), "stale socket replaced");
        let file = dir.0.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(bind(&file), Err(ControlError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn no_daemon_is_a_distinct_error() {
        let dir = TempDir::new();
        let err = fetch_history(&dir.0.join("none.sock"), 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ControlError::NoDaemon(_)), "{err}");
    }

    #[test]
    fn a_silent_daemon_times_out() {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("silent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let err = fetch_history(&path, 0, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, ControlError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
