//! The servers' own side of a test: their `stats` counters, read the way an operator would.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

/// A memcache-protocol server's answer to `command` (`stats`, `stats slabs`) on 127.0.0.1:`port`,
/// by name; values that are not numbers (version, ...) are left out. The connection is this
/// test process's own: point it at a port the agent does not watch where it must not be counted.
pub fn server_stats(port: u16, command: &str) -> BTreeMap<String, f64> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|err| panic!("stats on port {port}: {err}"));
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    while !data.ends_with(b"END\r\n") {
        let n = conn.read(&mut buf).expect("stats");
        assert!(
            n > 0,
            "the server closed during {command}: {}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&data)
        .lines()
        .filter_map(|l| l.strip_prefix("STAT "))
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}
