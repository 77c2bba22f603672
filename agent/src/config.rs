//! The agent's configuration file: which services to watch and the bounds on everything the agent
//! keeps. Unknown keys and bad values are errors that name the line, so a typo in production
//! config never silently falls back to a default.

use std::{collections::HashSet, net::SocketAddr, path::Path};

use serde::Deserialize;
use toml::Spanned;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/cacheprobe/config.toml";
/// Outside Prometheus' fully allocated 9100-9999 exporter range, as its guide asks.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:19150";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// memcached and twemproxy: text, meta and binary memcache protocol. The default.
    #[default]
    Memcache,
    /// Starling/Kestrel-style queues speaking the memcache protocol (set = enqueue, get = dequeue).
    MemcacheQueue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// One or more ports (several instances on one host); never empty, never shared with
    /// another service.
    pub ports: Vec<u16>,
    pub protocol: Protocol,
    /// Capture and decode payloads (memcache metrics); off keeps only socket-level metrics.
    pub capture: bool,
}

/// Upper bounds on memory and label cardinality. One place owns each bound.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Entries in the kernel socket map: watched sockets tracked at once.
    pub max_sockets: u32,
    /// Kernel-to-agent ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Ring buffer for captured payloads (power of two); only allocated in full when a service
    /// captures.
    pub payload_ring_buffer_bytes: u32,
    /// Distinct `server` label values per service before folding into "other".
    pub max_servers_per_service: usize,
    /// Distinct `comm` (process name) label values before folding into "other".
    pub max_comms: usize,
    /// Frame-header bytes (command and response lines, binary headers with extras and key)
    /// capture may copy from one send/receive; value bodies are skipped by their declared
    /// length and never copied (0 turns capture off, at most 65536). A call with more headers
    /// than this is followed up to it and counted in `events_lost_total{source="capture_incomplete"}`.
    pub capture_bytes: u32,
    /// Captured payload records per second the agent decodes in full; above it capture follows
    /// one healthy connection in 2, 4, ... and request counters are scaled (0 = no limit). A
    /// memcache operation seen from both ends on one host makes four records.
    pub capture_records_per_second: u32,
    /// Decoded requests per second that all feed the hot-key and key-routing statistics;
    /// beyond that one in `key_stats_sample_every` does (with its count scaled).
    pub key_stats_exact_per_second: u32,
    /// Sampling ratio of the key statistics above `key_stats_exact_per_second` (1 = all).
    pub key_stats_sample_every: u32,
    /// /metrics connections one source address may hold at once (of 32 in all), so one
    /// client cannot starve Prometheus.
    pub http_connections_per_source: usize,
    /// Keep per-socket state in socket-local storage where the kernel allows it (tp_btf
    /// send/receive programs: direct loads of the socket's ports and state, and a storage
    /// lookup only for captured or unhealthy connections); false keeps the raw/classic
    /// tracepoints, which read the socket's ports on every call (for side-by-side measurement).
    pub socket_storage: bool,
    /// With no service captured, attach the send/receive programs only while a watched
    /// connection's peer has closed (their only work then): no per-call cost in steady state.
    /// Needs the socket-storage path and a kernel that stamps activity; otherwise ignored.
    /// On by default: a write in the moment before the programs are back is still counted, from
    /// the kernel's sequence numbers (see `conn::tracking`); false keeps them always attached.
    pub socket_probes_on_demand: bool,
    /// Attach every probe as a classic tracepoint (perf_event_open), never through a bpf()
    /// link (tp_btf, raw tracepoints) nor socket-local storage: the path kernels without BTF
    /// take, forced on a kernel that has it, to run and test it there. Costs more per call, and
    /// a Debian kernel at perf_event_paranoid 3 refuses it without CAP_SYS_ADMIN.
    pub classic_tracepoints: bool,
    /// Requests at least this slow (microseconds) carry their request id as an OpenMetrics
    /// exemplar on the latency histogram (0: any request may).
    pub exemplar_min_latency_us: u64,
    /// Exemplars set per second at most, for slow requests and again for the sampled slice
    /// (0 turns them off).
    pub exemplars_per_second: u32,
    /// One request id in this many carries its exemplar whatever its latency, at both ends
    /// alike (0: only slow requests do).
    pub exemplar_sample_one_in: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sockets: 65536,
            ring_buffer_bytes: 4 << 20,
            payload_ring_buffer_bytes: 8 << 20,
            max_servers_per_service: 256,
            max_comms: 100,
            capture_bytes: agent_common::CAPTURE_BUDGET_DEFAULT,
            capture_records_per_second: 25_000,
            key_stats_exact_per_second: crate::keystats::KeySampling::default().exact_per_second,
            key_stats_sample_every: crate::keystats::KeySampling::default().sample_every,
            http_connections_per_source: crate::export::http::admission::ConnectionLimits::default(
            )
            .max_per_source,
            socket_storage: true,
            socket_probes_on_demand: true,
            classic_tracepoints: false,
            exemplar_min_latency_us: crate::export::metrics::EXEMPLAR_MIN_LATENCY_NS / 1_000,
            exemplars_per_second: crate::export::metrics::EXEMPLARS_PER_SECOND,
            exemplar_sample_one_in: crate::export::metrics::EXEMPLAR_SAMPLE_ONE_IN,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub services: Vec<Service>,
    pub limits: Limits,
    /// How keys appear in diagnose output and the local API (never in metrics).
    pub keys: crate::keystats::KeyDisplay,
    /// Seconds between /proc samples (listen queues, fds, existing connections).
    pub sample_interval_seconds: u64,
    /// Require HTTP basic authentication on /metrics.
    pub basic_auth: Option<crate::export::http::BasicAuth>,
    /// Serve /metrics over TLS.
    pub tls: Option<crate::export::http::TlsFiles>,
    /// Detector thresholds for `cacheprobe diagnose` (`[diagnose]` table).
    pub diagnose: crate::diagnose::DiagnoseThresholds,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("default listen address is valid"),
            services: default_services(),
            limits: Limits::default(),
            keys: crate::keystats::KeyDisplay::Plain,
            sample_interval_seconds: 5,
            basic_auth: None,
            tls: None,
            diagnose: crate::diagnose::DiagnoseThresholds::default(),
        }
    }
}

