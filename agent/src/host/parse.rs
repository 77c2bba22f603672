//! Parsers for the /proc text the sampler reads. Pure: text in, values out, so every format quirk
//! is pinned by a fixture copied from a real machine. None of them panic or allocate in proportion
//! to anything but their input.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Kernel TCP state numbers as printed in the `st` column (include/net/tcp_states.h).
pub use agent_common::TcpState;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("bad value for {field}: {value:?}")]
    BadValue { field: &'static str, value: String },
    #[error("TcpExt header has {names} names but {values} values")]
    ColumnMismatch { names: usize, values: usize },
}

fn bad(field: &'static str, value: &str) -> ParseError {
    // Cap the copied text: a corrupt line must not turn into a large error message.
    let value: String = value.chars().take(64).collect();
    ParseError::BadValue { field, value }
}

/// One row of /proc/net/tcp or /proc/net/tcp6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpRow {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    /// For non-listeners: bytes not yet acknowledged by the peer. For listeners the kernel prints
    /// the same expression, which is always 0: /proc does NOT show the accept backlog limit (only
    /// sock_diag does, see `diag`). Verified on Linux 6.18 with a listen(2) socket.
    pub tx_queue: u32,
    /// For LISTEN rows: the current accept-queue length (sk_ack_backlog). Otherwise: bytes
    /// received but not yet read by the application.
    pub rx_queue: u32,
    /// 0 for sockets with no file: TIME_WAIT, request sockets, children still in an accept
    /// queue and orphans closed by their process.
    pub inode: u64,
}

/// Parses one line of a tcp/tcp6 table. Returns `Ok(None)` for the header line.
pub fn parse_tcp_line(line: &str) -> Result<Option<TcpRow>, ParseError> {
    let mut fields = line.split_ascii_whitespace();
    let slot = fields.next().ok_or(ParseError::MissingField("sl"))?;
    if slot == "sl" {
        return Ok(None);
    }
    let local = parse_hex_socket_addr(
        fields
            .next()
            .ok_or(ParseError::MissingField("local_address"))?,
    )?;
    let remote = parse_hex_socket_addr(
        fields
            .next()
            .ok_or(ParseError::MissingField("rem_address"))?,
    )?;
    let state_text = fields.next().ok_or(ParseError::MissingField("st"))?;
    let state = u8::from_str_radix(state_text, 16).map_err(|_| bad("st", state_text))?;
    let queues = fields
        .next()
        .ok_or(ParseError::MissingField("tx_queue:rx_queue"))?;
    let (tx_text, rx_text) = queues
        .split_once(':')
        .ok_or_else(|| bad("tx_queue:rx_queue", queues))?;
    let tx_queue = u32::from_str_radix(tx_text, 16).map_err(|_| bad("tx_queue", tx_text))?;
    let rx_queue = u32::from_str_radix(rx_text, 16).map_err(|_| bad("rx_queue", rx_text))?;
    // tr:tm->when, retrnsmt, uid, timeout precede the inode.
    let inode_text = fields.nth(4).ok_or(ParseError::MissingField("inode"))?;
    let inode = inode_text
        .parse::<u64>()
        .map_err(|_| bad("inode", inode_text))?;
    Ok(Some(TcpRow {
        local,
        remote,
        state,
        tx_queue,
        rx_queue,
        inode,
    }))
}

/// Local and remote port of a tcp/tcp6 row without parsing the rest, to skip unwatched rows
/// cheaply. None for the header and for rows too broken to tell (the full parse reports those).
pub fn tcp_line_ports(line: &str) -> Option<(u16, u16)> {
    let mut fields = line.split_ascii_whitespace().skip(1);
    let port = |field: &str| u16::from_str_radix(field.rsplit_once(':')?.1, 16).ok();
    Some((port(fields.next()?)?, port(fields.next()?)?))
}

