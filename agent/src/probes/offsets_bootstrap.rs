//! TEMPORARY: replaced by probes::offsets when that lands.
use agent_common::{ProbeOffsets, TupleLayout};
fn field(text: &str, name: &str) -> (u16, u16) {
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("field:") {
            let decl = rest.split(';').next().unwrap_or("");
            let n = decl
                .rsplit(' ')
                .next()
                .unwrap_or("")
                .split('[')
                .next()
                .unwrap_or("")
                .trim_start_matches('*');
            if n == name {
                let off = rest
                    .split("offset:")
                    .nth(1)
                    .and_then(|s| s.split(';').next())
                    .and_then(|s| s.parse().ok());
                let size = rest
                    .split("size:")
                    .nth(1)
                    .and_then(|s| s.split(';').next())
                    .and_then(|s| s.parse().ok());
                return (off.unwrap_or(u16::MAX), size.unwrap_or(0));
            }
        }
    }
    (u16::MAX, 0)
}
fn read(c: &str, e: &str) -> String {
    std::fs::read_to_string(format!("/sys/kernel/tracing/events/{c}/{e}/format"))
        .unwrap_or_default()
}
fn tuple(t: &str) -> TupleLayout {
    let f = |n| field(t, n).0;
    let mut l = TupleLayout::UNKNOWN;
    l.skaddr = f("skaddr");
    l.state = f("state");
    l.sport = f("sport");
    l.dport = f("dport");
    l.family = f("family");
    let (sa, sz) = field(t, "saddr");
    if sz == 28 {
        l.sockaddr_src = sa;
        l.sockaddr_dst = f("daddr");
    } else {
        l.saddr = sa;
        l.daddr = f("daddr");
    }
    l.saddr_v6 = f("saddr_v6");
    l.daddr_v6 = f("daddr_v6");
    l
}
pub fn resolve() -> ProbeOffsets {
    let s = read("sock", "inet_sock_set_state");
    let l = read("sock", "sock_send_length");
    let mut o = ProbeOffsets::UNKNOWN;
    o.set_state.tuple = tuple(&s);
    o.set_state.oldstate = field(&s, "oldstate").0;
    o.set_state.newstate = field(&s, "newstate").0;
    o.set_state.protocol = field(&s, "protocol").0;
    o.length.sk = field(&l, "sk").0;
    o.length.family = field(&l, "family").0;
    o.length.protocol = field(&l, "protocol").0;
    o.length.ret = field(&l, "ret").0;
    o.retransmit_skb = tuple(&read("tcp", "tcp_retransmit_skb"));
    o.retransmit_synack = tuple(&read("tcp", "tcp_retransmit_synack"));
    o.receive_reset = tuple(&read("tcp", "tcp_receive_reset"));
    o.send_reset = tuple(&read("tcp", "tcp_send_reset"));
    o.sys_exit_ret = field(&read("syscalls", "sys_exit_socket"), "ret").0;
    let sc = &mut o.sock_common;
    sc.daddr = 0;
    sc.rcv_saddr = 4;
    sc.dport = 12;
    sc.num = 14;
    sc.family = 16;
    sc.state = 18;
    sc.v6_daddr = 56;
    sc.v6_rcv_saddr = 72;
    o
}
