//! Unit tests of the offset resolution: BTF answers, fallbacks and what is reported missing.

use super::super::btf::test_blobs::{sock_common_blob, sock_common_into, BlobBuilder};
use super::*;
use std::collections::HashMap;
use std::sync::OnceLock;

fn fixture_dir(kernel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kernel)
}

/// Expected inet_sock_set_state offsets: identical on 6.1, 6.12 and 6.18.
fn assert_set_state_offsets(offsets: &ProbeOffsets) {
    assert_eq!(offsets.set_state.tuple.skaddr, 8);
    assert_eq!(offsets.set_state.oldstate, 16);
    assert_eq!(offsets.set_state.newstate, 20);
    assert_eq!(offsets.set_state.tuple.sport, 24);
    assert_eq!(offsets.set_state.tuple.dport, 26);
    assert_eq!(offsets.set_state.tuple.family, 28);
    assert_eq!(offsets.set_state.protocol, 30);
    assert_eq!(offsets.set_state.tuple.saddr, 32);
    assert_eq!(offsets.set_state.tuple.daddr, 36);
    assert_eq!(offsets.set_state.tuple.saddr_v6, 40);
    assert_eq!(offsets.set_state.tuple.daddr_v6, 56);
}

/// Fixture format files plus whichever BTF the test supplies.
struct Fixture {
    layout: SystemLayout,
    btf: Option<Btf>,
}

impl Fixture {
    fn new(kernel: &str, btf: Option<Btf>) -> Fixture {
        Fixture {
            layout: SystemLayout::from_paths(&fixture_dir(kernel), None),
            btf,
        }
    }
}

impl LayoutSource for Fixture {
    fn format(&self, category: &str, event: &str) -> Option<String> {
        self.layout.format(category, event)
    }
    fn btf(&self) -> Option<&Btf> {
        self.btf.as_ref()
    }
}

fn real_6_1_btf() -> Btf {
    static PARSED: OnceLock<Btf> = OnceLock::new();
    PARSED
        .get_or_init(|| {
            use std::io::Read as _;
            let mut raw = Vec::new();
            let file =
                std::fs::File::open(fixture_dir("kernel-6.1").join("btf-vmlinux.gz")).unwrap();
            flate2::read::GzDecoder::new(file)
                .read_to_end(&mut raw)
                .unwrap();
            Btf::parse(&raw).unwrap()
        })
        .clone()
}

#[test]
fn kernel_6_18_fixture_without_btf() {
    let resolution = resolve_offsets(&Fixture::new("kernel-6.18", None));
    let offsets = resolution.offsets;
    assert_set_state_offsets(&offsets);
    assert_eq!(
        (
            offsets.length.sk,
            offsets.length.family,
            offsets.length.protocol,
            offsets.length.ret
        ),
        (8, 16, 18, 20)
    );
    assert_eq!(offsets.sock_common.num, OFFSET_UNKNOWN);
    assert_eq!(
        resolution.missing,
        vec![MissingFeature {
            subject: "kernel BTF".into(),
            reason: "kernel BTF not found: sockets opened before the agent started are only \
                         seen when they change state"
                .into(),
        }]
    );
}