/// `0100007F:2BCB` or the 32-hex-digit IPv6 form. The kernel prints each 32-bit word of the
/// network-order address as a host-order integer, so the word's native-endian bytes are the
/// address bytes in memory order.
pub fn parse_hex_socket_addr(text: &str) -> Result<SocketAddr, ParseError> {
    let (ip_text, port_text) = text.split_once(':').ok_or_else(|| bad("address", text))?;
    let port = u16::from_str_radix(port_text, 16).map_err(|_| bad("port", port_text))?;
    let word = |chunk: &str| u32::from_str_radix(chunk, 16).map_err(|_| bad("address", text));
    match ip_text.len() {
        8 => {
            let ip = Ipv4Addr::from(word(ip_text)?.to_ne_bytes());
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        32 if ip_text.is_ascii() => {
            let mut bytes = [0u8; 16];
            for (index, out) in bytes.chunks_exact_mut(4).enumerate() {
                out.copy_from_slice(&word(&ip_text[index * 8..index * 8 + 8])?.to_ne_bytes());
            }
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(bytes),
                port,
                0,
                0,
            )))
        }
        _ => Err(bad("address", text)),
    }
}

/// The TcpExt counters the sampler exports, from /proc/net/netstat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpExtCounters {
    /// SYNs dropped or not answered because an accept queue was full.
    pub listen_overflows: u64,
    /// All SYN/ACK-stage drops on listeners, overflows included.
    pub listen_drops: u64,
    /// SYN cookies sent because a SYN queue was full.
    pub syncookies_sent: u64,
}

/// Parses /proc/net/netstat (pairs of `Prefix: names...` / `Prefix: values...` lines) and picks
/// the TcpExt counters. Only the exact `TcpExt:` prefix counts: `MPTcpExt:` follows it.
pub fn parse_netstat(text: &str) -> Result<TcpExtCounters, ParseError> {
    let table = CounterTable::find(text, "TcpExt:", "TcpExt", "TcpExt values")?;
    Ok(TcpExtCounters {
        listen_overflows: table.get("ListenOverflows")?,
        listen_drops: table.get("ListenDrops")?,
        syncookies_sent: table.get("SyncookiesSent")?,
    })
}

/// One `Prefix: names...` / `Prefix: values...` line pair of /proc/net/netstat or snmp.
struct CounterTable<'a> {
    names: Vec<&'a str>,
    values: Vec<&'a str>,
}

impl<'a> CounterTable<'a> {
    /// The first pair whose lines start with exactly `prefix` (`MPTcpExt:` is not `TcpExt:`).
    fn find(
        text: &'a str,
        prefix: &str,
        table_name: &'static str,
        values_name: &'static str,
    ) -> Result<CounterTable<'a>, ParseError> {
        let mut lines = text.lines();
        while let Some(header) = lines.next() {
            let Some(names) = header.strip_prefix(prefix) else {
                continue;
            };
            let values = lines
                .next()
                .and_then(|line| line.strip_prefix(prefix))
                .ok_or(ParseError::MissingField(values_name))?;
            let names: Vec<&str> = names.split_ascii_whitespace().collect();
            let values: Vec<&str> = values.split_ascii_whitespace().collect();
            if names.len() != values.len() {
                return Err(ParseError::ColumnMismatch {
                    names: names.len(),
                    values: values.len(),
                });
            }
            return Ok(CounterTable { names, values });
        }
        Err(ParseError::MissingField(table_name))
    }

    fn get(&self, field: &'static str) -> Result<u64, ParseError> {
        let index = self
            .names
            .iter()
            .position(|name| *name == field)
            .ok_or(ParseError::MissingField(field))?;
        self.values[index]
            .parse::<u64>()
            .map_err(|_| bad(field, self.values[index]))
    }
}

/// Connection-level TCP counters of one namespace from /proc/net/snmp: any TCP connection
/// opening (actively or passively), failing, being reset or leaving ESTABLISHED/CLOSE_WAIT
/// changes at least one of them, so equal readings mean no connection came or went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TcpConnectionCounters {
    pub active_opens: u64,
    pub passive_opens: u64,
    pub attempt_fails: u64,
    pub estab_resets: u64,
    pub curr_estab: u64,
}

