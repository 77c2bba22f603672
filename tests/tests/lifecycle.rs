//! Connection lifecycle against real memcached and real clients, on loopback and across a veth
//! pair between two network namespaces. Runs the release agent binary as root.

use std::{process::Command, time::Duration};

use cacheprobe_tests::*;

// memcached's idle check uses its 1 s coarse clock and closes a client only when idle is
// strictly greater than idle_timeout, after sleeping between scans: with idle_timeout=2 the close
// lands 3-5 s after the last command. Clients that must be closed on sleep 6.5 s.

const WAIT: Duration = Duration::from_secs(10);

/// memcached closes clients idle for 2 s; a pymemcache client sets a key and goes idle.
#[test]
fn idle_timeout_close_on_loopback_is_seen_from_both_sides() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-o", "idle_timeout=2"]).unwrap();
    let agent = Agent::start("idle-loopback", &[("memcached", port, "memcache")]).unwrap();

    python(
        None,
        &format!(
            "from pymemcache.client.base import Client\n\
             import time\n\
             c = Client(('127.0.0.1', {port}))\n\
             c.set('k', 'v', noreply=False)\n\
             assert c.get('k') == b'v'\n\
             time.sleep(6.5)\n\
             c.close()\n"
        ),
    )
    .unwrap();

    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &[]) >= 2.0
    });
    let endpoint = format!("127.0.0.1:{port}");
    let at = |role: &'static str| {
        vec![
            ("service", "memcached"),
            ("role", role),
            ("server", endpoint.as_str()),
        ]
    };
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &at("client")),
        1.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &at("server")),
        1.0,
        "{}",
        scrape.text
    );
    // One connect, one handshake completed at memcached's listener, nothing refused.
    for direction in ["out", "in"] {
        assert_eq!(
            scrape.sum(
                "cacheprobe_syn_total",
                &[("service", "memcached"), ("direction", direction)]
            ),
            1.0,
            "{direction}: {}",
            scrape.text
        );
    }
    let mut peer = at("client");
    peer.push(("closed_by", "peer"));
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &peer),
        1.0,
        "{}",
        scrape.text
    );
    let mut local = at("server");
    local.push(("closed_by", "local"));
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &local),
        1.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &[]),
        2.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_active", &[]),
        0.0,
        "{}",
        scrape.text
    );

    let idle_count = scrape.sum(
        "cacheprobe_connection_idle_before_close_seconds_count",
        &peer,
    );
    let idle_sum = scrape.sum("cacheprobe_connection_idle_before_close_seconds_sum", &peer);
    assert_eq!(idle_count, 1.0, "{}", scrape.text);
    assert!(
        (2.0..10.0).contains(&idle_sum),
        "idle before close {idle_sum} s not in 2..10 s"
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_connection_duration_seconds_count",
            &at("client")
        ),
        1.0
    );
    scrape.assert_probes_up_and_nothing_lost();
    let status = agent.stop().unwrap();
    assert!(status.success(), "agent exit status {status}");
}

