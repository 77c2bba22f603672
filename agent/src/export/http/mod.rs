//! Serves `/metrics` and `/healthz` over hyper's HTTP/1.1, optionally behind TLS and basic auth, within bounds that keep hostile clients from starving Prometheus.
//!
//! Every connection answers one request and closes. Its request head (TLS handshake included)
//! must arrive within [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD_BYTES`]; until its first byte
//! arrives a connection holds no buffer, only a task and a socket. [`admission`] caps
//! connections in total and per source address, and lets a newcomer take the slot of a
//! connection still waiting for its head, so idle or slow clients cannot lock Prometheus out.
//! Encoding runs off the event loop, and at most [`MAX_CONCURRENT_SCRAPES`] encoded bodies exist
//! at a time (at most one per source), so a registry at the cardinality ceiling (tens of MB of
//! text) neither stalls the ring buffers nor multiplies memory by the number of scrapers; a
//! client that leaves its response unread loses its permit to a waiting scrape after
//! [`STALL_GRACE`].

pub mod admission;

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use subtle::ConstantTimeEq as _;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, TryAcquireError},
    time::Instant,
};
use tokio_rustls::{rustls, TlsAcceptor};

use crate::export::{encode::Format, metrics::HttpClosedLabels};
use admission::{Admission, ConnectionLimits, Refusal, Ticket};

/// Request line and headers.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// From accept to a complete request head, TLS handshake included.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// From a complete head to the last byte of the response handed to the kernel.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Two: a Prometheus HA pair scraping at the same moment is not kept waiting.
pub const MAX_CONCURRENT_SCRAPES: usize = 2;
/// How long a connection may hold a scrape permit with its response ready but not taken
/// while another scrape waits: a client that does not read must not starve Prometheus.
pub const STALL_GRACE: Duration = Duration::from_millis(500);
/// Base64 of a `user:password` longer than this is not ours.
const MAX_CREDENTIALS_BASE64: usize = 1024;

/// Why a connection was closed before (or instead of) a normal answer: the `reason` label of
/// `cacheprobe_http_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Refused at accept: its source already held `limits.http_connections_per_source`.
    PerSourceLimit,
    /// Refused at accept: every slot was taken by a connection already being answered.
    ConnectionLimit,
    /// Closed while waiting for its head, to make room for a newcomer at the connection cap.
    Evicted,
    /// No complete request head (or TLS handshake) within [`HEAD_TIMEOUT`].
    HeadTimeout,
    /// Request head over [`MAX_HEAD_BYTES`] (answered 431).
    HeadTooLarge,
    /// Not HTTP/1.x (answered 400 where possible).
    BadRequest,
    /// The TLS handshake failed.
    TlsHandshake,
    /// A second /metrics request while its source had one in flight (answered 503).
    ConcurrentScrape,
    /// The response was not taken within [`RESPONSE_TIMEOUT`] (a client that does not read).
    ResponseTimeout,
    /// Held a scrape permit with its response unsent for over [`STALL_GRACE`] while another
    /// scrape waited for the permit.
    ResponseStalled,
}

impl Closed {
    pub const ALL: [Closed; 10] = [
        Closed::PerSourceLimit,
        Closed::ConnectionLimit,
        Closed::Evicted,
        Closed::HeadTimeout,
        Closed::HeadTooLarge,
        Closed::BadRequest,
        Closed::TlsHandshake,
        Closed::ConcurrentScrape,
        Closed::ResponseTimeout,
        Closed::ResponseStalled,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Closed::PerSourceLimit => "per_source_limit",
            Closed::ConnectionLimit => "connection_limit",
            Closed::Evicted => "evicted",
            Closed::HeadTimeout => "head_timeout",
            Closed::HeadTooLarge => "head_too_large",
            Closed::BadRequest => "bad_request",
            Closed::TlsHandshake => "tls_handshake",
            Closed::ConcurrentScrape => "concurrent_scrape",
            Closed::ResponseTimeout => "response_timeout",
            Closed::ResponseStalled => "response_stalled",
        }
    }
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}

/// HTTP basic authentication for /metrics (the password lives in the root-only config).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