#[test]
fn kernel_6_1_fixture_with_its_real_btf() {
    let resolution = resolve_offsets(&Fixture::new("kernel-6.1", Some(real_6_1_btf())));
    let offsets = resolution.offsets;
    assert_set_state_offsets(&offsets);
    assert_eq!(
        (
            offsets.length.sk,
            offsets.length.family,
            offsets.length.protocol,
            offsets.length.ret
        ),
        (
            OFFSET_UNKNOWN,
            OFFSET_UNKNOWN,
            OFFSET_UNKNOWN,
            OFFSET_UNKNOWN
        )
    );
    assert_eq!(
        (
            offsets.sock_common.daddr,
            offsets.sock_common.rcv_saddr,
            offsets.sock_common.dport,
            offsets.sock_common.num
        ),
        (0, 4, 12, 14)
    );
    assert_eq!(
        (
            offsets.sock_common.family,
            offsets.sock_common.state,
            offsets.sock_common.v6_daddr,
            offsets.sock_common.v6_rcv_saddr
        ),
        (16, 18, 56, 72)
    );
    assert!(offsets.can_learn_sockets());
    // Read at state changes: the only last activity (idle before close) and the only way a
    // dead-socket write is seen here.
    assert_ne!(offsets.tcp_write_seq, OFFSET_UNKNOWN);
    assert_ne!(offsets.tcp_lsndtime, OFFSET_UNKNOWN);
    assert_ne!(offsets.tcp_lrcvtime, OFFSET_UNKNOWN);
    let reasons: Vec<&str> = resolution
        .missing
        .iter()
        .map(|m| m.reason.as_str())
        .collect();
    assert_eq!(
        reasons,
        [
            "tracepoint sock/sock_send_length not present (needs Linux 6.4+): last-activity \
                 stamps and byte counts unavailable",
            "tracepoint sock/sock_recv_length not present (needs Linux 6.4+): last-activity \
                 stamps and byte counts unavailable",
        ]
    );
}

/// Debian's 6.1 (the paranoid=3 kernel without send/receive tracepoints): every probe with a
/// bpf()-link variant can take it, so none needs perf_event_open.
#[test]
fn real_6_1_btf_confirms_every_bpf_link_program() {
    let resolution = resolve_offsets(&Fixture::new("kernel-6.1", Some(real_6_1_btf())));
    for (event, ready) in &resolution.links {
        assert_eq!(ready, &Ok(()), "{event}");
    }
    assert_eq!(resolution.links.len(), LINK_TRACEPOINTS.len());
    assert_eq!(resolution.offsets.sk_protocol, 516);
    for offset in [
        resolution.offsets.inet_sport,
        resolution.offsets.skb_head,
        resolution.offsets.skb_network_header,
        resolution.offsets.skb_transport_header,
    ] {
        assert_ne!(offset, OFFSET_UNKNOWN);
    }
    // Capture's syscall registers are resolved only with the send/receive tracepoints;
    // the fd program's syscall number does not depend on them.
    assert_eq!(resolution.offsets.syscall_regs.number, OFFSET_UNKNOWN);
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        resolution.offsets.fd_syscalls.numbers,
        [41, 43, 288, 2, 257, 32]
    );
    assert_ne!(resolution.offsets.fd_syscalls.number, OFFSET_UNKNOWN);
}

#[test]
fn without_btf_every_probe_keeps_its_classic_tracepoint_and_says_why() {
    let resolution = resolve_offsets(&Fixture::new("kernel-6.18", None));
    for (event, ready) in &resolution.links {
        assert_eq!(ready, &Err("no kernel BTF".to_owned()), "{event}");
    }
    assert_eq!(resolution.offsets.sk_protocol, OFFSET_UNKNOWN);
    assert!(!resolution.offsets.fd_syscalls.is_known());
}

/// 6.12's BTF is not stored; 6.1's stands in (bpftool recorded the same sock_common
/// offsets for both), so everything resolves.
#[test]
fn kernel_6_12_fixture_resolves_fully() {
    let resolution = resolve_offsets(&Fixture::new("kernel-6.12", Some(real_6_1_btf())));
    assert_set_state_offsets(&resolution.offsets);
    assert_eq!(resolution.offsets.length.ret, 20);
    // 6.1's BTF predates sock_send_length, so it cannot vouch for the raw tracepoint
    // arguments: the classic tracepoints serve. tcp_sock's activity stamps are there.
    assert_eq!(
        reasons(&resolution),
        [RAW_UNDESCRIBED],
        "{:?}",
        resolution.missing
    );
    assert_eq!(resolution.offsets.sock_protocol, OFFSET_UNKNOWN);
    assert_ne!(resolution.offsets.tcp_lsndtime, OFFSET_UNKNOWN);
    assert_ne!(resolution.offsets.tcp_lrcvtime, OFFSET_UNKNOWN);
}