/// The same idle close across a veth pair between two namespaces, with python-memcache and
/// three short-lived pymemcache connections that the client closes itself.
#[test]
fn connections_across_network_namespaces_are_attributed_to_the_server_address() {
    require_root();
    let port = unique_port();
    let pair = NetnsPair::create("a", 17).unwrap();
    let _memcached = start_memcached(
        Some(&pair.server_ns),
        &pair.server_addr,
        port,
        &["-o", "idle_timeout=2"],
    )
    .unwrap();
    let agent = Agent::start("netns", &[("cache", port, "memcache")]).unwrap();
    let server_addr = pair.server_addr.clone();
    python(
        Some(&pair.client_ns),
        &format!(
            "import memcache, time\n\
             from pymemcache.client.base import Client\n\
             for i in range(3):\n\
             \x20   c = Client(('{server_addr}', {port}))\n\
             \x20   c.set('k%d' % i, 'v', noreply=False)\n\
             \x20   c.close()\n\
             m = memcache.Client(['{server_addr}:{port}'])\n\
             assert m.set('a', 'b')\n\
             time.sleep(6.5)\n"
        ),
    )
    .unwrap();
    let endpoint = format!("{}:{port}", pair.server_addr);
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &[]) >= 8.0
    });
    let labels = |role: &'static str| {
        vec![
            ("service", "cache"),
            ("server", endpoint.as_str()),
            ("role", role),
        ]
    };
    let with = |role: &'static str, closed_by: &'static str| {
        let mut l = labels(role);
        l.push(("closed_by", closed_by));
        l
    };
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &labels("client")),
        4.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &labels("server")),
        4.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_closed_total",
            &with("client", "local")
        ),
        3.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_closed_total",
            &with("client", "peer")
        ),
        1.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_closed_total",
            &with("server", "peer")
        ),
        3.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_closed_total",
            &with("server", "local")
        ),
        1.0,
        "{}",
        scrape.text
    );
    let idle = scrape.sum(
        "cacheprobe_connection_idle_before_close_seconds_sum",
        &with("client", "peer"),
    );
    assert!(
        (2.0..10.0).contains(&idle),
        "idle before close {idle} s not in 2..10 s"
    );
    // Server-side series are per service endpoint, never per client address or port.
    assert!(
        !scrape.text.contains(&pair.client_addr),
        "client address leaked into labels"
    );
}

/// A connection opened before the agent starts is adopted from the start-up socket dump and its close is
/// counted (but not as opened while watched).
#[test]
fn connection_opened_before_the_agent_is_tracked() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    // Its get comes after the agent started; it closes 1.5 s later.
    let client = EarlyClient::connect(port, "preexisting", "k", Duration::from_millis(1500));

    let agent = Agent::start("preexisting", &[("memcached", port, "memcache")]).unwrap();
    client.release();
    let active = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_active", &[("role", "client")]) >= 1.0
    });
    assert_eq!(
        active.sum("cacheprobe_connections_active", &[("role", "client")]),
        1.0,
        "{}",
        active.text
    );
    client.finish();
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &[("role", "client")]) >= 1.0
    });
    let client_local = [("role", "client"), ("closed_by", "local")];
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &client_local),
        1.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &[("role", "client")]),
        0.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_active", &[("role", "client")]),
        0.0,
        "{}",
        scrape.text
    );
    // Last activity (the get) was ~1.5 s before the close.
    let idle = scrape.sum(
        "cacheprobe_connection_idle_before_close_seconds_sum",
        &client_local,
    );
    assert!((1.0..5.0).contains(&idle), "idle {idle}");
}

/// Dalli (binary protocol, non-blocking connect) and memcached's own text protocol over a raw
/// socket each open exactly one connection.
#[test]
fn each_real_client_opens_exactly_the_connections_it_makes() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let agent = Agent::start("clients", &[("memcached", port, "memcache")]).unwrap();
    let dalli = Command::new("ruby")
        .args([
            "-e",
            &format!(
                "require 'dalli'; c = Dalli::Client.new('127.0.0.1:{port}'); c.set('d', 'v'); raise 'miss' unless c.get('d') == 'v'; c.close"
            ),
        ])
        .output()
        .unwrap();
    assert!(
        dalli.status.success(),
        "dalli: {}",
        String::from_utf8_lossy(&dalli.stderr)
    );
    raw_request(port, r"set raw 0 0 1\r\nx\r\n", r"STORED\r\n").unwrap();
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &[("role", "client")]) >= 2.0
    });
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &[("role", "client")]),
        2.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_closed_total",
            &[("role", "client"), ("closed_by", "local")]
        ),
        2.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &[("role", "server")]),
        2.0,
        "{}",
        scrape.text
    );
}

/// promtool accepts what /metrics serves.
#[test]
fn metrics_pass_promtool_check() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let agent = Agent::start("promtool", &[("memcached", port, "memcache")]).unwrap();
    python(
        None,
        &format!("from pymemcache.client.base import Client\nc = Client(('127.0.0.1', {port}))\nc.get('x')\nc.close()\n"),
    )
    .unwrap();
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &[]) >= 2.0
    });
    assert!(scrape.sum("cacheprobe_connections_closed_total", &[]) >= 2.0);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (package prometheus) is installed by cargo xtask setup");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), scrape.text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
}

