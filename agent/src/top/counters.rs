//! The daemon's own metrics that the history does not keep (open connections, bytes, queue
//! operations, per-process fds), read from the exposition text the control socket returns.
//!
//! Only the handful of families top shows are kept; everything else is skipped by name before
//! its labels are parsed. The text comes from our own encoder, but it crosses a process
//! boundary, so a malformed line is skipped and counted, never trusted.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::Role;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    connections_active: BTreeMap<(String, String, Role), f64>,
    bytes: BTreeMap<(String, String, Role, String), f64>,
    queue_ops: BTreeMap<(String, String, Role, String, String), f64>,
    open_fds: BTreeMap<String, f64>,
    fd_limit: BTreeMap<String, f64>,
    process_connections: BTreeMap<(String, String), f64>,
    fd_errors: BTreeMap<String, f64>,
    /// Lines of a wanted family that could not be parsed.
    pub malformed_lines: u64,
}

const WANTED: [&str; 7] = [
    "cacheprobe_connections_active",
    "cacheprobe_memcache_bytes_total",
    "cacheprobe_queue_operations_total",
    "cacheprobe_process_open_fds",
    "cacheprobe_process_fd_limit",
    "cacheprobe_process_connections",
    "cacheprobe_fd_exhaustion_errors_total",
];

impl Counters {
    /// Parses Prometheus or OpenMetrics text, keeping the families top shows.
    pub fn parse(text: &str) -> Counters {
        let mut counters = Counters::default();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            if !WANTED.contains(&name) {
                continue;
            }
            match parse_sample(&line[name_end..]) {
                Some((labels, value)) if counters.add(name, &labels, value) => {}
                _ => counters.malformed_lines += 1,
            }
        }
        counters
    }

    fn add(&mut self, name: &str, labels: &BTreeMap<String, String>, value: f64) -> bool {
        let get = |key: &str| labels.get(key).cloned();
        let endpoint = || {
            Some((
                get("service")?,
                get("server")?,
                Role::from_label(labels.get("role")?)?,
            ))
        };
        match name {
            "cacheprobe_connections_active" => {
                let Some(key) = endpoint() else { return false };
                self.connections_active.insert(key, value);
            }
            "cacheprobe_memcache_bytes_total" => {
                let Some((service, server, role)) = endpoint() else {
                    return false;
                };
                let Some(direction) = get("direction") else {
                    return false;
                };
                self.bytes.insert((service, server, role, direction), value);
            }
            "cacheprobe_queue_operations_total" => {
                let (Some((service, server, role)), Some(queue), Some(op)) =
                    (endpoint(), get("queue"), get("op"))
                else {
                    return false;
                };
                self.queue_ops
                    .insert((service, server, role, queue, op), value);
            }
            "cacheprobe_process_open_fds" | "cacheprobe_process_fd_limit" => {
                let Some(comm) = get("comm") else {
                    return false;
                };
                let map = if name == "cacheprobe_process_open_fds" {
                    &mut self.open_fds
                } else {
                    &mut self.fd_limit
                };
                map.insert(comm, value);
            }
            "cacheprobe_process_connections" => {
                let (Some(comm), Some(service)) = (get("comm"), get("service")) else {
                    return false;
                };
                self.process_connections.insert((comm, service), value);
            }
            "cacheprobe_fd_exhaustion_errors_total" => {
                let Some(comm) = get("comm") else {
                    return false;
                };
                *self.fd_errors.entry(comm).or_default() += value;
            }
            _ => return false,
        }
        true
    }

    /// Every endpoint the daemon has connection or byte counts for.
    pub fn endpoints(&self) -> BTreeSet<(String, String, Role)> {
        self.connections_active
            .keys()
            .cloned()
            .chain(
                self.bytes
                    .keys()
                    .map(|(service, server, role, _)| (service.clone(), server.clone(), *role)),
            )
            .collect()
    }

    /// Every process name with fd or connection gauges.
    pub fn comms(&self) -> BTreeSet<String> {
        self.open_fds
            .keys()
            .cloned()
            .chain(
                self.process_connections
                    .keys()
                    .map(|(comm, _)| comm.clone()),
            )
            .collect()
    }

    pub fn connections_active(&self, service: &str, server: &str, role: Role) -> Option<u64> {
        self.connections_active
            .get(&(service.to_string(), server.to_string(), role))
            .map(|v| v.max(0.0) as u64)
    }

    pub fn bytes(&self, service: &str, server: &str, role: Role, direction: &str) -> Option<f64> {
        self.bytes
            .get(&(
                service.to_string(),
                server.to_string(),
                role,
                direction.to_string(),
            ))
            .copied()
    }

    /// Every queue with operation counts, per end that counted them.
    pub fn queues(&self) -> BTreeSet<(String, String, Role, String)> {
        self.queue_ops
            .keys()
            .map(|(service, server, role, queue, _)| {
                (service.clone(), server.clone(), *role, queue.clone())
            })
            .collect()
    }

    pub fn queue_ops(
        &self,
        service: &str,
        server: &str,
        role: Role,
        queue: &str,
        op: &str,
    ) -> Option<f64> {
        self.queue_ops
            .get(&(
                service.to_string(),
                server.to_string(),
                role,
                queue.to_string(),
                op.to_string(),
            ))
            .copied()
    }

    /// Open fds and the soft limit of the fullest process of that name.
    pub fn fds(&self, comm: &str) -> Option<(u64, u64)> {
        let open = *self.open_fds.get(comm)?;
        let limit = *self.fd_limit.get(comm)?;
        Some((open.max(0.0) as u64, limit.max(0.0) as u64))
    }

    pub fn process_connections(&self, comm: &str) -> Vec<(String, u64)> {
        self.process_connections
            .iter()
            .filter(|((c, _), _)| c == comm)
            .map(|((_, service), v)| (service.clone(), v.max(0.0) as u64))
            .collect()
    }

    /// EMFILE and ENFILE errors of that process name since the daemon started.
    pub fn fd_errors(&self, comm: &str) -> u64 {
        self.fd_errors.get(comm).map_or(0, |v| v.max(0.0) as u64)
    }
}