/// Parses the `Tcp:` header/values pair of /proc/net/snmp.
pub fn parse_snmp_tcp(text: &str) -> Result<TcpConnectionCounters, ParseError> {
    let table = CounterTable::find(text, "Tcp:", "Tcp", "Tcp values")?;
    Ok(TcpConnectionCounters {
        active_opens: table.get("ActiveOpens")?,
        passive_opens: table.get("PassiveOpens")?,
        attempt_fails: table.get("AttemptFails")?,
        estab_resets: table.get("EstabResets")?,
        curr_estab: table.get("CurrEstab")?,
    })
}

/// Soft RLIMIT_NOFILE from `/proc/<pid>/limits`. `unlimited` maps to `u64::MAX`, the kernel's
/// RLIM_INFINITY, so ratios against it are ~0 rather than a special case.
pub fn parse_soft_nofile(limits: &str) -> Result<u64, ParseError> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .ok_or(ParseError::MissingField("Max open files"))?;
    let soft = line["Max open files".len()..]
        .split_ascii_whitespace()
        .next()
        .ok_or(ParseError::MissingField("Max open files soft limit"))?;
    if soft == "unlimited" {
        return Ok(u64::MAX);
    }
    soft.parse::<u64>().map_err(|_| bad("Max open files", soft))
}

/// Host-wide file handles from /proc/sys/fs/file-nr: `allocated free max`. `max` is the same
/// value as /proc/sys/fs/file-max, read in the same syscall so both numbers are consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHandles {
    /// Allocated minus free (free is always 0 since Linux 2.6; subtracting keeps old kernels
    /// right).
    pub open: u64,
    pub max: u64,
}

pub fn parse_file_nr(text: &str) -> Result<FileHandles, ParseError> {
    let mut fields = text.split_ascii_whitespace();
    let mut next = |field: &'static str| -> Result<u64, ParseError> {
        let value = fields.next().ok_or(ParseError::MissingField(field))?;
        value.parse::<u64>().map_err(|_| bad(field, value))
    };
    let allocated = next("allocated")?;
    let free = next("free")?;
    let max = next("max")?;
    Ok(FileHandles {
        open: allocated.saturating_sub(free),
        max,
    })
}