fn default_services() -> Vec<Service> {
    [
        ("memcached", 11211, Protocol::Memcache),
        ("twemproxy", 22121, Protocol::Memcache),
        ("starling", 22122, Protocol::MemcacheQueue),
        ("kestrel", 22133, Protocol::MemcacheQueue),
    ]
    .into_iter()
    .map(|(name, port, protocol)| Service {
        name: name.to_string(),
        ports: vec![port],
        protocol,
        capture: true,
    })
    .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    services: Option<Vec<RawService>>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    keys: crate::keystats::KeyDisplay,
    sample_interval_seconds: Option<u64>,
    basic_auth: Option<crate::export::http::BasicAuth>,
    tls: Option<crate::export::http::TlsFiles>,
    #[serde(default)]
    diagnose: crate::diagnose::DiagnoseThresholds,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    port: Option<Spanned<i64>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default = "default_true")]
    capture: bool,
}

fn default_true() -> bool {
    true
}

impl Config {
    /// Whether any service captures payloads: the send/receive programs copy bytes, and
    /// cannot come off on demand.
    pub fn any_captured(&self) -> bool {
        self.services.iter().any(|service| service.capture)
    }

    /// Loads `path`; a missing file at the default path means defaults, anywhere else it is an
    /// error (an explicit `--config` that does not exist is a mistake worth reporting).
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let origin = Origin { text, path: origin };
        let raw: RawConfig = toml::from_str(text).map_err(|err| {
            let message = match err.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {}", err.message())
                }
                None => err.message().to_string(),
            };
            origin.invalid(message)
        })?;

        let listen = parse_listen(raw.listen, &origin)?;
        let services = match raw.services {
            None => default_services(),
            Some(raw_services) => parse_services(raw_services, &origin)?,
        };

        let sample_interval_seconds = raw.sample_interval_seconds.unwrap_or(5);
        if !(1..=3600).contains(&sample_interval_seconds) {
            return Err(origin.invalid(format!(
                "sample_interval_seconds = {sample_interval_seconds} must be in 1-3600"
            )));
        }
        raw.diagnose
            .validate()
            .map_err(|message| origin.invalid(format!("[diagnose]: {message}")))?;
        let basic_auth = raw.basic_auth;
        if let Some(auth) = &basic_auth {
            if auth.username.is_empty() || auth.password.is_empty() || auth.username.contains(':') {
                return Err(origin.invalid(
                    "basic_auth needs a non-empty username (without ':') and password".to_string(),
                ));
            }
        }
        let limits = raw.limits;
        check_limits(&limits).map_err(|(key, message)| origin.limit(key, message))?;
        Ok(Config {
            listen,
            services,
            limits,
            keys: raw.keys,
            sample_interval_seconds,
            basic_auth,
            tls: raw.tls,
            diagnose: raw.diagnose,
        })
    }

    pub fn service_for_port(&self, port: u16) -> Option<usize> {
        self.services
            .iter()
            .position(|service| service.ports.contains(&port))
    }
}