/// `{k="v",...} value [timestamp]` (labels optional) into labels and value.
fn parse_sample(rest: &str) -> Option<(BTreeMap<String, String>, f64)> {
    let mut labels = BTreeMap::new();
    let mut chars = rest.char_indices().peekable();
    let mut value_start = 0;
    if rest.starts_with('{') {
        chars.next();
        loop {
            // A label name, '=', a quoted value, then ',' or '}'.
            let mut name = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '=' => break,
                    '}' if name.is_empty() => {
                        value_start = rest.len();
                        break;
                    }
                    c if c.is_ascii_alphanumeric() || c == '_' => name.push(c),
                    ',' | ' ' if name.is_empty() => {}
                    _ => return None,
                }
            }
            if value_start != 0 {
                break;
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                let (_, c) = chars.next()?;
                match c {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(name, value);
            match chars.next()? {
                (_, ',') => {
                    if chars.peek().is_some_and(|(_, c)| *c == '}') {
                        let (at, _) = chars.next()?;
                        value_start = at + 1;
                        break;
                    }
                }
                (at, '}') => {
                    value_start = at + 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    let value = rest[value_start.min(rest.len())..]
        .split_whitespace()
        .next()?;
    let value: f64 = value.parse().ok()?;
    value.is_finite().then_some((labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP cacheprobe_connections_active open connections
# TYPE cacheprobe_connections_active gauge
cacheprobe_connections_active{service="memcached",server="127.0.0.1:11211",role="client"} 4
cacheprobe_connections_active{service="memcached",server="127.0.0.1:11211",role="server"} 4
cacheprobe_memcache_bytes_total{service="memcached",server="127.0.0.1:11211",role="client",direction="sent"} 1000
cacheprobe_memcache_bytes_total{service="memcached",server="127.0.0.1:11211",role="client",direction="received"} 5e3
cacheprobe_queue_operations_total{service="kestrel",server="127.0.0.1:22133",role="server",queue="jobs \"a\"",op="enqueue"} 7
cacheprobe_process_open_fds{comm="php-fpm"} 900
cacheprobe_process_fd_limit{comm="php-fpm"} 1024
cacheprobe_process_connections{comm="php-fpm",service="memcached"} 12
cacheprobe_fd_exhaustion_errors_total{comm="php-fpm",errno="EMFILE"} 3
cacheprobe_fd_exhaustion_errors_total{comm="php-fpm",errno="ENFILE"} 1
cacheprobe_memcache_requests_total{service="memcached",server="x",role="client",command="get",status="hit"} 99
cacheprobe_connections_active{service="memcached",server="broken} 1
cacheprobe_connections_active{service="memcached",server="a",role="moon"} 1
cacheprobe_process_open_fds{comm="x"} NaN
# EOF
"#;

    #[test]
    fn parses_the_families_top_shows() {
        let c = Counters::parse(TEXT);
        let server = "127.0.0.1:11211";
        assert_eq!(
            c.connections_active("memcached", server, Role::Client),
            Some(4)
        );
        assert_eq!(
            c.bytes("memcached", server, Role::Client, "received"),
            Some(5000.0)
        );
        assert_eq!(
            c.queue_ops(
                "kestrel",
                "127.0.0.1:22133",
                Role::Server,
                "jobs \"a\"",
                "enqueue"
            ),
            Some(7.0)
        );
        assert_eq!(c.fds("php-fpm"), Some((900, 1024)));
        assert_eq!(
            c.process_connections("php-fpm"),
            vec![("memcached".to_string(), 12)]
        );
        assert_eq!(c.fd_errors("php-fpm"), 4);
        assert_eq!(c.endpoints().len(), 2);
        assert_eq!(c.comms().into_iter().collect::<Vec<_>>(), ["php-fpm"]);
        // The broken quote, the unknown role and NaN are skipped and counted; families top
        // does not show are not even parsed.
        assert_eq!(c.malformed_lines, 3);
    }

    #[test]
    fn garbage_is_skipped() {
        for text in [
            "cacheprobe_connections_active{",
            "cacheprobe_connections_active{service=\"a\"",
            "cacheprobe_connections_active{service=\"a\\",
            "cacheprobe_connections_active",
            "cacheprobe_connections_active{} x",
            "\u{0}\u{ffff}",
        ] {
            let c = Counters::parse(text);
            assert!(c.endpoints().is_empty(), "{text:?}");
        }
        let no_labels = parse_sample(" 12 1700000000").unwrap();
        assert!(no_labels.0.is_empty());
        assert_eq!(no_labels.1, 12.0);
        let trailing_comma = parse_sample("{a=\"1\",} 2").unwrap();
        assert_eq!(trailing_comma.0["a"], "1");
    }
}
