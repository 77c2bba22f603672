//! Exactness against real clients and real memcached: for each client library, what the agent
//! decodes (client and server views) is compared with memcached's own `stats` deltas.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use cacheprobe_tests::*;

/// How long the agent may take to decode what a client did after the client has finished.
const WAIT: Duration = Duration::from_secs(8);

/// Value sizes from empty to 1 MB (memcached runs with `-I 2m` so 1 MB plus the item header
/// fits); keys cycle through them.
const SIZES_PY: &str = "[0, 1, 5, 13, 100, 1000, 4096, 65536, 300000, 1000000]";

/// Values repeat one of these: bytes that look like protocol framing (text replies, a VALUE
/// header, binary magic bytes) inside a value must not be mistaken for frames.
const PATTERNS_PY: &str = "[b'END\\r\\n', b'VALUE x 0 5\\r\\n', b'\\x80\\x81\\x00\\x18', \
                           b'STORED\\r\\n', b'x']";

/// Python that defines `val(i)`: the value of the i-th key.
fn python_values() -> String {
    format!(
        "SIZES = {SIZES_PY}\n\
         PATTERNS = {PATTERNS_PY}\n\
         def val(i):\n\
         \x20   n = SIZES[i % len(SIZES)]\n\
         \x20   p = PATTERNS[i % len(PATTERNS)]\n\
         \x20   return (p * (n // len(p) + 1))[:n]\n"
    )
}

/// The venv `cargo xtask setup` fills with PyPI clients, and the npm clients' directory.
fn client_cache() -> PathBuf {
    PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/cacheprobe")
}

fn pypi_python() -> PathBuf {
    client_cache().join("python/bin/python")
}

fn node_modules() -> PathBuf {
    client_cache().join("node/node_modules")
}