/// The text being parsed and where it came from, for errors that name the file and line.
struct Origin<'a> {
    text: &'a str,
    path: &'a str,
}

impl Origin<'_> {
    fn invalid(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            message,
        }
    }

    /// An error about `[limits]`'s `key`, named by the line that sets it when the file does.
    fn limit(&self, key: &str, message: String) -> ConfigError {
        let mut in_limits = false;
        for (number, line) in self.text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with('[') {
                in_limits = line.trim_start_matches('[').trim_end_matches(']').trim() == "limits";
                continue;
            }
            let set_here = line
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='));
            if in_limits && set_here {
                return self.invalid(format!("line {}: {message}", number + 1));
            }
        }
        self.invalid(message)
    }

    /// An error about the value at `span`, named by its line.
    fn at(&self, span: std::ops::Range<usize>, message: String) -> ConfigError {
        let line = self.text[..span.start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1;
        self.invalid(format!("line {line}: {message}"))
    }
}

fn parse_listen(raw: Option<Spanned<String>>, origin: &Origin) -> Result<SocketAddr, ConfigError> {
    Ok(match raw {
        None => DEFAULT_LISTEN
            .parse()
            .expect("default listen address is valid"),
        Some(spanned) => {
            let span = spanned.span();
            let value = spanned.into_inner();
            let address: SocketAddr = value.parse().map_err(|_| {
                origin.at(
                    span.clone(),
                    format!("listen = {value:?} is not an address like \"0.0.0.0:19150\""),
                )
            })?;
            // Port 0 would serve on a port the kernel picks and nobody is told.
            if address.port() == 0 {
                return Err(origin.at(
                    span,
                    format!("listen = {value:?}: port 0 is not in 1-65535"),
                ));
            }
            address
        }
    })
}

