//! Load-time discovery of the kernel layouts the tracepoint programs read: tracepoint record
//! fields (from tracefs `format` files) and `struct sock_common` members (from kernel BTF).
//!
//! Anything not found, or found with a size the programs cannot read, is left at
//! [`OFFSET_UNKNOWN`] and reported in [`Resolution::missing`] with what the user loses, so the
//! agent degrades per feature instead of reading garbage or refusing to start.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use agent_common::{io_syscall, FdSyscall, ProbeOffsets, TupleLayout, OFFSET_UNKNOWN};

use super::btf::Btf;
use super::format::{parse_format, TracepointFormat};

/// Where layouts come from: the running kernel ([`SystemLayout`]) or recorded fixtures.
pub trait LayoutSource {
    /// Text of `events/<category>/<event>/format`; `None` when the event does not exist.
    fn format(&self, category: &str, event: &str) -> Option<String>;
    /// The kernel's BTF; `None` when it is absent or unreadable.
    fn btf(&self) -> Option<&Btf>;
    /// Why no format file can be read at all (e.g. tracefs not mounted), if that is the case.
    fn tracefs_problem(&self) -> Option<String> {
        None
    }
    /// Why [`LayoutSource::btf`] is `None`, when it is more than "not there".
    fn btf_problem(&self) -> Option<String> {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub offsets: ProbeOffsets,
    pub missing: Vec<MissingFeature>,
    /// By tracepoint ([`LINK_TRACEPOINTS`]): whether its bpf()-link program (tp_btf, or raw
    /// for `sys_exit`) can run on this kernel, or why not. Not a missing feature: without it the
    /// classic tracepoint serves, through perf_event_open (which Debian's
    /// perf_event_paranoid=3 refuses to processes without CAP_SYS_ADMIN).
    pub links: BTreeMap<&'static str, Result<(), String>>,
}

/// The tracepoints whose programs have a bpf()-link variant, with the leading arguments that
/// variant reads (BTF spellings, qualifiers dropped). Later kernels may append arguments.
pub const LINK_TRACEPOINTS: &[(&str, &[&str])] = &[
    ("inet_sock_set_state", &["struct sock *", "int", "int"]),
    ("tcp_retransmit_skb", &["struct sock *", "struct sk_buff *"]),
    (
        "tcp_retransmit_synack",
        &["struct sock *", "struct request_sock *"],
    ),
    ("tcp_receive_reset", &["struct sock *"]),
    ("tcp_send_reset", &["struct sock *", "struct sk_buff *"]),
    ("sys_exit", &["struct pt_regs *", "long int"]),
];

/// One layout the kernel did not provide, and what that costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeature {
    /// What was looked for: `sock/sock_send_length`, `sock/inet_sock_set_state field saddr`,
    /// `struct sock_common member skc_v6_daddr`, `kernel BTF`.
    pub subject: String,
    /// A sentence for logs and `cacheprobe check`: why it is missing and what is lost.
    pub reason: String,
}

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

type Slot = fn(&mut ProbeOffsets) -> &mut u16;

mod wanted;
use wanted::*;