/// Runs a client to completion; a failing client fails the test with its output.
fn run_client(what: &str, command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {what} (run cargo xtask setup): {err}"));
    assert!(
        output.status.success(),
        "{what} failed with {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// memcached with a second listener the agent does not watch, so reading its `stats` adds
/// nothing to what is measured.
struct Memcached {
    port: u16,
    stats_port: u16,
    _guard: Guard,
}

impl Memcached {
    fn start(extra: &[&str]) -> Memcached {
        let port = unique_port();
        let stats_port = unique_port();
        let stats_listener = format!("127.0.0.1:{stats_port}");
        let mut args = vec!["-l", &stats_listener, "-I", "2m"];
        args.extend_from_slice(extra);
        let guard = start_memcached(None, "127.0.0.1", port, &args).unwrap();
        wait_for_port(None, "127.0.0.1", stats_port).unwrap();
        Memcached {
            port,
            stats_port,
            _guard: guard,
        }
    }

    /// memcached's `stats`, read on the listener the agent does not watch.
    fn stats(&self) -> BTreeMap<String, f64> {
        server_stats(self.stats_port, "stats")
    }
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, name: &str) -> f64 {
    after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
}

const GET_FAMILY: &[&str] = &[
    "get",
    "gets",
    "mg",
    "bin_get",
    "bin_getq",
    "bin_getk",
    "bin_getkq",
];
const STORE_FAMILY: &[&str] = &[
    "set",
    "add",
    "replace",
    "append",
    "prepend",
    "cas",
    "ms",
    "bin_set",
    "bin_add",
    "bin_replace",
    "bin_append",
    "bin_prepend",
    "bin_setq",
    "bin_addq",
    "bin_replaceq",
    "bin_appendq",
    "bin_prependq",
];
const DELETE_FAMILY: &[&str] = &["delete", "md", "bin_delete", "bin_deleteq"];
const INCR_FAMILY: &[&str] = &["incr", "bin_incr", "bin_incrq"];
const DECR_FAMILY: &[&str] = &["decr", "bin_decr", "bin_decrq"];
const TOUCH_FAMILY: &[&str] = &["touch", "bin_touch"];

/// Decoded requests of one service and server, by (command, status), for each role.
#[derive(Default, Debug)]
struct View {
    client: BTreeMap<(String, String), f64>,
    server: BTreeMap<(String, String), f64>,
}

impl View {
    fn of(scrape: &Scrape, service: &str, port: u16) -> View {
        let server = format!("127.0.0.1:{port}");
        let mut view = View::default();
        for sample in scrape.matching(
            "cacheprobe_memcache_requests_total",
            &[("service", service), ("server", &server)],
        ) {
            let key = (
                sample.labels["command"].clone(),
                sample.labels["status"].clone(),
            );
            let table = match sample.labels["role"].as_str() {
                "client" => &mut view.client,
                _ => &mut view.server,
            };
            *table.entry(key).or_default() += sample.value;
        }
        view
    }

    fn role(&self, role: &str) -> &BTreeMap<(String, String), f64> {
        if role == "client" {
            &self.client
        } else {
            &self.server
        }
    }

    /// Requests of `commands` with `status` (any status when None).
    fn count(&self, role: &str, commands: &[&str], status: Option<&str>) -> f64 {
        self.role(role)
            .iter()
            .filter(|((command, s), _)| {
                commands.contains(&command.as_str()) && status.is_none_or(|status| s == status)
            })
            .map(|(_, n)| n)
            // An empty f64 sum is -0.0, which would print as "-0".
            .sum::<f64>()
            + 0.0
    }

    fn table(&self) -> String {
        let mut keys: Vec<_> = self.client.keys().chain(self.server.keys()).collect();
        keys.sort();
        keys.dedup();
        let mut out = format!(
            "{:<16} {:<14} {:>10} {:>10}\n",
            "command", "status", "client", "server"
        );
        for key in keys {
            let client = self.client.get(key).copied().unwrap_or(0.0);
            let server = self.server.get(key).copied().unwrap_or(0.0);
            let mark = if client == server {
                ""
            } else {
                "  <-- differs"
            };
            out.push_str(&format!(
                "{:<16} {:<14} {:>10} {:>10}{mark}\n",
                key.0, key.1, client, server
            ));
        }
        out
    }
}

/// One role's count for a memcached stat: decoded with the stat's status, and `noreply`
/// requests of the same commands, whose outcome is on no wire (memcached counts them, nobody
/// else can): exact means `decoded == stat` when there are none, and otherwise
/// `decoded <= stat <= decoded + noreply`.
#[derive(Debug, Clone, Copy)]
struct Decoded {
    decoded: f64,
    noreply: f64,
}

impl Decoded {
    fn matches(&self, expected: f64) -> bool {
        self.decoded == expected
            || (self.noreply > 0.0
                && self.decoded <= expected
                && expected <= self.decoded + self.noreply)
    }
}

/// One check: a memcached stat's delta, and each role's count for it.
type Row = (String, f64, Vec<(String, Decoded)>);

/// What memcached counted, against what each role decoded. One row per check.
struct Comparison {
    rows: Vec<Row>,
}

impl Comparison {
    fn new(
        view: &View,
        before: &BTreeMap<String, f64>,
        after: &BTreeMap<String, f64>,
        roles: &[&str],
    ) -> Comparison {
        let checks: [(&str, f64, &[&str], Option<&str>); 12] = [
            (
                "get_hits",
                delta(before, after, "get_hits"),
                GET_FAMILY,
                Some("hit"),
            ),
            (
                "get_misses",
                delta(before, after, "get_misses"),
                GET_FAMILY,
                Some("miss"),
            ),
            (
                "cmd_set",
                delta(before, after, "cmd_set"),
                STORE_FAMILY,
                None,
            ),
            (
                "delete_hits",
                delta(before, after, "delete_hits"),
                DELETE_FAMILY,
                Some("deleted"),
            ),
            (
                "delete_misses",
                delta(before, after, "delete_misses"),
                DELETE_FAMILY,
                Some("not_found"),
            ),
            (
                "incr_hits+misses",
                delta(before, after, "incr_hits") + delta(before, after, "incr_misses"),
                INCR_FAMILY,
                None,
            ),
            (
                "incr_misses",
                delta(before, after, "incr_misses"),
                INCR_FAMILY,
                Some("not_found"),
            ),
            (
                "decr_hits+misses",
                delta(before, after, "decr_hits") + delta(before, after, "decr_misses"),
                DECR_FAMILY,
                None,
            ),
            (
                "decr_misses",
                delta(before, after, "decr_misses"),
                DECR_FAMILY,
                Some("not_found"),
            ),
            (
                "touch_hits",
                delta(before, after, "touch_hits"),
                TOUCH_FAMILY,
                Some("touched"),
            ),
            (
                "touch_misses",
                delta(before, after, "touch_misses"),
                TOUCH_FAMILY,
                Some("not_found"),
            ),
            (
                "cas_badval",
                delta(before, after, "cas_badval"),
                &["cas"],
                Some("exists"),
            ),
        ];
        // With the binary protocol two stats are no oracle: a CAS mismatch answers KEY_EEXISTS
        // like an add of an existing key, and an incr/decr of a missing key with an initial
        // value creates the counter without counting a hit or a miss in memcached's stats
        // (its reply is a value, like a hit's). Their misses and the per-command agreement of
        // the two views still hold.
        let binary = [&view.client, &view.server]
            .iter()
            .any(|table| table.keys().any(|(command, _)| command.starts_with("bin_")));
        let no_binary_oracle = ["cas_badval", "incr_hits+misses", "decr_hits+misses"];
        Comparison {
            rows: checks
                .iter()
                .filter(|(name, ..)| !(binary && no_binary_oracle.contains(name)))
                .map(|(name, expected, commands, status)| {
                    (
                        name.to_string(),
                        *expected,
                        roles
                            .iter()
                            .map(|role| {
                                let decoded = Decoded {
                                    decoded: view.count(role, commands, *status),
                                    // Only a stat of one outcome can hide in noreply requests.
                                    noreply: match status {
                                        Some(_) => view.count(role, commands, Some("noreply")),
                                        None => 0.0,
                                    },
                                };
                                (role.to_string(), decoded)
                            })
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    fn exact(&self) -> bool {
        self.rows
            .iter()
            .all(|(_, expected, got)| got.iter().all(|(_, n)| n.matches(*expected)))
    }

    fn table(&self) -> String {
        let mut out = format!("{:<18} {:>10}  decoded\n", "memcached stat", "delta");
        for (name, expected, got) in &self.rows {
            let differs = got.iter().any(|(_, n)| !n.matches(*expected));
            let got: Vec<String> = got
                .iter()
                .map(|(role, n)| match n.noreply {
                    0.0 => format!("{role} {}", n.decoded),
                    noreply => format!("{role} {} (+{noreply} noreply)", n.decoded),
                })
                .collect();
            let mark = if differs { "  <-- differs" } else { "" };
            out.push_str(&format!(
                "{name:<18} {expected:>10}  {}{mark}\n",
                got.join(", ")
            ));
        }
        out
    }
}

fn decode_errors(scrape: &Scrape) -> BTreeMap<String, f64> {
    let mut errors = BTreeMap::new();
    for sample in scrape.matching("cacheprobe_memcache_decode_errors_total", &[]) {
        let reason = sample.labels.get("reason").cloned().unwrap_or_default();
        *errors.entry(reason).or_default() += sample.value;
    }
    errors.retain(|_, n| *n > 0.0);
    errors
}

/// An agent that decodes every connection (no decoding budget) of the given services.
fn agent(name: &str, services: &[(&str, u16)]) -> Agent {
    let services: Vec<(&str, u16, &str)> = services
        .iter()
        .map(|(service, port)| (*service, *port, "memcache"))
        .collect();
    let config = services_config(&services) + "[limits]\ncapture_records_per_second = 0\n";
    Agent::start_with_config(name, &config).unwrap()
}

/// Runs `client` against memcached watched by a fresh agent, then asserts the agent's client
/// and server views both equal memcached's stats deltas, agree command by command and status
/// by status, and that nothing failed to decode. `min_requests` guards against a client that
/// did nothing. Prints both tables whatever the outcome, so a run shows its numbers.
fn exact_against_memcached(
    name: &str,
    memcached_args: &[&str],
    min_requests: f64,
    client: impl FnOnce(u16),
) -> Scrape {
    require_root();
    let memcached = Memcached::start(memcached_args);
    let agent = agent(name, &[("memcached", memcached.port)]);
    let before = memcached.stats();
    client(memcached.port);
    let after = memcached.stats();
    let expected_gets = delta(&before, &after, "get_hits") + delta(&before, &after, "get_misses");
    let scrape = agent.wait_for(WAIT, |s| {
        let view = View::of(s, "memcached", memcached.port);
        ["client", "server"]
            .iter()
            .all(|role| view.count(role, GET_FAMILY, None) >= expected_gets)
    });
    // Stragglers (a last reply) may still be in the ring when the get count is reached.
    std::thread::sleep(Duration::from_millis(500));
    let scrape = Scrape::parse(&agent.scrape_text().unwrap_or(scrape.text));
    assert_exact(judge(
        name,
        &scrape,
        "memcached",
        memcached.port,
        &before,
        &after,
        &["client", "server"],
        min_requests,
    ));
    scrape
}

/// Compares one service's decoded view with memcached's stats deltas; prints the tables and
/// returns what failed (empty when exact).
#[allow(clippy::too_many_arguments)]
fn judge(
    name: &str,
    scrape: &Scrape,
    service: &str,
    port: u16,
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    roles: &[&str],
    min_requests: f64,
) -> Vec<String> {
    let view = View::of(scrape, service, port);
    let comparison = Comparison::new(&view, before, after, roles);
    let errors = decode_errors(scrape);
    eprintln!(
        "== {name}: memcached stats vs decoded ({service} 127.0.0.1:{port})\n{}\n\
         == decoded by command and status\n{}\n== decode errors (whole agent): {errors:?}\n",
        comparison.table(),
        view.table()
    );
    let mut failures = Vec::new();
    for role in roles {
        let total = view.role(role).values().sum::<f64>();
        if total < min_requests {
            failures.push(format!(
                "{name}: only {total} requests decoded on the {role} side, the client made at least {min_requests}"
            ));
        }
    }
    if !comparison.exact() {
        failures.push(format!(
            "{name}: decoded counts differ from memcached's stats"
        ));
    }
    if roles.len() == 2 && view.client != view.server {
        failures.push(format!("{name}: client and server views differ"));
    }
    if !errors.is_empty() {
        failures.push(format!("{name}: decode errors {errors:?}"));
    }
    failures
}

/// Fails the test with every failure found (the tables were printed by [`judge`]).
fn assert_exact(failures: Vec<String>) {
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The control: one key per request, small values, no pipelining. What the decoder handled
/// before multi-key and large-value work; if this fails the harness or the basics are broken.
#[test]
fn pymemcache_single_keys_small_values() {
    let _ = exact_against_memcached("x-control", &[], 57.0, |port| {
        let script = format!(
            "from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             for i in range(20):\n\
             \x20   assert c.set('s%d' % i, b'value%d' % i, noreply=False)\n\
             for i in range(30):\n\
             \x20   c.get('s%d' % i)\n\
             c.set('n', b'1', noreply=False)\n\
             assert c.incr('n', 2, noreply=False) == 3 and c.decr('n', 1, noreply=False) == 2\n\
             assert c.touch('n', 100, noreply=False) and not c.touch('gone', 1, noreply=False)\n\
             assert c.delete('n', noreply=False) and not c.delete('n', noreply=False)\n\
             c.close()\n"
        );
        python(None, &script).unwrap();
    });
}

#[test]
fn pymemcache_get_many_set_many_100_keys() {
    // 100 sets, 169 keys in five multi-gets, 20 + 1 gets and 20 other commands.
    let scrape = exact_against_memcached("x-pymemcache", &[], 310.0, |port| {
        let script = format!(
            "{values}\
             from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             keys = ['pk%d' % i for i in range(100)]\n\
             assert not c.set_many({{k: val(i) for i, k in enumerate(keys)}}, noreply=False)\n\
             for n in (1, 2, 10, 37, 100):\n\
             \x20   got = c.get_many(keys[:n] + ['nope%d' % j for j in range(n // 10 + 1)])\n\
             \x20   assert len(got) == n, (n, len(got))\n\
             \x20   assert all(got[k] == val(i) for i, k in enumerate(keys[:n]))\n\
             for i in range(20):\n\
             \x20   assert c.get(keys[i]) == val(i)\n\
             assert c.get('absent') is None\n\
             assert c.add('pk0', b'x', noreply=False) is False\n\
             assert c.add('fresh', b'x', noreply=False) is True\n\
             assert c.replace('fresh', b'END\\r\\n', noreply=False) is True\n\
             assert c.replace('nothere', b'x', noreply=False) is False\n\
             assert c.append('fresh', b'VALUE', noreply=False) is True\n\
             assert c.prepend('fresh', b'\\x80', noreply=False) is True\n\
             value, token = c.gets('fresh')\n\
             assert c.cas('fresh', b'y', token, noreply=False) is True\n\
             assert c.cas('fresh', b'z', token, noreply=False) is False\n\
             assert c.gets_many(['fresh', 'pk1', 'gone'])\n\
             c.set('n', b'10', noreply=False)\n\
             assert c.incr('n', 5, noreply=False) == 15 and c.decr('n', 3, noreply=False) == 12\n\
             assert c.incr('nonum', 1, noreply=False) is None\n\
             assert c.touch('n', 100, noreply=False) and not c.touch('gone', 1, noreply=False)\n\
             assert c.delete('n', noreply=False) and not c.delete('n', noreply=False)\n\
             c.close()\n",
            values = python_values()
        );
        python(None, &script).unwrap();
    });
    // Sizes from the same traffic, both views: 26 `get` requests naming 190 keys (five
    // multi-gets of n + n/10 + 1 keys, 21 single gets); 101 `set` values (100 of val(i), the
    // `n` counter) and 170 get hits.
    // SIZES_PY cycles over the 100 keys: ten of each size.
    let expected_value_bytes = 10.0 * (1.0 + 5.0 + 13.0 + 100.0 + 1000.0 + 4096.0 + 65536.0)
        + 10.0 * (300_000.0 + 1_000_000.0);
    for role in ["client", "server"] {
        let labels = |command| [("role", role), ("command", command)];
        let keys = |suffix: &str| {
            scrape.sum(
                &format!("cacheprobe_memcache_keys_per_request_{suffix}"),
                &labels("get"),
            )
        };
        assert_eq!((keys("count"), keys("sum")), (26.0, 190.0), "{role}");
        let values = |command, suffix: &str| {
            scrape.sum(
                &format!("cacheprobe_memcache_value_size_bytes_{suffix}"),
                &labels(command),
            )
        };
        assert_eq!(values("set", "count"), 101.0, "{role}");
        assert_eq!(values("set", "sum"), expected_value_bytes + 2.0, "{role}");
        assert_eq!(values("get", "count"), 170.0, "{role}");
    }
}

/// Bulk calls as real clients make them: pymemcache's set_many of 1000 keys (1000 sets in
/// flight at once), get_many lines of 300 40-byte keys (12 KB, past memcached's own 2 KiB line
/// buffer), half of them misses, and dalli's get_multi of 500 keys (500 quiet binary gets and
/// a noop in flight). The decoder kept 128 requests and 2 KiB lines: most of each batch, and
/// every miss, were lost.
#[test]
fn bulk_calls_of_hundreds_of_keys() {
    exact_against_memcached("x-bulk", &[], 3000.0, |port| {
        let script = format!(
            "from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             assert not c.set_many({{'bulk%04d' % i: b'v%d' % i for i in range(1000)}}, noreply=False)\n\
             keys = ['%040d' % i for i in range(300)]\n\
             assert not c.set_many({{k: b'x' for k in keys[::2]}}, noreply=False)\n\
             for _ in range(3):\n\
             \x20   assert len(c.get_many(keys)) == 150\n\
             c.close()\n"
        );
        python(None, &script).unwrap();
        let script = format!(
            "require 'dalli'\n\
             c = Dalli::Client.new('127.0.0.1:{port}', compress: false)\n\
             keys = (0...500).map {{ |i| \"dalli#{{i}}\" }}\n\
             keys.first(300).each {{ |k| c.set(k, 'v', nil, raw: true) }}\n\
             2.times {{ raise 'get_multi' unless c.get_multi(*keys).size == 300 }}\n\
             c.close\n"
        );
        run_client("dalli", Command::new("ruby").args(["-e", &script]));
    });
}

/// A get_many of 2,000 keys is one 38 KB line, past the 16 KiB the kernel and the decoder
/// used to follow: the keys past it went unread, the client-side ratio read 100% hits with
/// half of them missing. Lines up to 64 KiB (what one call's capture copies) decode whole.
#[test]
fn get_many_of_2000_keys_in_one_38_kb_line() {
    exact_against_memcached("x-bigline", &[], 3000.0, |port| {
        let script = format!(
            "from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             keys = ['bigbatchkey_%06d' % i for i in range(2000)]\n\
             assert not c.set_many({{k: b'hi' for k in keys[::2]}}, noreply=False)\n\
             assert len(c.get_many(keys)) == 1000\n\
             c.close()\n"
        );
        python(None, &script).unwrap();
    });
}

/// pymemcache's `set_many` of 2,500 keys with 100-byte values: one `set ... noreply` per key,
/// 370 KB in one send, past the 64 KiB of headers the kernel follows per call. The server
/// side reads it in small calls and counts every set; the client side counts the sets it read
/// and the unread rest as `unknown` (the set the cut went through and one for the rest), so
/// nothing vanishes unseen.
#[test]
fn set_many_past_the_capture_budget_counts_its_unread_rest() {
    require_root();
    let memcached = Memcached::start(&[]);
    let agent = agent("x-setmany", &[("memcached", memcached.port)]);
    let before = memcached.stats();
    let port = memcached.port;
    let script = format!(
        "from pymemcache.client.base import Client\n\
         c = Client(('127.0.0.1', {port}))\n\
         c.set_many({{'setmanykey_%06d' % i: b'v' * 100 for i in range(2500)}})\n\
         c.version()\n\
         c.close()\n"
    );
    python(None, &script).unwrap();
    let after = memcached.stats();
    let sets = delta(&before, &after, "cmd_set");
    assert_eq!(sets, 2500.0);
    let scrape = agent.wait_for(WAIT, |s| {
        let view = View::of(s, "memcached", port);
        view.count("server", &["set"], None) >= sets
            && view.count("client", &["version"], None) >= 1.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let scrape = Scrape::parse(&agent.scrape_text().unwrap_or(scrape.text));
    let view = View::of(&scrape, "memcached", port);
    eprintln!("{}", view.table());
    assert_eq!(view.count("server", &["set"], Some("noreply")), sets);
    let read = view.count("client", &["set"], Some("noreply"));
    let unread = view.count("client", &["set"], Some("unknown"));
    // 64 KiB of headers of ~53 bytes a set.
    assert!(read > 1200.0 && read < sets, "{read} read");
    assert!((1.0..=2.0).contains(&unread), "{unread} unknown");
}

#[test]
fn python_memcache_get_multi_set_multi() {
    // 100 sets, 174 keys in four multi-gets, 10 + 1 gets and 8 other commands.
    exact_against_memcached("x-pymc", &[], 293.0, |port| {
        let script = format!(
            "{values}\
             import memcache\n\
             m = memcache.Client(['127.0.0.1:{port}'], server_max_value_length=2 * 1024 * 1024)\n\
             keys = ['mk%d' % i for i in range(100)]\n\
             assert m.set_multi({{k: val(i) for i, k in enumerate(keys)}}) == []\n\
             for n in (1, 3, 50, 100):\n\
             \x20   got = m.get_multi(keys[:n] + ['nope%d' % j for j in range(5)])\n\
             \x20   assert len(got) == n, (n, len(got))\n\
             for i in range(10):\n\
             \x20   assert m.get(keys[i]) == val(i)\n\
             assert m.get('absent') is None\n\
             assert m.add('fresh', 'x') and not m.add('fresh', 'x')\n\
             assert m.set('n', '1') and m.incr('n') == 2 and m.decr('n') == 1\n\
             assert m.delete('n') and m.delete_multi(['mk0', 'mk1'])\n\
             m.disconnect_all()\n",
            values = python_values()
        );
        python(None, &script).unwrap();
    });
}

#[test]
fn bmemcached_binary_protocol() {
    // 100 sets, 144 keys in four multi-gets, 10 + 1 gets and 8 other commands (plus the
    // multi-commands' noops).
    exact_against_memcached("x-bmemcached", &[], 263.0, |port| {
        let script = format!(
            "{values}\
             import bmemcached\n\
             c = bmemcached.Client(('127.0.0.1:{port}',))\n\
             keys = ['bk%d' % i for i in range(100)]\n\
             assert not c.set_multi({{k: val(i) for i, k in enumerate(keys)}})\n\
             for n in (1, 2, 25, 100):\n\
             \x20   got = c.get_multi(keys[:n] + ['nope%d' % j for j in range(4)])\n\
             \x20   assert len(got) == n, (n, len(got))\n\
             for i in range(10):\n\
             \x20   assert c.get(keys[i]) == val(i)\n\
             assert c.get('absent') is None\n\
             assert c.add('fresh', b'x') and not c.add('fresh', b'x')\n\
             assert c.replace('fresh', b'END\\r\\n')\n\
             c.set('n', 10)\n\
             assert c.incr('n', 5) == 15 and c.decr('n', 3) == 12\n\
             # bmemcached reports a delete of a missing key as success too.\n\
             assert c.delete('n')\n\
             c.delete('n')\n\
             c.disconnect_all()\n",
            values = python_values()
        );
        run_client(
            "bmemcached",
            Command::new(pypi_python()).args(["-c", &script]),
        );
    });
}

#[test]
fn dalli_binary_multi_get() {
    exact_against_memcached("x-dalli", &[], 250.0, |port| {
        let script = format!(
            "require 'dalli'\n\
             SIZES = {SIZES_PY}\n\
             PATTERNS = [\"END\\r\\n\", \"VALUE x 0 5\\r\\n\", \"\\x80\\x81\\x00\\x18\".b, \"STORED\\r\\n\", 'x']\n\
             def val(i)\n\
             \x20 n = SIZES[i % SIZES.size]; p = PATTERNS[i % PATTERNS.size].b\n\
             \x20 (p * (n / p.bytesize + 1)).byteslice(0, n)\n\
             end\n\
             c = Dalli::Client.new('127.0.0.1:{port}', compress: false, value_max_bytes: 2 * 1024 * 1024)\n\
             keys = (0...100).map {{ |i| \"dk#{{i}}\" }}\n\
             keys.each_with_index {{ |k, i| c.set(k, val(i), nil, raw: true) }}\n\
             [1, 2, 20, 100].each do |n|\n\
             \x20 got = c.get_multi(*(keys.first(n) + (0...3).map {{ |j| \"nope#{{j}}\" }}))\n\
             \x20 raise \"#{{n}}: #{{got.size}}\" unless got.size == n\n\
             end\n\
             10.times {{ |i| raise 'get' unless c.get(keys[i], raw: true) == val(i) }}\n\
             raise 'absent' unless c.get('absent').nil?\n\
             raise 'add' unless c.add('fresh', 'x', nil, raw: true)\n\
             c.set('n', '10', nil, raw: true)\n\
             raise 'incr' unless c.incr('n', 5) == 15 && c.decr('n', 3) == 12\n\
             raise 'delete' unless c.delete('n')\n\
             c.close\n"
        );
        run_client("dalli", Command::new("ruby").args(["-e", &script]));
    });
}

/// A node script's common part: `val(i)` as a Buffer.
fn node_values() -> String {
    format!(
        "const SIZES = {SIZES_PY};\n\
         const PATTERNS = [Buffer.from('END\\r\\n'), Buffer.from('VALUE x 0 5\\r\\n'), \
         Buffer.from([0x80, 0x81, 0x00, 0x18]), Buffer.from('STORED\\r\\n'), Buffer.from('x')];\n\
         function val(i) {{\n\
         \x20 const n = SIZES[i % SIZES.length], p = PATTERNS[i % PATTERNS.length];\n\
         \x20 return Buffer.concat(Array(Math.floor(n / p.length) + 1).fill(p)).subarray(0, n);\n\
         }}\n\
         function check(ok, what) {{ if (!ok) {{ throw new Error(what); }} }}\n"
    )
}

fn run_node(what: &str, script: &str) {
    run_client(
        what,
        Command::new("node")
            .env("NODE_PATH", node_modules())
            .args(["-e", script]),
    );
}

/// memjs has no multi-get: concurrent gets, which it pipelines on its one connection.
#[test]
fn memjs_binary() {
    exact_against_memcached("x-memjs", &[], 250.0, |port| {
        let script = format!(
            "{values}\
             const memjs = require('memjs');\n\
             const c = memjs.Client.create('127.0.0.1:{port}', {{ retries: 0, logger: {{ log() {{}} }} }});\n\
             (async () => {{\n\
             \x20 const keys = [...Array(100).keys()].map(i => 'jk' + i);\n\
             \x20 for (let i = 0; i < 100; i++) {{ check(await c.set(keys[i], val(i), {{}}), 'set'); }}\n\
             \x20 for (const n of [1, 2, 30, 100]) {{\n\
             \x20   const got = await Promise.all(keys.slice(0, n).concat(['nope1', 'nope2']).map(k => c.get(k)));\n\
             \x20   check(got.filter(r => r.value !== null).length === n, 'gets ' + n);\n\
             \x20 }}\n\
             \x20 for (let i = 0; i < 10; i++) {{ check((await c.get(keys[i])).value.equals(val(i)), 'get'); }}\n\
             \x20 check((await c.get('absent')).value === null, 'absent');\n\
             \x20 check(await c.add('fresh', 'x', {{}}), 'add');\n\
             \x20 await c.set('n', '10', {{}});\n\
             \x20 check((await c.increment('n', 5, {{}})).value === 15, 'incr');\n\
             \x20 check((await c.decrement('n', 3, {{}})).value === 12, 'decr');\n\
             \x20 check(await c.delete('n'), 'delete');\n\
             \x20 c.close();\n\
             }})().catch(e => {{ console.error(e); process.exit(1); }});\n",
            values = node_values()
        );
        run_node("memjs", &script);
    });
}

#[test]
fn node_memcached_text() {
    exact_against_memcached("x-nodemc", &[], 250.0, |port| {
        let script = format!(
            "{values}\
             const Memcached = require('memcached');\n\
             const util = require('util');\n\
             const c = new Memcached('127.0.0.1:{port}', {{ maxValue: 2 * 1024 * 1024, retries: 0 }});\n\
             const p = name => util.promisify(c[name].bind(c));\n\
             (async () => {{\n\
             \x20 const keys = [...Array(100).keys()].map(i => 'nk' + i);\n\
             \x20 for (let i = 0; i < 100; i++) {{ await p('set')(keys[i], val(i), 0); }}\n\
             \x20 for (const n of [1, 2, 40, 100]) {{\n\
             \x20   const got = await p('getMulti')(keys.slice(0, n).concat(['nope1', 'nope2']));\n\
             \x20   check(Object.keys(got).length === n, 'getMulti ' + n + ': ' + Object.keys(got).length);\n\
             \x20 }}\n\
             \x20 for (let i = 0; i < 10; i++) {{ check((await p('get')(keys[i])) !== undefined, 'get'); }}\n\
             \x20 check((await p('get')('absent')) === undefined, 'absent');\n\
             \x20 await p('add')('fresh', 'x', 0);\n\
             \x20 await p('set')('n', '10', 0);\n\
             \x20 check((await p('incr')('n', 5)) === 15, 'incr');\n\
             \x20 check((await p('decr')('n', 3)) === 12, 'decr');\n\
             \x20 await p('del')('n');\n\
             \x20 c.end();\n\
             }})().catch(e => {{ console.error(e); process.exit(1); }});\n",
            values = node_values()
        );
        run_node("node memcached", &script);
    });
}

#[test]
fn memccapable_ascii() {
    exact_against_memcached("x-capable-a", &[], 100.0, |port| {
        run_client(
            "memccapable -a",
            Command::new("memccapable").args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-a",
                "-t",
                "5",
            ]),
        );
    });
}

#[test]
fn memccapable_binary() {
    exact_against_memcached("x-capable-b", &[], 100.0, |port| {
        run_client(
            "memccapable -b",
            Command::new("memccapable").args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-b",
                "-t",
                "5",
            ]),
        );
    });
}

#[test]
fn memcaslap_short_run_with_multi_gets() {
    exact_against_memcached("x-memcaslap", &[], 1000.0, |port| {
        run_client(
            "memcaslap",
            Command::new("timeout").args([
                "60",
                "memcaslap",
                "-s",
                &format!("127.0.0.1:{port}"),
                "-T",
                "1",
                "-c",
                "4",
                "-x",
                "3000",
                "-d",
                "10",
                "-X",
                "200",
            ]),
        );
    });
}

/// 100 requests in one write: sets, then gets (hits and misses), then deletes, read back in one
/// go.
#[test]
fn pipeline_of_100_requests_in_one_write() {
    exact_against_memcached("x-pipeline", &[], 100.0, |port| {
        let script = format!(
            "import socket\n\
             s = socket.create_connection(('127.0.0.1', {port}))\n\
             reqs = []\n\
             for i in range(40):\n\
             \x20   v = b'v%d' % i\n\
             \x20   reqs.append(b'set p%d 0 0 %d\\r\\n%s\\r\\n' % (i, len(v), v))\n\
             for i in range(50):\n\
             \x20   reqs.append(b'get p%d\\r\\n' % i)\n\
             for i in range(10):\n\
             \x20   reqs.append(b'delete p%d\\r\\n' % (i * 5))\n\
             assert len(reqs) == 100\n\
             s.sendall(b''.join(reqs))\n\
             expect = b'STORED\\r\\n' * 40 + b''.join(\n\
             \x20   (b'VALUE p%d 0 %d\\r\\nv%d\\r\\nEND\\r\\n' % (i, len(b'v%d' % i), i)) if i < 40 else b'END\\r\\n'\n\
             \x20   for i in range(50)) + b'DELETED\\r\\n' * 8 + b'NOT_FOUND\\r\\n' * 2\n\
             data = b''\n\
             while len(data) < len(expect):\n\
             \x20   chunk = s.recv(65536)\n\
             \x20   assert chunk\n\
             \x20   data += chunk\n\
             assert data == expect, data\n\
             s.close()\n"
        );
        python(None, &script).unwrap();
    });
}

/// twemproxy between the client and memcached: the agent watches the proxy's port and
/// memcached's. The application's view of the proxy (client role) and the proxy's own view
/// (server role) agree, and the proxy's requests to memcached equal memcached's stats.
#[test]
fn twemproxy_in_the_middle() {
    require_root();
    let memcached = Memcached::start(&[]);
    let proxy = unique_port();
    let agent = agent(
        "x-twemproxy",
        &[("memcached", memcached.port), ("twemproxy", proxy)],
    );
    let dir = scratch_dir("x-nutcracker");
    let conf = dir.join("nutcracker.yml");
    std::fs::write(
        &conf,
        format!(
            "pool:\n  listen: 127.0.0.1:{proxy}\n  hash: fnv1a_64\n  distribution: ketama\n  \
             timeout: 2000\n  servers:\n   - 127.0.0.1:{}:1\n",
            memcached.port
        ),
    )
    .unwrap();
    let _nutcracker = start_nutcracker(&conf, proxy).unwrap();
    let before = memcached.stats();
    python(
        None,
        &format!(
            "{values}\
             from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {proxy}))\n\
             keys = ['tk%d' % i for i in range(100)]\n\
             for i, k in enumerate(keys):\n\
             \x20   assert c.set(k, val(i), noreply=False)\n\
             for n in (1, 10, 100):\n\
             \x20   got = c.get_many(keys[:n] + ['nope%d' % j for j in range(3)])\n\
             \x20   assert len(got) == n, (n, len(got))\n\
             for i in range(10):\n\
             \x20   assert c.get(keys[i]) == val(i)\n\
             assert c.delete('tk0', noreply=False) and not c.delete('tk0', noreply=False)\n\
             c.close()\n",
            values = python_values()
        ),
    )
    .unwrap();
    let after = memcached.stats();
    let expected_gets = delta(&before, &after, "get_hits") + delta(&before, &after, "get_misses");
    agent.wait_for(WAIT, |s| {
        View::of(s, "memcached", memcached.port).count("server", GET_FAMILY, None) >= expected_gets
    });
    std::thread::sleep(Duration::from_millis(500));
    let scrape = agent.scrape();
    // The backend hop: nutcracker (client role) and memcached (server role) against the stats.
    let mut failures = judge(
        "twemproxy backend hop",
        &scrape,
        "memcached",
        memcached.port,
        &before,
        &after,
        &["client", "server"],
        200.0,
    );
    // The proxy hop: nutcracker answers what memcached answered it, so the same stats hold
    // for the application's view and the proxy's.
    failures.extend(judge(
        "twemproxy front hop",
        &scrape,
        "twemproxy",
        proxy,
        &before,
        &after,
        &["client", "server"],
        200.0,
    ));
    assert_exact(failures);
}