const RAW_UNDESCRIBED: &str = "kernel BTF does not describe the arguments of \
        sock_send_length: sends and receives are followed through the classic tracepoints, \
        which cost more per call";
const NO_TCP_ACTIVITY: &str = "kernel BTF has no 4-byte tcp_sock lsndtime and \
        icsk_ack.lrcvtime: last activity is stamped on every send and receive instead, which \
        costs more per call (without send/receive tracepoints, idle before close counts from \
        the open)";

const NO_PT_REGS: &str = "kernel BTF has no struct pt_regs with an 8-byte orig_ax, si and dx on \
        this architecture: payloads are not captured: memcache decoding is unavailable";

/// BTF that describes the raw tracepoints, `sock.sk_protocol` and the tcp_sock activity
/// stamps (nested in `inet_conn.icsk_ack`) resolves all of them.
#[test]
fn btf_with_raw_tracepoint_arguments_and_tcp_activity() {
    use super::super::btf::{kind, test_blobs::M};
    let mut blob = BlobBuilder::new(false);
    sock_common_into(&mut blob, true);
    let int = blob.int("int", 4);
    let u16_type = blob.int("u16", 2);
    let u32_type = blob.int("u32", 4);
    let sock = blob.composite(
        kind::STRUCT,
        "sock",
        600,
        false,
        &[M("sk_protocol", u16_type, 516 * 8, 0)],
    );
    let sock_ptr = blob.refers(kind::PTR, "", sock);
    let void_ptr = blob.refers(kind::PTR, "", 0);
    let proto = blob.with_elements(
        kind::FUNC_PROTO,
        "",
        0,
        &[&[0, void_ptr], &[0, sock_ptr], &[0, int], &[0, int]],
    );
    let proto_ptr = blob.refers(kind::PTR, "", proto);
    blob.refers(kind::TYPEDEF, "btf_trace_sock_send_length", proto_ptr);
    blob.refers(kind::TYPEDEF, "btf_trace_sock_recv_length", proto_ptr);
    let ack = blob.composite(
        kind::STRUCT,
        "",
        16,
        false,
        &[M("lrcvtime", u32_type, 32, 0)],
    );
    let icsk = blob.composite(
        kind::STRUCT,
        "inet_connection_sock",
        1200,
        false,
        &[M("icsk_ack", ack, 1000 * 8, 0)],
    );
    blob.composite(
        kind::STRUCT,
        "tcp_sock",
        2000,
        false,
        &[
            M("inet_conn", icsk, 0, 0),
            M("lsndtime", u32_type, 1500 * 8, 0),
            M("copied_seq", u32_type, 1508 * 8, 0),
            M("write_seq", u32_type, 1600 * 8, 0),
        ],
    );
    pt_regs_into(&mut blob);
    let source = Synthetic {
        btf: Some(Btf::parse(&blob.build()).unwrap()),
        ..synthetic_6_18()
    };
    let resolution = resolve_offsets(&source);
    assert!(resolution.missing.is_empty(), "{:?}", resolution.missing);
    assert_eq!(resolution.offsets.sock_protocol, 516);
    assert_eq!(resolution.offsets.tcp_lsndtime, 1500);
    assert_eq!(resolution.offsets.tcp_lrcvtime, 1004);
    assert_eq!(resolution.offsets.tcp_write_seq, 1600);
    assert_eq!(resolution.offsets.tcp_copied_seq, 1508);
    assert_eq!(resolution.offsets.syscall_regs, host_syscall_regs());
}