/// Every metric in the contract (packaging/metrics.txt) that rules and dashboards rely on is
/// exported by the running agent.
#[test]
fn live_scrape_exports_the_whole_metric_contract() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("contract", &[("memcached", port, "memcache")]).unwrap();
    let scrape = agent.scrape_text().unwrap();
    let dir = scratch_dir("contract");
    let path = dir.join("scrape.txt");
    std::fs::write(&path, &scrape).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let contract = std::fs::read_to_string(root.join("packaging/metrics.txt")).unwrap();
    let names: Vec<&str> = contract
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &names {
        assert!(
            scrape.contains(&format!("# TYPE {name} ")),
            "{name} from packaging/metrics.txt is not exported"
        );
    }
    // And the other way: nothing is exported that the contract (and so the rules' checks and
    // README's table) does not know.
    for exported in scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(
            names.contains(&exported)
                || names.contains(&format!("{exported}_total").as_str())
                || names.contains(&exported.trim_end_matches("_total")),
            "{exported} is exported but not in packaging/metrics.txt"
        );
    }
    let output = Command::new("/usr/bin/python3")
        .arg(root.join("packaging/check-metrics.py"))
        .arg("--exports")
        .arg(&path)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Nothing stays loaded in the kernel after a clean stop or a crash: no pinned programs or maps.
/// A clean stop also removes its control socket (left behind, it reads as a daemon that died).
#[test]
fn no_programs_are_left_behind_after_stop_or_crash() {
    require_root();
    for (name, signal) in [("stop-term", libc::SIGTERM), ("stop-kill", libc::SIGKILL)] {
        let agent = Agent::start(name, &[("memcached", unique_port(), "memcache")]).unwrap();
        let ids = program_ids_of(agent.pid());
        assert!(ids.len() >= 3, "agent holds {ids:?}");
        assert!(ids.iter().all(|id| loaded_program_ids().contains(id)));
        let socket = agent.control_socket.clone();
        assert!(socket.exists(), "{}", socket.display());
        agent.signal(signal);
        let status = agent.wait_exit().unwrap();
        if signal == libc::SIGTERM {
            assert!(status.success(), "{status}");
            assert!(!socket.exists(), "{} left behind", socket.display());
        }
        wait_unloaded(&ids, name, Duration::from_secs(5));
    }
}

/// SIGHUP reloads the config: a new service is watched at once; a bad file is rejected with a
/// log line and the running config kept.
#[test]
fn sighup_reloads_the_config_and_rejects_a_bad_one() {
    require_root();
    let first = unique_port();
    let second = unique_port();
    let agent = Agent::start("reload", &[("first", first, "memcache")]).unwrap();
    let _memcached = start_memcached(None, "127.0.0.1", second, &[]).unwrap();
    let connect = |port: u16| {
        python(
            None,
            &format!("from pymemcache.client.base import Client\nc = Client(('127.0.0.1', {port}))\nc.get('x')\nc.close()\n"),
        )
        .unwrap();
    };
    agent.reload(&format!(
        "sample_interval_seconds = 1\n[[services]]\nname = \"second\"\nport = {second}\nprotocol = \"memcache\"\n"
    ));
    connect(second);
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum(
            "cacheprobe_connections_opened_total",
            &[("service", "second"), ("role", "client")],
        ) >= 1.0
    });
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_opened_total",
            &[("service", "second"), ("role", "client")]
        ),
        1.0,
        "{}",
        scrape.text
    );

    std::fs::write(
        &agent.config_path,
        "[[services]]\nname = \"broken\"\nport = 99999\nprotocol = \"memcache\"\n",
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_log("config reload rejected", 1);
    assert!(agent.log().contains("line 3"), "{}", agent.log());
    connect(second);
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum(
            "cacheprobe_connections_opened_total",
            &[("service", "second"), ("role", "client")],
        ) >= 2.0
    });
    assert_eq!(
        scrape.sum(
            "cacheprobe_connections_opened_total",
            &[("service", "second"), ("role", "client")]
        ),
        2.0,
        "old config kept: {}",
        scrape.text
    );
    let status = agent.stop().unwrap();
    assert!(status.success());
}