pub fn resolve_offsets(source: &impl LayoutSource) -> Resolution {
    let mut resolver = Resolver {
        offsets: ProbeOffsets::UNKNOWN,
        missing: Vec::new(),
        tracefs_problem: source.tracefs_problem(),
    };

    if let Some(format) = resolver.load(source, &SET_STATE) {
        resolver.take_fields(&SET_STATE, &format, SET_STATE_FIELDS);
    }

    // Both length tracepoints feed the same len_* offsets: they share one TRACE_EVENT class.
    // Should a kernel ever give them different layouts, neither can be read safely.
    let send = resolver.load(source, &SEND_LENGTH);
    let recv = resolver.load(source, &RECV_LENGTH);
    match (&send, &recv) {
        (Some(send), Some(recv)) if !same_layout(send, recv, LENGTH_FIELDS) => {
            resolver.missing.push(MissingFeature {
                subject: "sock/sock_send_length, sock/sock_recv_length".into(),
                reason: format!(
                    "tracepoints sock/sock_send_length and sock/sock_recv_length have different \
                     layouts, which the programs cannot handle: {LENGTH_LOST}"
                ),
            });
        }
        (Some(format), _) => resolver.take_fields(&SEND_LENGTH, format, LENGTH_FIELDS),
        (None, Some(format)) => resolver.take_fields(&RECV_LENGTH, format, LENGTH_FIELDS),
        (None, None) => {}
    }

    for (tracepoint, slot) in TUPLE_TRACEPOINTS {
        if let Some(format) = resolver.load(source, tracepoint) {
            resolver.take_tuple(tracepoint, &format, *slot);
        }
    }

    if let Some(format) = resolver.load(source, &SYS_EXIT) {
        let wanted = Wanted {
            name: "ret",
            size: 8,
            slot: |o| &mut o.sys_exit_ret,
            impact: SYS_EXIT.impact,
        };
        resolver.take_fields(&SYS_EXIT, &format, std::slice::from_ref(&wanted));
    }

    resolver.take_sock_common(source);
    resolver.take_sk_protocol(source);
    resolver.take_skb_headers(source);
    resolver.take_inet_sport(source);
    resolver.take_fd_syscalls(source);
    let links = link_readiness(source, &resolver.offsets);
    let length_tracepoints = send.is_some() && recv.is_some();
    if length_tracepoints {
        resolver.take_raw_length_arguments(source);
    }
    // The state-change program reads these on every kernel. Without send/receive tracepoints
    // (before 6.4) the activity stamps are the only last activity a close can be measured from
    // (idle before close), and write_seq the only way a dead-socket write is seen at all.
    resolver.take_tcp_activity(source);
    resolver.take_tcp_sequence(source);
    if length_tracepoints {
        resolver.take_syscall_regs(source);
    }
    Resolution {
        offsets: resolver.offsets,
        missing: resolver.missing,
        links,
    }
}

/// Whether each of [`LINK_TRACEPOINTS`] can be followed through a bpf() link: kernel BTF must
/// describe its arguments as the program reads them, and give the layouts the program reads
/// through them.
fn link_readiness(
    source: &impl LayoutSource,
    offsets: &ProbeOffsets,
) -> BTreeMap<&'static str, Result<(), String>> {
    let sock = &offsets.sock_common;
    let sock_known = [
        sock.dport,
        sock.num,
        sock.family,
        sock.daddr,
        sock.rcv_saddr,
    ]
    .iter()
    .all(|&offset| offset != OFFSET_UNKNOWN);
    LINK_TRACEPOINTS
        .iter()
        .map(|&(event, expected)| {
            let ready = (|| {
                let btf = source.btf().ok_or("no kernel BTF")?;
                let args = btf
                    .raw_tracepoint_args(event)
                    .ok_or_else(|| format!("kernel BTF does not describe {event}'s arguments"))?;
                if args.len() < expected.len()
                    || !args.iter().zip(expected.iter()).all(|(a, b)| a == b)
                {
                    return Err(format!(
                        "{event} takes ({}), not ({}, ...)",
                        args.join(", "),
                        expected.join(", ")
                    ));
                }
                if event == "sys_exit" {
                    if !offsets.fd_syscalls.is_known() {
                        return Err("kernel BTF gives no struct pt_regs syscall number".into());
                    }
                } else if !sock_known {
                    return Err("kernel BTF gives no struct sock_common ports and addresses".into());
                } else if offsets.inet_sport == OFFSET_UNKNOWN && event != "tcp_retransmit_synack" {
                    return Err("kernel BTF gives no 2-byte struct inet_sock inet_sport".into());
                } else if event == "inet_sock_set_state" && offsets.sk_protocol == OFFSET_UNKNOWN {
                    return Err("kernel BTF gives no 2-byte struct sock sk_protocol".into());
                }
                Ok(())
            })();
            (event, ready)
        })
        .collect()
}

struct Resolver {
    offsets: ProbeOffsets,
    missing: Vec<MissingFeature>,
    tracefs_problem: Option<String>,
}