/// x86-64's `struct pt_regs` as far as capture reads it (si at 104, orig_ax at 120).
fn pt_regs_into(blob: &mut BlobBuilder) {
    use super::super::btf::{kind, test_blobs::M};
    let ulong = blob.int("long unsigned int", 8);
    blob.composite(
        kind::STRUCT,
        "pt_regs",
        168,
        false,
        &[
            M("dx", ulong, 96 * 8, 0),
            M("si", ulong, 104 * 8, 0),
            M("orig_ax", ulong, 120 * 8, 0),
        ],
    );
}

/// What [`pt_regs_into`] resolves to on the architecture the tests run on.
fn host_syscall_regs() -> agent_common::SyscallRegs {
    let mut regs = ProbeOffsets::UNKNOWN.syscall_regs;
    if cfg!(target_arch = "x86_64") {
        regs.number = 120;
        regs.second_arg = 104;
        regs.third_arg = 96;
        regs.numbers = [0, 1, 19, 20, 45, 44, 47, 46];
    }
    regs
}

/// Without the registers' layout capture is reported lost; everything else still resolves.
#[test]
fn btf_without_pt_regs_costs_only_capture() {
    let source = Synthetic {
        btf: Some(Btf::parse(&sock_common_blob(false)).unwrap()),
        ..synthetic_6_18()
    };
    let resolution = resolve_offsets(&source);
    assert_eq!(
        resolution.offsets.syscall_regs,
        ProbeOffsets::UNKNOWN.syscall_regs
    );
    assert!(resolution.offsets.can_learn_sockets());
    let pt_regs: Vec<_> = resolution
        .missing
        .iter()
        .filter(|m| m.subject == "struct pt_regs")
        .collect();
    assert_eq!(pt_regs.len(), 1, "{:?}", resolution.missing);
    assert!(
        pt_regs[0].reason.ends_with(CAPTURE_LOST),
        "{}",
        pt_regs[0].reason
    );
}

/// Formats held in memory, to exercise the rules the fixtures never break.
#[derive(Default)]
struct Synthetic {
    formats: HashMap<(&'static str, &'static str), String>,
    btf: Option<Btf>,
    tracefs_problem: Option<String>,
    btf_problem: Option<String>,
}

impl LayoutSource for Synthetic {
    fn format(&self, category: &str, event: &str) -> Option<String> {
        self.formats
            .iter()
            .find(|((c, e), _)| *c == category && *e == event)
            .map(|(_, text)| text.clone())
    }
    fn btf(&self) -> Option<&Btf> {
        self.btf.as_ref()
    }
    fn tracefs_problem(&self) -> Option<String> {
        self.tracefs_problem.clone()
    }
    fn btf_problem(&self) -> Option<String> {
        self.btf_problem.clone()
    }
}

fn fixture_text(kernel: &str, event: &str) -> String {
    fixture_event(kernel, "sock", event)
}

fn fixture_event(kernel: &str, category: &str, event: &str) -> String {
    std::fs::read_to_string(
        fixture_dir(kernel)
            .join(category)
            .join(event)
            .join("format"),
    )
    .unwrap()
}

fn synthetic_6_18() -> Synthetic {
    let mut source = Synthetic::default();
    for event in [
        "inet_sock_set_state",
        "sock_send_length",
        "sock_recv_length",
    ] {
        source
            .formats
            .insert(("sock", event), fixture_text("kernel-6.18", event));
    }
    // The tcp and syscall tracepoints are present and whole, so tests see only the problems
    // they set up.
    for (category, event) in [
        ("tcp", "tcp_retransmit_skb"),
        ("tcp", "tcp_retransmit_synack"),
        ("tcp", "tcp_receive_reset"),
        ("tcp", "tcp_send_reset"),
        ("syscalls", "sys_exit_socket"),
    ] {
        source.formats.insert(
            (category, event),
            fixture_event("kernel-6.18", category, event),
        );
    }
    source
}

fn reasons(resolution: &Resolution) -> Vec<String> {
    resolution
        .missing
        .iter()
        .map(|m| m.reason.clone())
        .collect()
}