/// A bad config is a clear error naming the line, and the agent does not start.
#[test]
fn config_error_is_reported_with_its_line() {
    let dir = scratch_dir("badconfig");
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        "[[services]]\nname = \"memcached\"\nport = 11211\nprotocol = \"memcache\"\ncolour = \"blue\"\n",
    )
    .unwrap();
    let output = Command::new(agent_binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 5"), "{stderr}");
    assert!(stderr.contains("colour"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");

    let output = Command::new(agent_binary())
        .args(["run", "--config", "/nonexistent/cacheprobe.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/cacheprobe.toml"));
}

/// `check` reports every probe working on this kernel, in text and JSON.
#[test]
fn check_reports_every_probe_on_this_kernel() {
    require_root();
    let output = Command::new(agent_binary())
        .args(["check", "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = String::from_utf8_lossy(&output.stdout);
    for probe in [
        "sock/inet_sock_set_state",
        "sock/sock_send_length",
        "sock/sock_recv_length",
    ] {
        assert!(json.contains(&format!("\"tracepoint {probe}\"")), "{json}");
    }
    assert!(
        !json.contains("\"failed\"") && !json.contains("\"missing\""),
        "{json}"
    );
    assert!(json.contains("\"usable\": true"), "{json}");
    // This kernel (6.18) has tp_btf sock_send_length / sock_recv_length and bpf_sk_storage_get
    // for them: the send/receive probes run on the socket-local-storage path (issue 19), whose
    // programs read the socket's ports and state by direct loads first. That text is given
    // only when those programs passed the verifier and are attached: the direct loads need
    // offsets the verifier knows as constants (frozen read-only OFFSETS), and a kernel that
    // refused them would leave the raw path in place, with the verifier's reason.
    assert!(
        json.contains(
            "socket-local storage (tp_btf): each send/receive first reads its socket's ports \
             and state by direct loads, no helper call"
        ),
        "{json}"
    );
    // And the send/receive programs could come off with nothing captured (the activity
    // stamps and write_seq are known); the default config captures, so they stay on.
    assert!(
        json.contains("possible here, but a service is captured"),
        "{json}"
    );
}

/// Whether the program `id` (as the verifier left it: `bpftool prog dump xlated`) can reach an
/// `exit` from its first instruction without passing any call (helper or subprogram), on a
/// path through an instruction whose text contains `through` when given.
fn exit_before_any_call(id: u64, through: Option<&str>) -> bool {
    let output = Command::new("bpftool")
        .args(["-j", "prog", "dump", "xlated", "id", &id.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "bpftool: {output:?}");
    let insns: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // By instruction index: opcode and text, e.g. "(15) if r0 == 0x0 goto pc+1". A 64-bit
    // immediate load (opcode 0x18) takes two slots.
    let mut program = std::collections::BTreeMap::new();
    let mut pc = 0i64;
    for insn in insns.as_array().unwrap() {
        let text = insn["disasm"].as_str().unwrap().to_owned();
        let opcode = u8::from_str_radix(&text[1..3], 16).unwrap();
        let width = if opcode == 0x18 { 2 } else { 1 };
        program.insert(pc, (opcode, text, width));
        pc += width;
    }
    // (instruction, whether the path has passed `through` yet)
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![(0i64, through.is_none())];
    while let Some((pc, passed)) = todo.pop() {
        let Some((opcode, text, width)) = program.get(&pc) else {
            continue;
        };
        if !seen.insert((pc, passed)) {
            continue;
        }
        let passed = passed || through.is_some_and(|through| text.contains(through));
        match opcode {
            0x95 if passed => return true,
            0x95 | 0x85 => continue,
            _ => {}
        }
        let next = pc + width;
        match text.split_once("goto pc") {
            Some((_, offset)) => {
                todo.push((next + offset.trim().parse::<i64>().unwrap(), passed));
                // 0x05 and 0x06 (goto, gotol) always jump; the rest are conditional.
                if *opcode != 0x05 && *opcode != 0x06 {
                    todo.push((next, passed));
                }
            }
            None => todo.push((next, passed)),
        }
    }
    false
}

/// The id of the map named `name` (as the kernel keeps it: 15 bytes at most) among the maps
/// the program `id` uses.
fn map_of_program(id: u64, name: &str) -> Option<u64> {
    let show = |what: &str, id: u64| -> serde_json::Value {
        let output = Command::new("bpftool")
            .args(["-j", what, "show", "id", &id.to_string()])
            .output()
            .unwrap();
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let kept = &name[..name.len().min(15)];
    show("prog", id)["map_ids"]
        .as_array()?
        .iter()
        .filter_map(|map| map.as_u64())
        .find(|&map| show("map", map)["name"] == kept)
}

/// Issue 19: the send/receive programs the agent attached can return without any helper call
/// (the direct loads of the socket's ports and state, and the inlined WATCHED_PORTS lookups,
/// come before any), also after the capture sample's draw (the slot's CAPTURE_SAMPLE_SHIFT
/// entry, the 4-tuple's key by direct loads: a captured call the sample does not follow), and
/// still hold the socket-local storage path for the sockets that need it. The programs are the
/// ones this agent holds, as the verifier rewrote them; the storage path's program of main
/// (5f15550's parent) called `bpf_sk_storage_get` first and fails this, and 84c5043's read the
/// sample only after it.
#[test]
fn the_send_receive_programs_can_return_before_any_helper_call() {
    require_root();
    let port = unique_port();
    let agent = Agent::start("helper-free", &[("cache", port, "memcache")]).unwrap();
    let mut checked = Vec::new();
    for id in program_ids_of(agent.pid()) {
        let output = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let name = info["name"].as_str().unwrap_or_default().to_owned();
        if name != "btf_sock_send_length" && name != "btf_sock_recv_length" {
            continue;
        }
        assert!(
            exit_before_any_call(id, None),
            "{name} (id {id}) calls a helper first"
        );
        let sample = map_of_program(id, "CAPTURE_SAMPLE_SHIFT")
            .unwrap_or_else(|| panic!("{name} (id {id}) reads no CAPTURE_SAMPLE_SHIFT"));
        assert!(
            exit_before_any_call(id, Some(&format!("map[id:{sample}]"))),
            "{name} (id {id}) calls a helper before or after its sample draw"
        );
        let xlated = Command::new("bpftool")
            .args(["prog", "dump", "xlated", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&xlated.stdout).contains("call bpf_sk_storage_get"),
            "{name} lost its storage path"
        );
        checked.push(name);
    }
    checked.sort();
    assert_eq!(
        checked,
        ["btf_sock_recv_length", "btf_sock_send_length"],
        "the agent holds no tp_btf send/receive programs: {}",
        agent.log()
    );
}

/// Makes `perf_event_open` fail with EACCES in the started process, as Debian's
/// `kernel.perf_event_paranoid=3` does to a process without CAP_SYS_ADMIN (the shipped systemd
/// unit). This host's upstream kernel treats 3 like 2, so a seccomp filter stands in for it.
#[cfg(target_arch = "x86_64")]
fn refuse_perf_event_open(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter = [
        // seccomp_data: nr at 0, arch at 4.
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, RET_ALLOW),
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, 0, 1, libc::SYS_perf_event_open as u32),
        op(RET_K, 0, 0, RET_ERRNO | libc::EACCES as u32),
        op(RET_K, 0, 0, RET_ALLOW),
    ];
    // SAFETY: between fork and exec only prctl runs, on a filter that lives in this closure.
    unsafe {
        command.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Issue 22: with `perf_event_open` refused (Debian's perf_event_paranoid=3 under the unit),
/// every probe still attaches, through bpf() links (tp_btf, raw tracepoints), and works:
/// `check` under the same refusal reports every probe ok by a bpf() link, and the agent counts
/// a connection's lifecycle and its requests exactly against memcached's own `stats`.
#[cfg(target_arch = "x86_64")]
#[test]
fn every_probe_attaches_without_perf_event_open() {
    require_root();
    let mut check = Command::new(agent_binary());
    check.args(["check", "--json"]);
    refuse_perf_event_open(&mut check);
    let output = check.output().unwrap();
    let json = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{json} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let tracepoints: Vec<&serde_json::Value> = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["name"].as_str().unwrap().starts_with("tracepoint "))
        .collect();
    assert_eq!(tracepoints.len(), 13, "{json}");
    for item in &tracepoints {
        assert_eq!(item["status"], "ok", "{item}");
        assert!(
            item["detail"].as_str().unwrap().contains("a bpf() link"),
            "{item}"
        );
    }
    assert!(!json.contains("perf_event_paranoid"), "{json}");

    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let config = format!(
        "sample_interval_seconds = 1\n\n[[services]]\nname = \"cache\"\nport = {port}\n\
         protocol = \"memcache\"\n"
    );
    let agent = Agent::start_prepared("no-perf-events", &config, refuse_perf_event_open).unwrap();
    let scrape = agent.wait_for(WAIT, |s| s.text.contains("cacheprobe_probe_up"));
    let probes: Vec<_> = scrape.matching("cacheprobe_probe_up", &[]).collect();
    assert!(probes.len() >= 13, "{}", scrape.text);
    for probe in probes {
        assert_eq!(probe.value, 1.0, "{probe:?}: {}", agent.log());
    }
    let before = server_stats(port, "stats")["cmd_get"];
    python(
        None,
        &format!(
            "from pymemcache.client.base import Client\n\
             c = Client(('127.0.0.1', {port}))\n\
             c.set('k', 'v', noreply=False)\n\
             for i in range(40):\n\
             \x20   c.get('k')\n\
             c.close()\n"
        ),
    )
    .unwrap();
    let gets = server_stats(port, "stats")["cmd_get"] - before;
    assert_eq!(gets, 40.0);
    // Three client connections: two reading `stats`, one doing the gets.
    let client = [("service", "cache"), ("role", "client")];
    let scrape = agent.wait_for(WAIT, |s| {
        s.sum("cacheprobe_connections_closed_total", &client) >= 3.0
            && s.sum(
                "cacheprobe_memcache_requests_total",
                &[("command", "get"), ("role", "client")],
            ) >= gets
    });
    for metric in [
        "cacheprobe_connections_opened_total",
        "cacheprobe_connections_closed_total",
    ] {
        assert_eq!(
            scrape.sum(metric, &client),
            3.0,
            "{metric}: {}",
            scrape.text
        );
    }
    assert_eq!(
        scrape.sum(
            "cacheprobe_memcache_requests_total",
            &[("service", "cache"), ("command", "get"), ("role", "client")]
        ),
        gets,
        "{}",
        scrape.text
    );
}

/// /metrics over TLS with basic auth: the right credentials get metrics, wrong or missing ones
/// a 401, and plain HTTP gets nothing.
#[test]
fn metrics_over_tls_with_basic_auth() {
    require_root();
    let dir = scratch_dir("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let port = unique_port();
    let config = format!(
        "basic_auth = {{ username = \"prom\", password = \"s3cret\" }}\n\
         tls = {{ cert_file = \"{}\", key_file = \"{}\" }}\n\
         [[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n",
        cert.display(),
        key.display()
    );
    // The harness waits for plain-HTTP /metrics; start the agent by hand instead.
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let metrics_port = unique_port();
    let _agent = Guard(
        Command::new(agent_binary())
            .args(["run", "--config"])
            .arg(&config_path)
            .args([
                "--listen",
                &format!("127.0.0.1:{metrics_port}"),
                "--control-socket",
            ])
            .arg(dir.join("control.sock"))
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let url = format!("https://127.0.0.1:{metrics_port}/metrics");
    let curl = |extra: &[&str]| {
        let output = Command::new("curl")
            .args(["-sk", "-o", "-", "-w", "\n%{http_code}", "--max-time", "5"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let mut ok = String::new();
    for _ in 0..100 {
        ok = curl(&["-u", "prom:s3cret"]);
        if ok.ends_with("200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok.ends_with("200") && ok.contains("cacheprobe_build_info"),
        "{ok}"
    );
    assert!(curl(&["-u", "prom:wrong"]).ends_with("401"));
    assert!(curl(&[]).ends_with("401"));
    assert!(
        http_get(metrics_port, "/metrics").is_err(),
        "plain HTTP must not be served"
    );
}

/// Context switches of every thread of process `pid` so far (voluntary and not).
fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|line| line.contains("ctxt_switches:"))
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// An agent with nothing to read sleeps: every wake-up costs tens of µs on a VM, on every host
/// it runs on. Draining quiet rings every 20 ms woke it 62-65 times a second (5.5-6.4 ms of CPU
/// per second); at 100 ms it wakes about 20 times.
#[test]
fn an_idle_agent_wakes_rarely() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let agent = Agent::start("idle-wakeups", &[("memcached", port, "memcache")]).unwrap();
    // Start-up (attach, the first samples, the /metrics polls of Agent::start) is left out.
    std::thread::sleep(Duration::from_secs(2));
    let before = context_switches(agent.pid());
    let seconds = 6;
    std::thread::sleep(Duration::from_secs(seconds));
    let per_second = (context_switches(agent.pid()) - before) / seconds;
    assert!(
        per_second <= 40,
        "the idle agent switched context {per_second} times a second: {}",
        agent.log()
    );
}

/// `check` run by an ordinary user: tracefs is mounted but unreadable to it, which is a matter
/// of running as root, not of mounting it (it said "not mounted: run `mount -t tracefs ...`").
#[test]
fn check_without_root_says_tracefs_is_unreadable_not_unmounted() {
    require_root();
    // A copy nobody can run (the build directory may be closed to it).
    let dir = scratch_dir("check-nonroot");
    let binary = dir.join("cacheprobe");
    std::fs::copy(agent_binary(), &binary).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let output = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&binary)
        .args(["check", "--json"])
        .output()
        .unwrap();
    let json = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|err| panic!("{err}: {json} {}", String::from_utf8_lossy(&output.stderr)));
    let tracefs = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["name"] == "tracefs")
        .unwrap_or_else(|| panic!("no tracefs item: {json}"));
    assert_eq!(tracefs["status"], "missing", "{tracefs}");
    let detail = tracefs["detail"].as_str().unwrap();
    assert!(
        detail.contains("not readable by this user") && !detail.contains("not mounted"),
        "{tracefs}"
    );
    assert_ne!(output.status.code(), Some(0), "{json}");
}

/// `diagnose` and `top` run by an ordinary user against the daemon's root-only control socket:
/// refused, and told to run as root once (they said "needs root" whoever ran them, even root
/// against a daemon that was not there, and repeated the path).
#[test]
fn diagnose_without_root_is_told_to_run_as_root() {
    require_root();
    let agent = Agent::start("diag-nonroot", &[("memcached", unique_port(), "memcache")]).unwrap();
    let dir = scratch_dir("diag-nonroot-bin");
    let binary = dir.join("cacheprobe");
    std::fs::copy(agent_binary(), &binary).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The socket's directory is open to all, the socket itself root's alone (0600).
    let socket_dir = agent.control_socket.parent().unwrap();
    std::fs::set_permissions(socket_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for command in [&["diagnose"][..], &["top", "--batch"][..]] {
        let output = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&binary)
            .args(command)
            .arg("--socket")
            .arg(&agent.control_socket)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_ne!(output.status.code(), Some(0), "{command:?}: {stderr}");
        assert!(
            stderr.contains("Permission denied") && stderr.contains("run as root"),
            "{command:?}: {stderr}"
        );
        assert_eq!(
            stderr
                .matches(&*agent.control_socket.to_string_lossy())
                .count(),
            1,
            "{command:?}: {stderr}"
        );
    }
    // Root, with no daemon at the path: nothing about root.
    let missing = dir.join("absent.sock");
    let output = Command::new(agent_binary())
        .args(["diagnose", "--socket"])
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no cacheprobe daemon at") && !stderr.contains("as root"),
        "{stderr}"
    );
}