impl Resolver {
    fn load(
        &mut self,
        source: &impl LayoutSource,
        tracepoint: &Tracepoint,
    ) -> Option<TracepointFormat> {
        let Tracepoint {
            category,
            event,
            since,
            impact,
        } = tracepoint;
        let subject = format!("{category}/{event}");
        let reason = match source.format(category, event) {
            Some(text) => {
                match parse_format(&text) {
                    Ok(format) => return Some(format),
                    Err(error) => {
                        format!("tracepoint {subject} has an unreadable format file ({error}): {impact}")
                    }
                }
            }
            None => match &self.tracefs_problem {
                Some(problem) => {
                    format!("tracepoint {subject} cannot be read ({problem}): {impact}")
                }
                None => {
                    format!("tracepoint {subject} not present (needs Linux {since}+): {impact}")
                }
            },
        };
        self.missing.push(MissingFeature { subject, reason });
        None
    }

    fn take_fields(
        &mut self,
        tracepoint: &Tracepoint,
        format: &TracepointFormat,
        wanted: &[Wanted],
    ) {
        let subject = format!("{}/{}", tracepoint.category, tracepoint.event);
        for field in wanted {
            let found = format.field(field.name).map(|f| (f.offset, Some(f.size)));
            self.place(&format!("tracepoint {subject}"), "field", field, found);
        }
    }

