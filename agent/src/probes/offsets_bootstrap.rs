//! TEMPORARY: replaced by probes::offsets when that lands.
use agent_common::ProbeOffsets;
fn field(text: &str, name: &str) -> u16 {
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
                return off.unwrap_or(u16::MAX);
            }
        }
    }
    u16::MAX
}
pub fn resolve() -> ProbeOffsets {
    let read = |c: &str, e: &str| {
        std::fs::read_to_string(format!("/sys/kernel/tracing/events/{c}/{e}/format"))
            .unwrap_or_default()
    };
    let s = read("sock", "inet_sock_set_state");
    let l = read("sock", "sock_send_length");
    let mut o = ProbeOffsets::UNKNOWN;
    o.state_skaddr = field(&s, "skaddr");
    o.state_oldstate = field(&s, "oldstate");
    o.state_newstate = field(&s, "newstate");
    o.state_sport = field(&s, "sport");
    o.state_dport = field(&s, "dport");
    o.state_family = field(&s, "family");
    o.state_protocol = field(&s, "protocol");
    o.state_saddr = field(&s, "saddr");
    o.state_daddr = field(&s, "daddr");
    o.state_saddr_v6 = field(&s, "saddr_v6");
    o.state_daddr_v6 = field(&s, "daddr_v6");
    o.len_sk = field(&l, "sk");
    o.len_family = field(&l, "family");
    o.len_protocol = field(&l, "protocol");
    o.len_ret = field(&l, "ret");
    // 6.18 sock_common layout, temporary
    o.skc_daddr = 0;
    o.skc_rcv_saddr = 4;
    o.skc_dport = 12;
    o.skc_num = 14;
    o.skc_family = 16;
    o.skc_state = 18;
    o.skc_v6_daddr = 56;
    o.skc_v6_rcv_saddr = 72;
    o
}