#[test]
fn field_with_unexpected_size_is_missing_and_named() {
    let mut source = synthetic_6_18();
    let text = fixture_text("kernel-6.18", "inet_sock_set_state").replace(
        "field:__u16 sport;\toffset:24;\tsize:2;",
        "field:__u32 sport;\toffset:24;\tsize:4;",
    );
    source.formats.insert(("sock", "inet_sock_set_state"), text);
    let resolution = resolve_offsets(&source);
    assert_eq!(resolution.offsets.set_state.tuple.sport, OFFSET_UNKNOWN);
    assert_eq!(resolution.offsets.set_state.tuple.dport, 26);
    assert_eq!(
        resolution.missing[0].subject,
        "tracepoint sock/inet_sock_set_state field sport"
    );
    assert_eq!(
        resolution.missing[0].reason,
        "tracepoint sock/inet_sock_set_state field sport has size 4, expected 2; treated as \
             missing: connection lifecycle (opened/closed, closed_by, durations) unavailable"
    );
}

#[test]
fn absent_field_and_oversized_offset_are_reported() {
    let mut source = synthetic_6_18();
    let text = fixture_text("kernel-6.18", "inet_sock_set_state")
        .replace(
            "field:__u8 daddr_v6[16];\toffset:56;",
            "field:__u8 daddr_v6[16];\toffset:70000;",
        )
        .replace("field:__u8 saddr[4];", "field:__u8 srcaddr[4];");
    source.formats.insert(("sock", "inet_sock_set_state"), text);
    let resolution = resolve_offsets(&source);
    assert_eq!(resolution.offsets.set_state.tuple.saddr, OFFSET_UNKNOWN);
    assert_eq!(resolution.offsets.set_state.tuple.daddr_v6, OFFSET_UNKNOWN);
    assert_eq!(resolution.offsets.set_state.tuple.saddr_v6, 40);
    let found = reasons(&resolution);
    assert!(
        found[0].starts_with(
            "tracepoint sock/inet_sock_set_state has no field saddr: state changes of IPv4"
        ),
        "{found:?}"
    );
    assert!(
        found[1]
            .contains("field daddr_v6 is at offset 70000, beyond what the programs can address"),
        "{found:?}"
    );
    // u16::MAX itself is the "unknown" sentinel and must not be stored as an offset.
    let mut source = synthetic_6_18();
    let text =
        fixture_text("kernel-6.18", "sock_send_length").replace("offset:20;", "offset:65535;");
    source.formats.insert(("sock", "sock_send_length"), text);
    source.formats.remove(&("sock", "sock_recv_length"));
    let resolution = resolve_offsets(&source);
    assert_eq!(resolution.offsets.length.ret, OFFSET_UNKNOWN);
    assert!(reasons(&resolution)
        .iter()
        .any(|r| r.contains("field ret is at offset 65535")));
}

#[test]
fn unreadable_format_file_is_reported_with_the_parse_error() {
    let mut source = synthetic_6_18();
    source.formats.insert(
        ("sock", "inet_sock_set_state"),
        "name: inet_sock_set_state\nformat:\n".into(),
    );
    let resolution = resolve_offsets(&source);
    assert_eq!(resolution.offsets.set_state.tuple.skaddr, OFFSET_UNKNOWN);
    assert_eq!(
        reasons(&resolution)[0],
        "tracepoint sock/inet_sock_set_state has an unreadable format file (no `ID:` line): \
             connection lifecycle (opened/closed, closed_by, durations) unavailable"
    );
}