    /// A connection tuple comes either as separate ports and addresses (e.g. `tcp_send_reset`
    /// up to 6.9) or as two 28-byte `sockaddr` buffers (from 6.10); take whichever is there.
    fn take_tuple(&mut self, tracepoint: &Tracepoint, format: &TracepointFormat, slot: TupleSlot) {
        let owner = format!("tracepoint {}/{}", tracepoint.category, tracepoint.event);
        let field = |name: &str| format.field(name).map(|f| (f.offset, Some(f.size)));
        let mut layout = TupleLayout::UNKNOWN;
        let mut problems = Vec::new();
        let take = |name: &'static str, size: u32, target: &mut u16, problems: &mut Vec<String>| {
            match field(name) {
                Some((offset, Some(found)))
                    if found == size && offset < u32::from(OFFSET_UNKNOWN) =>
                {
                    *target = offset as u16;
                }
                Some((_, found)) => problems.push(format!(
                    "{owner} field {name} has size {}, expected {size}",
                    found.map_or_else(|| "unknown".to_owned(), |s| s.to_string())
                )),
                None => problems.push(format!("{owner} has no field {name}")),
            }
        };
        take("skaddr", 8, &mut layout.skaddr, &mut problems);
        if format.field("saddr").is_some_and(|f| f.size == 28) {
            take("saddr", 28, &mut layout.sockaddr_src, &mut problems);
            take("daddr", 28, &mut layout.sockaddr_dst, &mut problems);
        } else {
            take("sport", 2, &mut layout.sport, &mut problems);
            take("dport", 2, &mut layout.dport, &mut problems);
            take("family", 2, &mut layout.family, &mut problems);
            take("saddr", 4, &mut layout.saddr, &mut problems);
            take("daddr", 4, &mut layout.daddr, &mut problems);
            take("saddr_v6", 16, &mut layout.saddr_v6, &mut problems);
            take("daddr_v6", 16, &mut layout.daddr_v6, &mut problems);
        }
        // Only some of these tracepoints report the socket state; it refines, never gates.
        if let Some(state) = format.field("state").filter(|f| f.size == 4) {
            if state.offset < u32::from(OFFSET_UNKNOWN) {
                layout.state = state.offset as u16;
            }
        }
        for problem in problems {
            self.missing.push(MissingFeature {
                subject: owner.clone(),
                reason: format!("{problem}: {}", tracepoint.impact),
            });
        }
        *slot(&mut self.offsets) = layout;
    }

    fn take_sock_common(&mut self, source: &impl LayoutSource) {
        let Some(btf) = source.btf() else {
            let reason = match source.btf_problem() {
                Some(problem) => format!("kernel BTF unreadable ({problem}): {LEARNING_LOST}"),
                None => format!("kernel BTF not found: {LEARNING_LOST}"),
            };
            self.missing.push(MissingFeature {
                subject: "kernel BTF".into(),
                reason,
            });
            return;
        };
        if btf.member_offset("sock_common", "skc_family").is_none()
            && btf.member_offset("sock_common", "skc_num").is_none()
        {
            self.missing.push(MissingFeature {
                subject: "struct sock_common".into(),
                reason: format!("kernel BTF has no usable struct sock_common: {LEARNING_LOST}"),
            });
            return;
        }
        for member in SOCK_COMMON_MEMBERS {
            let found = btf.member("sock_common", member.name).and_then(|location| {
                // A bitfield or an unaligned member has no byte offset to read at.
                (location.bitfield_bits == 0 && location.bit_offset.is_multiple_of(8))
                    .then_some((location.bit_offset / 8, location.size))
            });
            self.place("struct sock_common", "member", member, found);
        }
    }

    /// `struct sock` member `sk_protocol` for the tp_btf lifecycle program. Not a missing
    /// feature of its own: without it the classic tracepoint serves (see [`Resolution::links`]).
    fn take_sk_protocol(&mut self, source: &impl LayoutSource) {
        if let Some(location) = source
            .btf()
            .and_then(|btf| btf.member("sock", "sk_protocol"))
        {
            if location.bitfield_bits == 0
                && location.bit_offset.is_multiple_of(8)
                && location.size == Some(2)
                && location.bit_offset / 8 < u32::from(OFFSET_UNKNOWN)
            {
                self.offsets.sk_protocol = (location.bit_offset / 8) as u16;
            }
        }
    }

    /// `struct inet_sock` member `inet_sport`, the tp_btf programs' local port of a full socket
    /// (see [`ProbeOffsets::inet_sport`]). Without it those programs do not run.
    fn take_inet_sport(&mut self, source: &impl LayoutSource) {
        if let Some(location) = source
            .btf()
            .and_then(|btf| btf.member("inet_sock", "inet_sport"))
        {
            if location.bitfield_bits == 0
                && location.bit_offset.is_multiple_of(8)
                && location.size == Some(2)
                && location.bit_offset / 8 < u32::from(OFFSET_UNKNOWN)
            {
                self.offsets.inet_sport = (location.bit_offset / 8) as u16;
            }
        }
    }

    /// Where a `struct sk_buff` keeps its buffer and its network and transport header offsets,
    /// for resets sent for no socket. Not a missing feature of its own: without them the tp_btf
    /// `tcp_send_reset` program counts only resets sent on a socket.
    fn take_skb_headers(&mut self, source: &impl LayoutSource) {
        let Some(btf) = source.btf() else {
            return;
        };
        // BTF gives a pointer member no size (`head` is `unsigned char *`): None stands for it,
        // and the program reads it as the 8 bytes of a 64-bit kernel's pointer.
        let at = |name: &str, size: Option<u32>| {
            btf.member("sk_buff", name)
                .filter(|location| {
                    location.bitfield_bits == 0
                        && location.bit_offset.is_multiple_of(8)
                        && location.size == size
                        && location.bit_offset / 8 < u32::from(OFFSET_UNKNOWN)
                })
                .map(|location| (location.bit_offset / 8) as u16)
        };
        if let (Some(head), Some(network), Some(transport)) = (
            at("head", None),
            at("network_header", Some(2)),
            at("transport_header", Some(2)),
        ) {
            self.offsets.skb_head = head;
            self.offsets.skb_network_header = network;
            self.offsets.skb_transport_header = transport;
        }
    }

    /// Where the raw `sys_exit` program finds the syscall number (the same `struct pt_regs`
    /// member capture reads), and this architecture's numbers of the fd syscalls.
    fn take_fd_syscalls(&mut self, source: &impl LayoutSource) {
        let (number_path, _, _) = SYSCALL_REGS;
        let Some(location) = source
            .btf()
            .and_then(|btf| btf.member_path("pt_regs", number_path))
        else {
            return;
        };
        // Read as 8 bytes, so only an 8-byte member will do (see take_syscall_regs).
        if location.bitfield_bits == 0
            && location.bit_offset.is_multiple_of(8)
            && location.size.is_some_and(|size| size >= 8)
            && location.bit_offset / 8 < u32::from(OFFSET_UNKNOWN)
        {
            self.offsets.fd_syscalls.number = (location.bit_offset / 8) as u16;
            self.offsets.fd_syscalls.numbers = fd_syscall_numbers();
        }
    }

    /// Raw tracepoints pass a program the tracepoint's own arguments instead of a formatted
    /// record, which saves the record's construction on every send and receive. Their argument
    /// list and `sk_protocol` come from BTF; without either, the classic tracepoints serve.
    fn take_raw_length_arguments(&mut self, source: &impl LayoutSource) {
        const EXPECTED: [&str; 3] = ["struct sock *", "int", "int"];
        let Some(btf) = source.btf() else {
            // Already reported with what else it costs.
            return;
        };
        let problem = if let Some((event, args)) = [SEND_LENGTH.event, RECV_LENGTH.event]
            .into_iter()
            .map(|event| (event, btf.raw_tracepoint_args(event)))
            .find(|(_, args)| {
                !args
                    .as_ref()
                    .is_some_and(|args| args.iter().eq(EXPECTED.iter()))
            }) {
            match args {
                None => format!("kernel BTF does not describe the arguments of {event}"),
                Some(args) => format!(
                    "{event} takes ({}), not ({})",
                    args.join(", "),
                    EXPECTED.join(", ")
                ),
            }
        } else {
            match btf.member("sock", "sk_protocol") {
                Some(location)
                    if location.bitfield_bits == 0
                        && location.bit_offset.is_multiple_of(8)
                        && location.size == Some(2)
                        && location.bit_offset / 8 < u32::from(OFFSET_UNKNOWN) =>
                {
                    self.offsets.sock_protocol = (location.bit_offset / 8) as u16;
                    return;
                }
                _ => "struct sock has no 2-byte sk_protocol".to_owned(),
            }
        };
        self.missing.push(MissingFeature {
            subject: "raw tracepoints sock_send_length, sock_recv_length".into(),
            reason: format!(
                "{problem}: sends and receives are followed through the classic tracepoints, \
                 which cost more per call"
            ),
        });
    }

    /// Where the saved user registers hold the syscall number and its buffer argument, which
    /// payload capture reads inside the send/receive probes.
    fn take_syscall_regs(&mut self, source: &impl LayoutSource) {
        let Some(btf) = source.btf() else {
            // Already reported; `cacheprobe check` names capture's loss on its own line.
            return;
        };
        let (number_path, (second_arg_path, second_arg_skip), (third_arg_path, third_arg_skip)) =
            SYSCALL_REGS;
        // An 8-byte word `skip` bytes into the member must lie inside it.
        let word_at = |path: &[&str], skip: u32| {
            btf.member_path("pt_regs", path)
                .filter(|location| {
                    location.bitfield_bits == 0
                        && location.bit_offset.is_multiple_of(8)
                        && location.size.is_some_and(|size| size >= skip + 8)
                        && location.bit_offset / 8 + skip < u32::from(OFFSET_UNKNOWN)
                })
                .map(|location| (location.bit_offset / 8 + skip) as u16)
        };
        // The number is read as 8 bytes: a 4-byte member (arm64's syscallno) would pull in its
        // neighbour, so it is not accepted.
        let number = word_at(number_path, 0);
        let second_arg = word_at(second_arg_path, second_arg_skip);
        let third_arg = word_at(third_arg_path, third_arg_skip);
        match (number, second_arg, third_arg) {
            (Some(number), Some(second_arg), Some(third_arg)) => {
                self.offsets.syscall_regs.number = number;
                self.offsets.syscall_regs.second_arg = second_arg;
                self.offsets.syscall_regs.third_arg = third_arg;
                self.offsets.syscall_regs.numbers = io_syscall_numbers();
            }
            _ => self.missing.push(MissingFeature {
                subject: "struct pt_regs".into(),
                reason: format!(
                    "kernel BTF has no struct pt_regs with an 8-byte {}, {} and {} on this \
                     architecture: {CAPTURE_LOST}",
                    number_path.join("."),
                    second_arg_path.join("."),
                    third_arg_path.join(".")
                ),
            }),
        }
    }

    /// Where the kernel keeps a TCP socket's last data send and receive times. Without them the
    /// programs stamp the time themselves on every send and receive of a watched socket.
    fn take_tcp_activity(&mut self, source: &impl LayoutSource) {
        let Some(btf) = source.btf() else {
            return;
        };
        let u32_at = |path: &[&str]| {
            btf.member_path("tcp_sock", path)
                .filter(|location| {
                    location.bitfield_bits == 0
                        && location.bit_offset.is_multiple_of(8)
                        && location.size == Some(4)
                        && location.bit_offset / 8 < u32::from(OFFSET_UNKNOWN)
                })
                .map(|location| (location.bit_offset / 8) as u16)
        };
        match (
            u32_at(&["lsndtime"]),
            u32_at(&["inet_conn", "icsk_ack", "lrcvtime"]),
        ) {
            (Some(lsndtime), Some(lrcvtime)) => {
                self.offsets.tcp_lsndtime = lsndtime;
                self.offsets.tcp_lrcvtime = lrcvtime;
            }
            _ => self.missing.push(MissingFeature {
                subject: "struct tcp_sock members lsndtime, inet_conn.icsk_ack.lrcvtime".into(),
                reason: "kernel BTF has no 4-byte tcp_sock lsndtime and icsk_ack.lrcvtime: last \
                         activity is stamped on every send and receive instead, which costs more \
                         per call (without send/receive tracepoints, idle before close counts \
                         from the open)"
                    .into(),
            }),
        }
    }

    /// Where the kernel keeps a TCP socket's next sequence numbers to write and to read: payload
    /// records then carry the sequence number of their first byte, which the client's and the
    /// server's agents agree on (the request id that joins one request seen from both ends).
    fn take_tcp_sequence(&mut self, source: &impl LayoutSource) {
        let Some(btf) = source.btf() else {
            return;
        };
        let u32_at = |name: &str| {
            btf.member_path("tcp_sock", &[name])
                .filter(|location| {
                    location.bitfield_bits == 0
                        && location.bit_offset.is_multiple_of(8)
                        && location.size == Some(4)
                        && location.bit_offset / 8 < u32::from(OFFSET_UNKNOWN)
                })
                .map(|location| (location.bit_offset / 8) as u16)
        };
        match (u32_at("write_seq"), u32_at("copied_seq")) {
            (Some(write_seq), Some(copied_seq)) => {
                self.offsets.tcp_write_seq = write_seq;
                self.offsets.tcp_copied_seq = copied_seq;
            }
            _ => self.missing.push(MissingFeature {
                subject: "struct tcp_sock members write_seq, copied_seq".into(),
                reason: TCP_SEQUENCE_LOST.into(),
            }),
        }
    }

    /// Stores a found offset, or records why it cannot be used.
    fn place(
        &mut self,
        owner: &str,
        noun: &str,
        wanted: &Wanted,
        found: Option<(u32, Option<u32>)>,
    ) {
        let subject = format!("{owner} {noun} {}", wanted.name);
        let problem = match found {
            None => format!("{owner} has no {noun} {}", wanted.name),
            Some((_, size)) if size != Some(wanted.size) => format!(
                "{owner} {noun} {} has size {}, expected {}; treated as missing",
                wanted.name,
                size.map_or_else(|| "unknown".to_owned(), |size| size.to_string()),
                wanted.size
            ),
            // OFFSET_UNKNOWN is u16::MAX, so the largest usable offset is one less.
            Some((offset, _)) if offset >= u32::from(OFFSET_UNKNOWN) => format!(
                "{owner} {noun} {} is at offset {offset}, beyond what the programs can address; \
                 treated as missing",
                wanted.name
            ),
            Some((offset, _)) => {
                // Checked just above: fits below u16::MAX.
                *(wanted.slot)(&mut self.offsets) = offset as u16;
                return;
            }
        };
        self.missing.push(MissingFeature {
            subject,
            reason: format!("{problem}: {}", wanted.impact),
        });
    }
}