/// The inode in a `kind:[inode]` link target, as `/proc/<pid>/ns/net` (`net:[4026531833]`) and
/// `/proc/<pid>/fd/N` (`socket:[34735]`) print them. None for other targets (files, pipes).
pub fn parse_bracket_inode(link: &[u8], kind: &str) -> Option<u64> {
    let rest = link.strip_prefix(kind.as_bytes())?.strip_prefix(b":[")?;
    let digits = rest.strip_suffix(b"]")?;
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `/proc/<pid>/comm` without its newline. The kernel caps it at 15 bytes; the cap here only
/// guards against a corrupt read.
pub fn parse_comm(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = &raw[..raw.len().min(64)];
    String::from_utf8_lossy(raw).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_TCP: &str = include_str!("fixtures/net_tcp.txt");
    const NET_TCP6: &str = include_str!("fixtures/net_tcp6.txt");
    const NET_NETSTAT: &str = include_str!("fixtures/net_netstat.txt");
    const PID_LIMITS: &str = include_str!("fixtures/pid_limits.txt");

    fn rows(text: &str) -> Vec<TcpRow> {
        text.lines()
            .filter_map(|line| parse_tcp_line(line).expect("fixture line parses"))
            .collect()
    }

    #[test]
    fn tcp_table_listener_shows_accept_queue_in_rx_and_zero_tx() {
        // Captured with a listener on 127.0.0.1:11211, listen(2), hit by five connects.
        let rows = rows(NET_TCP);
        assert_eq!(rows.len(), 15);
        let listener = rows
            .iter()
            .find(|row| row.state == TcpState::Listen as u8 && row.local.port() == 11211)
            .expect("listener row");
        assert_eq!(listener.local, "127.0.0.1:11211".parse().unwrap());
        assert_eq!(listener.remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!(listener.rx_queue, 3, "backlog 2 admits max+1 children");
        assert_eq!(
            listener.tx_queue, 0,
            "/proc does not print the backlog limit"
        );
        assert_eq!(listener.inode, 34732);
    }

    #[test]
    fn tcp_table_connection_rows() {
        let rows = rows(NET_TCP);
        let close_wait = rows
            .iter()
            .find(|row| row.state == TcpState::CloseWait as u8)
            .expect("close-wait row");
        assert_eq!(close_wait.local, "127.0.0.1:42186".parse().unwrap());
        assert_eq!(close_wait.remote, "127.0.0.1:11211".parse().unwrap());
        assert_eq!(close_wait.rx_queue, 1, "the unread FIN counts as one byte");
        assert_eq!(close_wait.inode, 34733);
        // Children waiting in the accept queue have no file yet, hence inode 0.
        let queued_child = rows
            .iter()
            .find(|row| row.local.port() == 11211 && row.remote.port() == 0xA4E0)
            .unwrap();
        assert_eq!(
            (queued_child.state, queued_child.inode),
            (TcpState::Established as u8, 0)
        );
        assert!(rows
            .iter()
            .any(|row| row.state == TcpState::TimeWait as u8 && row.inode == 0));
        assert!(rows
            .iter()
            .any(|row| row.state == TcpState::SynRecv as u8 && row.inode == 0));
        assert!(rows
            .iter()
            .any(|row| row.state == TcpState::FinWait2 as u8 && row.inode == 0));
    }

    #[test]
    fn tcp6_table_addresses_including_v4_mapped() {
        let rows = rows(NET_TCP6);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].local, "[::]:22122".parse().unwrap());
        assert_eq!(rows[0].state, TcpState::Listen as u8);
        assert_eq!(rows[1].local, "[::1]:45254".parse().unwrap());
        assert_eq!(rows[1].remote, "[::1]:22122".parse().unwrap());
        assert_eq!(rows[3].local, "[::ffff:127.0.0.1]:22122".parse().unwrap());
        assert_eq!(rows[3].inode, 34784);
    }

    #[test]
    fn port_prefilter_agrees_with_full_parse() {
        for line in NET_TCP.lines().chain(NET_TCP6.lines()) {
            match parse_tcp_line(line).unwrap() {
                Some(row) => assert_eq!(
                    tcp_line_ports(line),
                    Some((row.local.port(), row.remote.port()))
                ),
                None => assert_eq!(tcp_line_ports(line), None, "header: {line}"),
            }
        }
        assert_eq!(tcp_line_ports("0: 0100007F:2BCB"), None);
        assert_eq!(tcp_line_ports(""), None);
    }

    #[test]
    fn tcp_line_errors_are_typed_not_panics() {
        assert_eq!(parse_tcp_line(""), Err(ParseError::MissingField("sl")));
        assert!(matches!(
            parse_tcp_line("0: 0100007F:2BCB"),
            Err(ParseError::MissingField("rem_address"))
        ));
        assert!(matches!(
            parse_tcp_line("0: 0100007Z:2BCB 00000000:0000 0A 0:0 0 0 0 0 1"),
            Err(ParseError::BadValue {
                field: "address",
                ..
            })
        ));
        // Multi-byte characters where hex digits should be must not slice inside a character.
        assert!(parse_hex_socket_addr("éééééééééééééééé:0050").is_err());
        assert!(parse_hex_socket_addr("0100007F").is_err());
        assert!(
            parse_tcp_line("0: 0100007F:2BCB 00000000:0000 0A 00000000:00000000 00:0 0 0 0")
                .is_err()
        );
    }

    #[test]
    fn netstat_picks_tcp_ext_not_mptcp_ext() {
        let counters = parse_netstat(NET_NETSTAT).unwrap();
        assert_eq!(
            counters,
            TcpExtCounters {
                listen_overflows: 9,
                listen_drops: 9,
                syncookies_sent: 0,
            }
        );
        let mptcp_only = NET_NETSTAT
            .lines()
            .filter(|line| line.starts_with("MPTcpExt:"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            parse_netstat(&mptcp_only),
            Err(ParseError::MissingField("TcpExt"))
        );
    }

    #[test]
    fn snmp_tcp_counters_and_errors() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs\n\
            Tcp: 1 200 120000 -1 1094021 1088347 2857 5020 7 251220690\n\
            Udp: InDatagrams\nUdp: 5\n";
        assert_eq!(
            parse_snmp_tcp(text),
            Ok(TcpConnectionCounters {
                active_opens: 1_094_021,
                passive_opens: 1_088_347,
                attempt_fails: 2857,
                estab_resets: 5020,
                curr_estab: 7,
            })
        );
        assert_eq!(
            parse_snmp_tcp("Tcp: ActiveOpens\n"),
            Err(ParseError::MissingField("Tcp values"))
        );
        assert!(matches!(
            parse_snmp_tcp("Tcp: ActiveOpens PassiveOpens\nTcp: 1\n"),
            Err(ParseError::ColumnMismatch { .. })
        ));
        assert_eq!(
            parse_snmp_tcp("Udp: InDatagrams\nUdp: 5\n"),
            Err(ParseError::MissingField("Tcp"))
        );
    }

    #[test]
    fn netstat_rejects_truncated_values() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 2\n";
        assert_eq!(
            parse_netstat(text),
            Err(ParseError::ColumnMismatch {
                names: 3,
                values: 2
            })
        );
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 2 3\n";
        assert_eq!(
            parse_netstat(text).unwrap(),
            TcpExtCounters {
                listen_overflows: 2,
                listen_drops: 3,
                syncookies_sent: 1
            }
        );
        assert_eq!(
            parse_netstat("TcpExt: ListenOverflows\n"),
            Err(ParseError::MissingField("TcpExt values"))
        );
    }

    #[test]
    fn limits_soft_nofile() {
        assert_eq!(parse_soft_nofile(PID_LIMITS).unwrap(), 20000);
        let raised = PID_LIMITS.replace(
            "Max open files            20000                20000",
            "Max open files            1024                 524288",
        );
        assert_eq!(parse_soft_nofile(&raised).unwrap(), 1024);
        assert_eq!(
            parse_soft_nofile("Max open files unlimited unlimited files").unwrap(),
            u64::MAX
        );
        assert!(parse_soft_nofile("Max open files").is_err());
        assert!(parse_soft_nofile("Max cpu time unlimited unlimited seconds").is_err());
    }

    #[test]
    fn file_nr() {
        assert_eq!(
            parse_file_nr("478\t0\t2466170\n").unwrap(),
            FileHandles {
                open: 478,
                max: 2466170
            }
        );
        assert!(parse_file_nr("478\t0").is_err());
        assert!(parse_file_nr("x 0 1").is_err());
    }

    #[test]
    fn bracket_inodes() {
        assert_eq!(
            parse_bracket_inode(b"net:[4026531833]", "net"),
            Some(4026531833)
        );
        assert_eq!(
            parse_bracket_inode(b"socket:[34735]", "socket"),
            Some(34735)
        );
        assert_eq!(parse_bracket_inode(b"pipe:[34735]", "socket"), None);
        assert_eq!(parse_bracket_inode(b"/dev/null", "socket"), None);
        assert_eq!(parse_bracket_inode(b"socket:[]", "socket"), None);
        assert_eq!(
            parse_bracket_inode(b"socket:[99999999999999999999999]", "socket"),
            None
        );
    }

    #[test]
    fn comm_trims_newline_and_survives_bad_utf8() {
        assert_eq!(parse_comm(b"memcached\n"), "memcached");
        assert_eq!(parse_comm(b"a\xffb\n"), "a\u{fffd}b");
    }
}