#[test]
fn send_and_recv_layouts_must_agree() {
    let mut source = synthetic_6_18();
    let recv = fixture_text("kernel-6.18", "sock_recv_length").replace("offset:20;", "offset:24;");
    source.formats.insert(("sock", "sock_recv_length"), recv);
    let resolution = resolve_offsets(&source);
    assert_eq!(resolution.offsets.length.sk, OFFSET_UNKNOWN);
    assert_eq!(resolution.offsets.length.ret, OFFSET_UNKNOWN);
    assert_eq!(resolution.missing.len(), 2, "{:?}", resolution.missing);
    assert!(resolution.missing[0]
        .reason
        .contains("have different layouts"));
    // Only one of the pair present: its layout is used, the other is reported.
    let mut source = synthetic_6_18();
    source.formats.remove(&("sock", "sock_send_length"));
    let resolution = resolve_offsets(&source);
    assert_eq!(resolution.offsets.length.ret, 20);
    assert!(reasons(&resolution)[0].starts_with("tracepoint sock/sock_send_length not present"));
}

#[test]
fn tcp_tuples_are_read_in_either_form_and_sys_exit_ret_is_found() {
    let old = resolve_offsets(&Fixture::new("kernel-6.1", None)).offsets;
    assert_eq!(old.send_reset.sport, 28);
    assert_eq!(old.send_reset.saddr_v6, 42);
    assert_eq!(old.send_reset.sockaddr_src, OFFSET_UNKNOWN);
    assert_eq!(old.send_reset.state, 24);
    assert_eq!(old.receive_reset.state, OFFSET_UNKNOWN);
    assert_eq!(old.receive_reset.skaddr, 8);
    assert_eq!(old.sys_exit_ret, 16);

    let new = resolve_offsets(&Fixture::new("kernel-6.18", None)).offsets;
    assert_eq!(new.send_reset.sockaddr_src, 32);
    assert_eq!(new.send_reset.sockaddr_dst, 60);
    assert_eq!(new.send_reset.sport, OFFSET_UNKNOWN);
    assert!(new.send_reset.has_ports());
    assert_eq!(new.retransmit_skb.state, 24);
    assert_eq!(new.retransmit_skb.sport, 28);
    assert_eq!(new.retransmit_synack.dport, 26);
    assert_eq!(new.sys_exit_ret, 16);
}

#[test]
fn tracefs_and_btf_problems_replace_the_generic_reasons() {
    let source = Synthetic {
        tracefs_problem: Some("tracefs not found at /x".into()),
        btf_problem: Some("/sys/kernel/btf/vmlinux: BTF version 2 is not supported".into()),
        ..Synthetic::default()
    };
    let resolution = resolve_offsets(&source);
    assert_eq!(resolution.offsets, ProbeOffsets::UNKNOWN);
    let reasons = reasons(&resolution);
    assert_eq!(reasons.len(), 9, "{reasons:#?}");
    assert!(
        reasons[4].contains("tcp/tcp_retransmit_synack cannot be read (tracefs not found at /x)")
    );
    assert_eq!(
        reasons[0],
        "tracepoint sock/inet_sock_set_state cannot be read (tracefs not found at /x): \
             connection lifecycle (opened/closed, closed_by, durations) unavailable"
    );
    assert_eq!(
        reasons[8],
        "kernel BTF unreadable (/sys/kernel/btf/vmlinux: BTF version 2 is not supported): \
             sockets opened before the agent started are only seen when they change state"
    );
}

#[test]
fn btf_without_ipv6_members() {
    let mut blob = BlobBuilder::new(false);
    sock_common_into(&mut blob, false);
    let source = Synthetic {
        btf: Some(Btf::parse(&blob.build()).unwrap()),
        ..synthetic_6_18()
    };
    let resolution = resolve_offsets(&source);
    assert!(resolution.offsets.can_learn_sockets());
    assert_eq!(resolution.offsets.sock_common.v6_daddr, OFFSET_UNKNOWN);
    assert_eq!(resolution.offsets.sock_common.state, 18);
    assert_eq!(
        reasons(&resolution),
        [
            "struct sock_common has no member skc_v6_daddr: IPv6 sockets opened before the \
                 agent started are only seen when they change state",
            "struct sock_common has no member skc_v6_rcv_saddr: IPv6 sockets opened before the \
                 agent started are only seen when they change state",
            RAW_UNDESCRIBED,
            NO_TCP_ACTIVITY,
            TCP_SEQUENCE_LOST,
            NO_PT_REGS,
        ]
    );
}