fn same_layout(a: &TracepointFormat, b: &TracepointFormat, wanted: &[Wanted]) -> bool {
    wanted.iter().all(|field| {
        let key = |format: &TracepointFormat| format.field(field.name).map(|f| (f.offset, f.size));
        key(a) == key(b)
    })
}

/// The running kernel's tracefs and BTF.
pub struct SystemLayout {
    events_dir: Option<PathBuf>,
    tracefs_problem: Option<String>,
    btf: Result<Btf, String>,
}

impl SystemLayout {
    pub const TRACEFS_MOUNTS: [&'static str; 2] =
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    pub const BTF_PATH: &'static str = "/sys/kernel/btf/vmlinux";

    /// Looks for tracefs at its usual mount points and reads kernel BTF. Reading the BTF
    /// (a few MB) and parsing it takes tens of milliseconds; do it once at startup.
    pub fn discover() -> SystemLayout {
        let mut tracefs_problem = None;
        let mut events_dir = None;
        for mount in Self::TRACEFS_MOUNTS {
            let events = Path::new(mount).join("events");
            match std::fs::read_dir(&events) {
                Ok(_) => {
                    events_dir = Some(events);
                    break;
                }
                Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                    tracefs_problem.get_or_insert(format!(
                        "permission denied reading {} (run as root)",
                        events.display()
                    ));
                }
                Err(_) => {}
            }
        }
        if events_dir.is_some() {
            tracefs_problem = None;
        } else if tracefs_problem.is_none() {
            tracefs_problem = Some(format!(
                "tracefs not found at {}; mount it with `mount -t tracefs nodev /sys/kernel/tracing`",
                Self::TRACEFS_MOUNTS.join(" or ")
            ));
        }
        SystemLayout {
            events_dir,
            tracefs_problem,
            btf: read_btf(Path::new(Self::BTF_PATH)),
        }
    }