/// The `[[services]]` entries: names unique, ports unique across services, at least one.
fn parse_services(
    raw_services: Vec<RawService>,
    origin: &Origin,
) -> Result<Vec<Service>, ConfigError> {
    let mut names = HashSet::new();
    let mut ports = HashSet::new();
    let mut services = Vec::with_capacity(raw_services.len());
    for raw_service in raw_services {
        let name_span = raw_service.name.span();
        let name = raw_service.name.into_inner();
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(origin.at(
                name_span,
                format!(
                    "service name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
                ),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(origin.at(name_span, format!("service name {name:?} is used twice")));
        }
        let raw_ports = match (raw_service.port, raw_service.ports) {
            (Some(port), None) => vec![port],
            (None, Some(ports)) if ports.get_ref().is_empty() => {
                return Err(origin.at(ports.span(), format!("service {name:?}: `ports` is empty")));
            }
            (None, Some(ports)) => ports.into_inner(),
            (Some(port), Some(_)) => {
                return Err(origin.at(
                    port.span(),
                    format!("service {name:?} has both `port` and `ports`: give one of them"),
                ));
            }
            (None, None) => {
                return Err(origin.at(
                    name_span,
                    format!("service {name:?} needs a `port` (or `ports = [...]`)"),
                ));
            }
        };
        services.push(Service {
            ports: service_ports(&name, raw_ports, &mut ports, origin)?,
            name,
            protocol: raw_service.protocol,
            capture: raw_service.capture,
        });
    }
    if services.is_empty() {
        return Err(origin.invalid("`services` is empty: nothing to watch".to_string()));
    }
    Ok(services)
}

/// One service's ports: each in 1-65535, listed once, and not watched by an earlier service
/// (`taken` holds their ports and receives these).
fn service_ports(
    name: &str,
    raw_ports: Vec<Spanned<i64>>,
    taken: &mut HashSet<u16>,
    origin: &Origin,
) -> Result<Vec<u16>, ConfigError> {
    let mut service_ports = Vec::with_capacity(raw_ports.len());
    for raw_port in raw_ports {
        let port_span = raw_port.span();
        let port = *raw_port.get_ref();
        let port = u16::try_from(port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| {
                origin.at(port_span.clone(), format!("port {port} is not in 1-65535"))
            })?;
        if service_ports.contains(&port) {
            return Err(origin.at(
                port_span,
                format!("port {port} is listed twice for service {name:?}"),
            ));
        }
        if !taken.insert(port) {
            return Err(origin.at(port_span, format!("port {port} is watched by two services")));
        }
        service_ports.push(port);
    }
    Ok(service_ports)
}

/// The `[limits]` bounds, checked in this order: the key of the first one broken, and what is
/// wrong with it.
fn check_limits(limits: &Limits) -> Result<(), (&'static str, String)> {
    let broken = |key: &'static str, message: String| Err((key, format!("limits.{key}{message}")));
    if limits.max_sockets == 0 || limits.max_sockets > 4_000_000 {
        return broken(
            "max_sockets",
            format!(" = {} must be in 1-4000000", limits.max_sockets),
        );
    }
    for (name, ring) in [
        ("ring_buffer_bytes", limits.ring_buffer_bytes),
        (
            "payload_ring_buffer_bytes",
            limits.payload_ring_buffer_bytes,
        ),
    ] {
        if !ring.is_power_of_two() || !(1 << 16..=1 << 30).contains(&ring) {
            return broken(
                name,
                format!(" = {ring} must be a power of two between 65536 and 1073741824"),
            );
        }
    }
    if limits.capture_bytes > agent_common::CAPTURE_BUDGET_MAX {
        return broken(
            "capture_bytes",
            format!(
                " = {} must be at most {}",
                limits.capture_bytes,
                agent_common::CAPTURE_BUDGET_MAX
            ),
        );
    }
    if limits.key_stats_sample_every == 0 {
        return broken("key_stats_sample_every", " must be at least 1".to_string());
    }
    let max_connections =
        crate::export::http::admission::ConnectionLimits::default().max_connections;
    if !(1..=max_connections).contains(&limits.http_connections_per_source) {
        return broken(
            "http_connections_per_source",
            format!(
                " = {} must be in 1-{max_connections}",
                limits.http_connections_per_source
            ),
        );
    }
    if limits.max_comms == 0 {
        return broken("max_comms", " must be at least 1".to_string());
    }
    if limits.max_servers_per_service == 0 {
        return broken("max_servers_per_service", " must be at least 1".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml")
    }

    #[test]
    fn empty_file_means_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        let ports: Vec<u16> = config
            .services
            .iter()
            .flat_map(|s| s.ports.clone())
            .collect();
        assert_eq!(ports, vec![11211, 22121, 22122, 22133]);
        assert_eq!(config.listen.to_string(), "0.0.0.0:19150");
        assert_eq!(config.services[3].protocol, Protocol::MemcacheQueue);
    }

    #[test]
    fn services_replace_defaults() {
        let config = parse(
            r#"
listen = "127.0.0.1:9999"
[[services]]
name = "cache-a"
port = 11311
protocol = "memcache"

[[services]]
name = "jobs"
port = 22133
protocol = "memcache-queue"
capture = false
"#,
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(config.services.len(), 2);
        assert_eq!(config.service_for_port(22133), Some(1));
        assert!(config.services[0].capture && !config.services[1].capture);
        assert_eq!(config.service_for_port(11211), None);
    }

    #[test]
    fn unknown_key_names_the_line() {
        let err =
            parse("[[services]]\nname = \"a\"\nport = 1\nprotocol = \"memcache\"\nprot = 3\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn bad_protocol_names_the_line() {
        let err = parse("[[services]]\nname = \"a\"\nport = 1\nprotocol = \"redis\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("memcache-queue"), "{err}");
    }

    #[test]
    fn port_out_of_range_names_the_line() {
        let err = parse("\n[[services]]\nname = \"a\"\nport = 70000\nprotocol = \"memcache\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("70000"), "{err}");
    }

    #[test]
    fn duplicate_port_is_rejected() {
        let err = parse(
            "[[services]]\nname = \"a\"\nport = 1\nprotocol = \"memcache\"\n[[services]]\nname = \"b\"\nport = 1\nprotocol = \"memcache\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("line 7") && err.contains("two services"),
            "{err}"
        );
    }

    #[test]
    fn protocol_defaults_to_memcache() {
        let config = parse("[[services]]\nname = \"a\"\nport = 11211\n").unwrap();
        assert_eq!(config.services[0].protocol, Protocol::Memcache);
        assert!(config.services[0].capture);
    }

    #[test]
    fn a_service_can_list_several_ports() {
        let config = parse(
            "[[services]]\nname = \"cache\"\nports = [11211, 11212]\n\
             [[services]]\nname = \"jobs\"\nport = 22133\nprotocol = \"memcache-queue\"\n",
        )
        .unwrap();
        assert_eq!(config.services[0].ports, [11211, 11212]);
        assert_eq!(config.service_for_port(11212), Some(0));
        assert_eq!(config.service_for_port(22133), Some(1));
        let services = crate::services::Services::from_config(&config).unwrap();
        let client = |port: u16| {
            services
                .endpoint(
                    "127.0.0.1:40000".parse().unwrap(),
                    std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                )
                .map(|endpoint| services.name(endpoint.service).unwrap().to_string())
        };
        assert_eq!(client(11211).as_deref(), Some("cache"));
        assert_eq!(client(11212).as_deref(), Some("cache"));
        let sampler = crate::host::SamplerConfig::from_services(&config.services, 10);
        let watched: Vec<(u16, &str)> = sampler
            .watched_ports
            .iter()
            .map(|(port, name)| (*port, name.as_str()))
            .collect();
        assert_eq!(
            watched,
            [(11211, "cache"), (11212, "cache"), (22133, "jobs")]
        );
    }

    #[test]
    fn port_and_ports_mistakes_name_the_line() {
        let cases = [
            // Both.
            ("[[services]]\nname = \"a\"\nport = 1\nports = [2]\n", "line 3", "both"),
            // Neither.
            ("\n[[services]]\nname = \"a\"\nprotocol = \"memcache\"\n", "line 3", "needs a `port`"),
            // Empty list.
            ("[[services]]\nname = \"a\"\nports = []\n", "line 3", "empty"),
            // Twice in one service.
            ("[[services]]\nname = \"a\"\nports = [1, 2,\n 1]\n", "line 4", "listed twice"),
            // Shared with another service.
            (
                "[[services]]\nname = \"a\"\nports = [1, 2]\n[[services]]\nname = \"b\"\nports = [3,\n2]\n",
                "line 7",
                "two services",
            ),
            // Out of range inside the list.
            ("[[services]]\nname = \"a\"\nports = [1, 0]\n", "line 3", "not in 1-65535"),
        ];
        for (text, line, words) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(line) && err.contains(words), "{text:?}: {err}");
        }
    }

    #[test]
    fn bad_listen_and_limits_are_rejected() {
        let err = parse("listen = \"127.0.0.1:0\"\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("port 0"), "{err}");
        let err = parse("listen = \"nowhere\"\n").unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("nowhere"), "{err}");
        let err = parse("[limits]\nring_buffer_bytes = 1000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("power of two"), "{err}");
        // Named by its line in [limits], not by a key of the same name elsewhere.
        let err =
            parse("sample_interval_seconds = 5\n[limits]\nmax_comms = 3\n\n  max_sockets  = 0\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("line 5: limits.max_sockets = 0"), "{err}");
        let err = parse("[limits]\npayload_ring_buffer_bytes = 4096\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("payload_ring_buffer_bytes = 4096") && err.contains("power of two"),
            "{err}"
        );
        let config = parse("[limits]\npayload_ring_buffer_bytes = 2097152\n").unwrap();
        assert_eq!(config.limits.payload_ring_buffer_bytes, 2 << 20);
        for bad in ["0", "33"] {
            let err = parse(&format!("[limits]\nhttp_connections_per_source = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("must be in 1-32"), "{err}");
        }
        let config = parse("[limits]\nhttp_connections_per_source = 2\n").unwrap();
        assert_eq!(config.limits.http_connections_per_source, 2);
        assert_eq!(
            parse("").map(|c| c.limits.http_connections_per_source).ok(),
            Some(8)
        );
    }

    #[test]
    fn diagnose_thresholds_are_configurable_and_checked() {
        let config = parse("[diagnose]\nidle_min_closes = 7\n").unwrap();
        assert_eq!(config.diagnose.idle_min_closes, 7);
        let err = parse("[diagnose]\nidle_min_closez = 7\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("idle_min_closez"),
            "{err}"
        );
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_explicit_file_is_an_error() {
        let path = Path::new("/nonexistent/cacheprobe.toml");
        assert_eq!(Config::load(path, false).unwrap(), Config::default());
        let err = Config::load(path, true).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cacheprobe.toml"), "{err}");
    }
}