impl BasicAuth {
    /// Whether an `Authorization` header value carries these credentials.
    pub fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        use base64::Engine as _;
        let Some(value) = authorization.and_then(|value| value.to_str().ok()) else {
            return false;
        };
        let Some((scheme, encoded)) = value.trim().split_once(' ') else {
            return false;
        };
        let encoded = encoded.trim();
        if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > MAX_CREDENTIALS_BASE64 {
            return false;
        }
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let expected = format!("{}:{}", self.username, self.password);
        // Constant time, so the password cannot be guessed byte by byte from response times.
        decoded.ct_eq(expected.as_bytes()).into()
    }
}

/// TLS for /metrics: PEM certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
}

impl TlsFiles {
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let open = |path: &std::path::Path| {
            std::fs::File::open(path)
                .map(std::io::BufReader::new)
                .with_context(|| format!("cannot read {}", path.display()))
        };
        let certs = rustls_pemfile::certs(&mut open(&self.cert_file)?)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("bad certificate PEM in {}", self.cert_file.display()))?;
        if certs.is_empty() {
            anyhow::bail!("no certificate in {}", self.cert_file.display());
        }
        let key = rustls_pemfile::private_key(&mut open(&self.key_file)?)
            .with_context(|| format!("bad key PEM in {}", self.key_file.display()))?
            .with_context(|| format!("no private key in {}", self.key_file.display()))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Everything the server needs; built once at start.
pub struct Server {
    pub registry: Arc<Registry>,
    pub auth: Option<BasicAuth>,
    pub tls: Option<TlsAcceptor>,
    pub limits: ConnectionLimits,
    /// `cacheprobe_http_connections_rejected_total`.
    pub closed: Family<HttpClosedLabels, Counter>,
}

struct Shared {
    registry: Arc<Registry>,
    auth: Option<BasicAuth>,
    tls: Option<TlsAcceptor>,
    scrapes: Arc<Semaphore>,
    closed: Family<HttpClosedLabels, Counter>,
}

impl Shared {
    fn count(&self, closed: Closed) {
        self.closed
            .get_or_create(&HttpClosedLabels {
                reason: closed.label(),
            })
            .inc();
    }
}

pub async fn serve(listener: TcpListener, server: Server) {
    let admission = Admission::new(server.limits);
    let shared = Arc::new(Shared {
        registry: server.registry,
        auth: server.auth,
        tls: server.tls,
        scrapes: Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES)),
        closed: server.closed,
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%err, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match admission.admit(peer.ip()) {
            Ok(admitted) => {
                if admitted.evicted {
                    shared.count(Closed::Evicted);
                }
                tokio::spawn(connection(
                    stream,
                    peer,
                    Arc::new(admitted.ticket),
                    shared.clone(),
                ));
            }
            Err(refusal) => {
                let closed = match refusal {
                    Refusal::PerSource => Closed::PerSourceLimit,
                    Refusal::Full => Closed::ConnectionLimit,
                };
                shared.count(closed);
                tracing::debug!(%peer, reason = closed.label(), "metrics connection refused");
            }
        }
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, ticket: Arc<Ticket>, shared: Arc<Shared>) {
    // A second handle on the socket, which outlives the one the connection closes: a
    // connection cut off (evicted, stalled or past its deadline) is reset through it, so the
    // kernel drops the unsent rest of its response. Closed normally, the kernel would keep
    // that rest (up to a send buffer, about 4 MiB on loopback) in an orphaned socket for as
    // long as the client keeps its window shut: host memory a client that never reads could
    // pile up by asking again and again.
    let reset_handle = stream.as_fd().try_clone_to_owned().ok();
    let served = tokio::time::timeout(
        HEAD_TIMEOUT + RESPONSE_TIMEOUT,
        serve_connection(stream, &ticket, &shared),
    );
    let outcome = tokio::select! {
        // Counted when the newcomer took the slot.
        () = ticket.evicted() => {
            tracing::debug!(%peer, "metrics connection evicted");
            Err(None)
        }
        outcome = served => outcome.unwrap_or(Err(Closed::ResponseTimeout)).map_err(Some),
    };
    if let Err(closed) = outcome {
        if let Some(closed) = closed {
            shared.count(closed);
            tracing::debug!(%peer, reason = closed.label(), "metrics connection closed early");
        }
        if matches!(closed, None | Some(Closed::ResponseTimeout)) {
            if let Some(handle) = &reset_handle {
                reset_on_close(handle);
            }
        }
    }
}