    /// A layout read from explicit places: an `events` directory laid out like tracefs'
    /// (`<category>/<event>/format`) and a raw BTF file. Used for recorded fixtures.
    pub fn from_paths(events_dir: &Path, btf_path: Option<&Path>) -> SystemLayout {
        SystemLayout {
            events_dir: Some(events_dir.to_owned()),
            tracefs_problem: None,
            btf: match btf_path {
                Some(path) => read_btf(path),
                None => Err(String::new()),
            },
        }
    }
}

/// `Err("")` means "no BTF file"; any other error text explains why it could not be used.
fn read_btf(path: &Path) -> Result<Btf, String> {
    match std::fs::read(path) {
        Ok(bytes) => Btf::parse(&bytes).map_err(|error| format!("{}: {error}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(String::new()),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

impl LayoutSource for SystemLayout {
    fn format(&self, category: &str, event: &str) -> Option<String> {
        // Names come from this module's constants, but keep them from walking the filesystem.
        let plain = |part: &str| !part.is_empty() && !part.contains(['/', '\0']) && part != "..";
        if !plain(category) || !plain(event) {
            return None;
        }
        let path = self
            .events_dir
            .as_ref()?
            .join(category)
            .join(event)
            .join("format");
        std::fs::read_to_string(path).ok()
    }

    fn btf(&self) -> Option<&Btf> {
        self.btf.as_ref().ok()
    }

    fn tracefs_problem(&self) -> Option<String> {
        self.tracefs_problem.clone()
    }

    fn btf_problem(&self) -> Option<String> {
        self.btf
            .as_ref()
            .err()
            .filter(|problem| !problem.is_empty())
            .cloned()
    }
}

#[cfg(test)]
mod tests;