#[test]
fn btf_without_sock_common() {
    let empty_btf = {
        let mut raw = vec![0x9f, 0xeb, 1, 0];
        raw.extend_from_slice(&24u32.to_le_bytes());
        raw.extend_from_slice(&[0; 12]);
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.push(0);
        Btf::parse(&raw).unwrap()
    };
    let source = Synthetic {
        btf: Some(empty_btf),
        ..synthetic_6_18()
    };
    let resolution = resolve_offsets(&source);
    assert_eq!(
        reasons(&resolution),
        [
            "kernel BTF has no usable struct sock_common: sockets opened before the agent \
              started are only seen when they change state",
            RAW_UNDESCRIBED,
            NO_TCP_ACTIVITY,
            TCP_SEQUENCE_LOST,
            NO_PT_REGS,
        ]
    );
}

#[test]
fn system_layout_reads_fixture_directories() {
    let layout = SystemLayout::from_paths(&fixture_dir("kernel-6.18"), None);
    assert!(layout
        .format("sock", "inet_sock_set_state")
        .unwrap()
        .contains("skaddr"));
    assert_eq!(layout.format("sock", "no_such_event"), None);
    assert_eq!(layout.format("..", "KERNEL"), None);
    assert_eq!(layout.format("sock/../sock", "inet_sock_set_state"), None);
    assert!(layout.btf().is_none());
    assert_eq!(layout.btf_problem(), None);
    let broken = SystemLayout::from_paths(
        &fixture_dir("kernel-6.18"),
        Some(&fixture_dir("kernel-6.18").join("sock_common.txt")),
    );
    assert!(
        broken.btf_problem().unwrap().contains("not BTF"),
        "{:?}",
        broken.btf_problem()
    );
}

/// Host test: resolves against this machine's tracefs and BTF (needs root). On the 6.18
/// development host everything must resolve with the recorded values.
#[test]
#[ignore = "host test: needs this host's tracefs and BTF as root; cargo xtask test runs it"]
fn host_system_layout_resolves() {
    let layout = SystemLayout::discover();
    assert_eq!(layout.tracefs_problem(), None);
    assert!(layout.btf().is_some(), "{:?}", layout.btf_problem());
    let resolution = resolve_offsets(&layout);
    assert_ne!(resolution.offsets.set_state.tuple.skaddr, OFFSET_UNKNOWN);
    assert!(resolution.offsets.can_learn_sockets());
    eprintln!(
        "host offsets: {:?}; missing: {:?}",
        resolution.offsets, resolution.missing
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let recorded = std::fs::read_to_string(fixture_dir("kernel-6.18").join("KERNEL")).unwrap();
    if release.trim() == recorded.trim() {
        assert!(resolution.missing.is_empty(), "{:?}", resolution.missing);
        assert_set_state_offsets(&resolution.offsets);
        assert_eq!(resolution.offsets.sock_common.v6_rcv_saddr, 72);
        assert_ne!(resolution.offsets.sock_protocol, OFFSET_UNKNOWN);
        assert_ne!(resolution.offsets.tcp_lsndtime, OFFSET_UNKNOWN);
        assert_ne!(resolution.offsets.tcp_lrcvtime, OFFSET_UNKNOWN);
        assert_ne!(resolution.offsets.tcp_write_seq, OFFSET_UNKNOWN);
        assert_ne!(resolution.offsets.tcp_copied_seq, OFFSET_UNKNOWN);
        assert_eq!(
            resolution.offsets,
            resolve_offsets(&Fixture::new("kernel-6.18", layout.btf().cloned())).offsets
        );
    }
}