/// Linger 0: the socket's last close resets the connection and discards any unsent data.
fn reset_on_close(socket: &OwnedFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads size_of::<linger>() bytes from a live struct, on a descriptor
    // this function borrows.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn serve_connection(
    stream: TcpStream,
    ticket: &Arc<Ticket>,
    shared: &Arc<Shared>,
) -> Result<(), Closed> {
    let deadline = Instant::now() + HEAD_TIMEOUT;
    // No read buffer (hyper's or rustls') exists until the client sends something.
    match tokio::time::timeout_at(deadline, stream.readable()).await {
        Err(_) => return Err(Closed::HeadTimeout),
        Ok(Err(_)) => return Ok(()),
        Ok(Ok(())) => {}
    }
    match &shared.tls {
        None => http(TokioIo::new(stream), deadline, ticket, shared).await,
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Err(_) => Err(Closed::HeadTimeout),
            Ok(Err(_)) => Err(Closed::TlsHandshake),
            Ok(Ok(tls)) => http(TokioIo::new(tls), deadline, ticket, shared).await,
        },
    }
}

async fn http<I>(
    io: I,
    deadline: Instant,
    ticket: &Arc<Ticket>,
    shared: &Arc<Shared>,
) -> Result<(), Closed>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = {
        let ticket = ticket.clone();
        let shared = shared.clone();
        service_fn(move |request| {
            let ticket = ticket.clone();
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(answer(request, &ticket, &shared).await) }
        })
    };
    let head_left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_left)
        .max_header_size(MAX_HEAD_BYTES)
        // The smallest hyper allows; a GET carries no body to buffer.
        .max_buf_size(MAX_HEAD_BYTES)
        // One request per connection: an idle keep-alive connection would hold a slot.
        .keep_alive(false)
        .serve_connection(io, service)
        .await;
    match served {
        Ok(()) => Ok(()),
        Err(err) if err.is_timeout() => Err(Closed::HeadTimeout),
        Err(err) if err.is_parse_too_large() => Err(Closed::HeadTooLarge),
        Err(err) if err.is_parse() => Err(Closed::BadRequest),
        Err(err) => {
            // The client went away mid-response and the like: nothing to count.
            tracing::debug!(%err, "metrics connection ended");
            Ok(())
        }
    }
}

type Answer = Response<Full<Bytes>>;

fn text(status: StatusCode, body: &'static str) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn answer(request: Request<Incoming>, ticket: &Ticket, shared: &Shared) -> Answer {
    if !ticket.head_complete() {
        // Evicted in the instant the head arrived; the connection is being dropped.
        return text(StatusCode::SERVICE_UNAVAILABLE, "try again\n");
    }
    if let Some(auth) = &shared.auth {
        if !auth.admits(request.headers().get(header::AUTHORIZATION)) {
            let mut response = text(StatusCode::UNAUTHORIZED, "authentication required\n");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"cacheprobe\""),
            );
            return response;
        }
    }
    ticket.admitted_request();
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => scrape(&request, ticket, shared).await,
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "try /metrics\n"),
    }
}

