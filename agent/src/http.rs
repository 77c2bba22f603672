//! A deliberately small HTTP/1.1 server for `/metrics`. It reads at most one bounded request per
//! connection, answers and closes, so a slow or hostile scraper can hold at most one slot for at
//! most [`REQUEST_TIMEOUT`], and never more than [`MAX_CONCURRENT`] slots at once. Encoding runs
//! off the event loop, and at most [`MAX_CONCURRENT_SCRAPES`] encoded bodies exist at a time, so
//! a registry at the cardinality ceiling (tens of MB of text) neither stalls the ring buffers nor
//! multiplies memory by the number of scrapers.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use prometheus_client::registry::Registry;

use crate::metrics::Format;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_rustls::{rustls, TlsAcceptor};

const MAX_REQUEST_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONCURRENT: usize = 32;
/// Two: a Prometheus HA pair scraping at the same moment is not kept waiting.
const MAX_CONCURRENT_SCRAPES: usize = 2;

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
    /// Whether the request head carries these credentials.
    pub fn admits(&self, head: &[u8]) -> bool {
        let Some(value) = header(head, "authorization") else {
            return false;
        };
        let Some(encoded) = value
            .strip_prefix("Basic ")
            .or_else(|| value.strip_prefix("basic "))
        else {
            return false;
        };
        let Some(decoded) = base64_decode(encoded.trim()) else {
            return false;
        };
        let expected = format!("{}:{}", self.username, self.password);
        // Compare in constant time so the password cannot be guessed byte by byte.
        decoded.len() == expected.len()
            && decoded
                .iter()
                .zip(expected.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.trim_end_matches('=').as_bytes();
    if bytes.len() > 1024 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let produced = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + produced]);
    }
    Some(out)
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

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    auth: Option<BasicAuth>,
    tls: Option<TlsAcceptor>,
) {
    let auth = Arc::new(auth);
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    let scrapes = Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many concurrent metrics requests, dropping one");
            continue;
        };
        let registry = registry.clone();
        let scrapes = scrapes.clone();
        let auth = auth.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let served = async {
                match &tls {
                    // The handshake counts against the same deadline as the request.
                    Some(acceptor) => {
                        handle(acceptor.accept(stream).await?, &registry, &scrapes, &auth).await
                    }
                    None => handle(stream, &registry, &scrapes, &auth).await,
                }
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, served).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(%peer, %err, "metrics request failed"),
                Err(_) => tracing::debug!(%peer, "metrics request timed out"),
            }
        });
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    Metrics,
    Health,
    NotFound,
    MethodNotAllowed,
    Bad,
}

/// Parses the request head. Pure so it can be tested without sockets.
pub fn route(head: &[u8]) -> Request {
    let Some(line_end) = head.iter().position(|&b| b == b'\n') else {
        return Request::Bad;
    };
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Request::Metrics,
        ("GET" | "HEAD", "/healthz") => Request::Health,
        ("GET" | "HEAD", _) => Request::NotFound,
        _ => Request::MethodNotAllowed,
    }
}

/// Value of a request header (case-insensitive name), if present.
pub fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head)
        .lines()
        .skip(1)
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
}

async fn handle(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    registry: &Arc<Registry>,
    scrapes: &Arc<Semaphore>,
    auth: &Option<BasicAuth>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if head.len() > MAX_REQUEST_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request too large\n",
                true,
            )
            .await;
        }
    }
    if let Some(auth) = auth {
        if !auth.admits(&head) {
            let body = b"authentication required\n";
            let response = format!(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"cacheprobe\"\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(response.as_bytes()).await?;
            stream.write_all(body).await?;
            return stream.shutdown().await;
        }
    }
    let is_head = head.starts_with(b"HEAD ");
    let with_body = !is_head;
    match route(&head) {
        Request::Metrics => {
            let format = Format::from_accept(header(&head, "accept").as_deref());
            // Held until the body is written: it bounds how many bodies exist, not just encodes.
            let Ok(_scrape) = scrapes.clone().acquire_owned().await else {
                return Ok(());
            };
            let registry = registry.clone();
            let encoded =
                tokio::task::spawn_blocking(move || crate::metrics::encode(&registry, format))
                    .await;
            let Ok(Ok(text)) = encoded else {
                return respond(
                    &mut stream,
                    "500 Internal Server Error",
                    "text/plain",
                    b"encoding failed\n",
                    with_body,
                )
                .await;
            };
            respond(
                &mut stream,
                "200 OK",
                format.content_type(),
                text.as_bytes(),
                with_body,
            )
            .await
        }
        Request::Health => respond(&mut stream, "200 OK", "text/plain", b"ok\n", with_body).await,
        Request::NotFound => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                b"try /metrics\n",
                with_body,
            )
            .await
        }
        Request::MethodNotAllowed => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                b"GET only\n",
                true,
            )
            .await
        }
        Request::Bad => {
            respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                b"bad request\n",
                true,
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut (impl AsyncWrite + Unpin),
    status: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    if with_body {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[test]
    fn decodes_base64() {
        assert_eq!(base64_decode("cHJvbTpzM2NyZXQ=").unwrap(), b"prom:s3cret");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert!(base64_decode("Y").is_none());
        assert!(base64_decode("!!!!").is_none());
    }

    #[test]
    fn routes_requests() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Request::Metrics
        );
        assert_eq!(route(b"HEAD /healthz HTTP/1.1\r\n\r\n"), Request::Health);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::MethodNotAllowed
        );
        assert_eq!(route(b"\x16\x03\x01garbage\n"), Request::Bad);
        assert_eq!(route(b"GET"), Request::Bad);
        let head = b"GET /metrics HTTP/1.1\r\nACCEPT: application/openmetrics-text\r\n\r\n";
        assert_eq!(
            header(head, "accept").as_deref(),
            Some("application/openmetrics-text")
        );
        assert_eq!(header(head, "host"), None);
    }

    #[tokio::test]
    async fn serves_metrics_and_rejects_oversized_requests() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::with_prefix("cacheprobe");
        let counter: prometheus_client::metrics::counter::Counter = Default::default();
        counter.inc();
        registry.register("test_things", "things", counter);
        let auth = BasicAuth {
            username: "prom".into(),
            password: "s3cret".into(),
        };
        tokio::spawn(serve(listener, Arc::new(registry), Some(auth), None));

        let get = |request: &'static [u8]| async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        let response = get(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        // base64("prom:wrong")
        let response =
            get(b"GET /metrics HTTP/1.1\r\nAuthorization: Basic cHJvbTp3cm9uZw==\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 401"), "{response}");
        // base64("prom:s3cret")
        let response =
            get(b"GET /metrics HTTP/1.1\r\nAuthorization: Basic cHJvbTpzM2NyZXQ=\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(
            response.contains("cacheprobe_test_things_total 1"),
            "{response}"
        );

        let mut stream = TcpStream::connect(addr).await.unwrap();
        let junk = vec![b'a'; MAX_REQUEST_BYTES + 2048];
        let _ = stream.write_all(&junk).await;
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response).await;
        assert!(response.starts_with("HTTP/1.1 431"), "{response}");
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

    /// The agent runs on a current-thread runtime that also drains the ring buffers: a slow
    /// scrape must not stop other tasks from running.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_scrape_does_not_stall_the_event_loop() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(SlowCollector));
        tokio::spawn(serve(listener, Arc::new(registry), None, None));

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
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
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