async fn scrape(request: &Request<Incoming>, ticket: &Ticket, shared: &Shared) -> Answer {
    if !ticket.start_scrape() {
        shared.count(Closed::ConcurrentScrape);
        let mut response = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "one scrape at a time per address\n",
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    let permit = loop {
        match shared.scrapes.clone().try_acquire_owned() {
            Ok(permit) => break permit,
            Err(TryAcquireError::Closed) => {
                return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            }
            Err(TryAcquireError::NoPermits) => {}
        }
        if ticket.preempt_stalled_scrape(STALL_GRACE) {
            shared.count(Closed::ResponseStalled);
        }
        // Wait for a permit, looking again for stalled holders now and then.
        if let Ok(Ok(permit)) = tokio::time::timeout(
            Duration::from_millis(100),
            shared.scrapes.clone().acquire_owned(),
        )
        .await
        {
            break permit;
        }
    };
    // Shared by the connection (until the body is written) and the encode (until it ends,
    // even if the client has gone): either alone keeps the slot.
    let permit = Arc::new(permit);
    ticket.hold(permit.clone());
    let format = Format::from_accept(
        request
            .headers()
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok()),
    );
    let registry = shared.registry.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        crate::export::encode::encode(&registry, format)
    })
    .await;
    ticket.response_ready();
    match encoded {
        Ok(Ok(body)) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            response
        }
        _ => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn auth() -> BasicAuth {
        BasicAuth {
            username: "prom".into(),
            password: "s3cret".into(),
        }
    }

    #[test]
    fn basic_auth_admits_only_its_credentials() {
        let auth = auth();
        let admits = |value: &'static str| auth.admits(Some(&HeaderValue::from_static(value)));
        // base64("prom:s3cret")
        assert!(admits("Basic cHJvbTpzM2NyZXQ="));
        assert!(admits("basic cHJvbTpzM2NyZXQ="));
        assert!(admits("  BASIC   cHJvbTpzM2NyZXQ=  "));
        // base64("prom:wrong"), base64("prom:s3cre"), base64("prom:s3cret2")
        assert!(!admits("Basic cHJvbTp3cm9uZw=="));
        assert!(!admits("Basic cHJvbTpzM2NyZQ=="));
        assert!(!admits("Basic cHJvbTpzM2NyZXQy"));
        assert!(!admits("Bearer cHJvbTpzM2NyZXQ="));
        assert!(!admits("Basic"));
        assert!(!admits("Basic !!!!"));
        assert!(
            !admits("Basic cHJvbTpzM2NyZXQ"),
            "unpadded base64 is refused"
        );
        assert!(!auth.admits(None));
        let long = format!("Basic {}", "A".repeat(MAX_CREDENTIALS_BASE64 + 4));
        assert!(!auth.admits(Some(&HeaderValue::from_str(&long).unwrap())));
        let not_utf8 = HeaderValue::from_bytes(b"Basic \xff\xfe").unwrap();
        assert!(!auth.admits(Some(&not_utf8)));
    }

    #[test]
    fn every_closing_reason_has_a_distinct_label() {
        let labels: std::collections::HashSet<_> = Closed::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(labels.len(), Closed::ALL.len());
    }

    struct Running {
        addr: SocketAddr,
        closed: Family<HttpClosedLabels, Counter>,
    }

    impl Running {
        fn closed(&self, reason: Closed) -> u64 {
            self.closed
                .get_or_create(&HttpClosedLabels {
                    reason: reason.label(),
                })
                .get()
        }
    }

    async fn start(
        registry: Registry,
        auth: Option<BasicAuth>,
        limits: ConnectionLimits,
    ) -> Running {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = Family::<HttpClosedLabels, Counter>::default();
        tokio::spawn(serve(
            listener,
            Server {
                registry: Arc::new(registry),
                auth,
                tls: None,
                limits,
                closed: closed.clone(),
            },
        ));
        Running { addr, closed }
    }

    async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    async fn exchange(mut stream: TcpStream, request: &[u8]) -> String {
        let _ = stream.write_all(request).await;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
            .await
            .expect("server neither answered nor closed");
        String::from_utf8_lossy(&response).into_owned()
    }

    fn counter_registry() -> Registry {
        let mut registry = Registry::with_prefix("cacheprobe");
        let counter: Counter = Default::default();
        counter.inc();
        registry.register("test_things", "things", counter);
        registry
    }

    #[tokio::test]
    async fn serves_metrics_with_auth_and_rejects_oversized_heads() {
        let server = start(
            counter_registry(),
            Some(auth()),
            ConnectionLimits::default(),
        )
        .await;
        let get = |request: &'static [u8]| async move {
            exchange(TcpStream::connect(server.addr).await.unwrap(), request).await
        };
        let response = get(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        assert!(
            response.contains("www-authenticate: Basic realm=\"cacheprobe\""),
            "{response}"
        );
        let response =
            get(b"GET /metrics HTTP/1.1\r\nAuthorization: Basic cHJvbTp3cm9uZw==\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        let response =
            get(b"GET /metrics HTTP/1.1\r\nAuthorization: Basic cHJvbTpzM2NyZXQ=\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.contains("connection: close"), "{response}");
        assert!(
            response.contains("cacheprobe_test_things_total 1"),
            "{response}"
        );
        let response = get(
            b"GET /metrics HTTP/1.1\r\nAuthorization: Basic cHJvbTpzM2NyZXQ=\r\n\
              Accept: application/openmetrics-text\r\n\r\n",
        )
        .await;
        assert!(
            response.contains("content-type: application/openmetrics-text"),
            "{response}"
        );
        assert!(response.ends_with("# EOF\n"), "{response}");
        let response =
            get(b"POST /metrics HTTP/1.1\r\nAuthorization: Basic cHJvbTpzM2NyZXQ=\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 405"), "{response}");
        let response =
            get(b"GET /nope HTTP/1.1\r\nAuthorization: Basic cHJvbTpzM2NyZXQ=\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");

        let mut junk = b"GET /metrics HTTP/1.1\r\nX-Junk: ".to_vec();
        junk.resize(MAX_HEAD_BYTES + 2048, b'a');
        let response = get(junk.leak()).await;
        assert!(response.starts_with("HTTP/1.1 431"), "{response}");
        assert_eq!(server.closed(Closed::HeadTooLarge), 1);

        let response = get(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        assert_eq!(server.closed(Closed::BadRequest), 1);
    }

    #[tokio::test]
    async fn a_half_sent_head_is_closed_at_the_deadline() {
        let server = start(Registry::default(), None, ConnectionLimits::default()).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET /metrics HT").await.unwrap();
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.unwrap();
        let _ = idle.read_to_end(&mut buf).await;
        let waited = started.elapsed();
        assert!(
            waited >= HEAD_TIMEOUT - Duration::from_millis(50)
                && waited <= HEAD_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(server.closed(Closed::HeadTimeout), 2);
    }

    #[tokio::test]
    async fn one_source_cannot_take_every_slot() {
        let limits = ConnectionLimits {
            max_connections: 32,
            max_per_source: 2,
        };
        let server = start(counter_registry(), None, limits).await;
        let _held = [
            connect_from([127, 0, 0, 2], server.addr).await,
            connect_from([127, 0, 0, 2], server.addr).await,
        ];
        let refused = connect_from([127, 0, 0, 2], server.addr).await;
        let response = exchange(refused, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(
            response, "",
            "the third connection from one address is closed unanswered"
        );
        assert_eq!(server.closed(Closed::PerSourceLimit), 1);
        let scraper = connect_from([127, 0, 0, 1], server.addr).await;
        let response = exchange(scraper, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    }

    #[tokio::test]
    async fn at_the_connection_cap_a_waiting_connection_makes_room() {
        let limits = ConnectionLimits {
            max_connections: 4,
            max_per_source: 4,
        };
        let server = start(counter_registry(), None, limits).await;
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(connect_from([127, 0, 0, 2], server.addr).await);
        }
        // Let the server accept them all before the scraper arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let scraper = connect_from([127, 0, 0, 1], server.addr).await;
        let response = exchange(scraper, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert_eq!(server.closed(Closed::Evicted), 1);
        // The oldest idle connection was the one closed.
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), idle[0].read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    }

    /// A collector as slow as encoding a registry at the cardinality ceiling.
    #[derive(Debug)]
    struct SlowCollector;

    impl prometheus_client::collector::Collector for SlowCollector {
        fn encode(
            &self,
            _encoder: prometheus_client::encoding::DescriptorEncoder,
        ) -> Result<(), std::fmt::Error> {
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_source_gets_one_scrape_at_a_time() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SlowCollector));
        let server = start(registry, None, ConnectionLimits::default()).await;
        let first = tokio::spawn(exchange(
            connect_from([127, 0, 0, 2], server.addr).await,
            b"GET /metrics HTTP/1.1\r\n\r\n",
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = exchange(
            connect_from([127, 0, 0, 2], server.addr).await,
            b"GET /metrics HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(second.starts_with("HTTP/1.1 503"), "{second}");
        assert!(second.contains("retry-after: 1"), "{second}");
        let other = exchange(
            connect_from([127, 0, 0, 3], server.addr).await,
            b"GET /metrics HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
        let first = first.await.unwrap();
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert_eq!(server.closed(Closed::ConcurrentScrape), 1);
    }

    /// The agent runs on a current-thread runtime that also drains the ring buffers: a slow
    /// scrape must not stop other tasks from running.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_scrape_does_not_stall_the_event_loop() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SlowCollector));
        let server = start(registry, None, ConnectionLimits::default()).await;

        let ticks = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        let started = std::time::Instant::now();
        let response = exchange(
            TcpStream::connect(server.addr).await.unwrap(),
            b"GET /metrics HTTP/1.1\r\n\r\n",
        )
        .await;
        let elapsed = started.elapsed();
        ticker.abort();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        // Blocking encode would allow at most one tick in 300 ms; off the loop, ~30 happen.
        let ticked = ticks.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            ticked >= 10,
            "event loop ran only {ticked} times during the scrape"
        );
    }
}
