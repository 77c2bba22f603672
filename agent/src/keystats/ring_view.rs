//! Which servers this host's clients used recently, per service, reduced to one bounded info series per service so Prometheus can compare ring views across hosts.

use std::{collections::BTreeMap, net::SocketAddr};

/// A server stays in the view this long after its last client connection closed: a pool that
/// reconnects every few minutes must not flap between two fingerprints.
pub const RECENT_S: u64 = 600;
/// Servers remembered per service; beyond, new ones are counted but not kept (bounded memory).
pub const MAX_SERVERS: usize = 4096;

#[derive(Debug, Default, Clone, Copy)]
struct Use {
    active: u32,
    last_seen_s: u64,
}

/// One service's published view: what the info series carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub fingerprint: String,
    pub servers: usize,
}

#[derive(Debug, Default)]
pub struct RingView {
    services: BTreeMap<usize, BTreeMap<SocketAddr, Use>>,
    /// Servers not kept because a service hit [`MAX_SERVERS`].
    pub overflowed: u64,
}

impl RingView {
    pub fn opened(&mut self, service: usize, server: SocketAddr, now_s: u64) {
        let servers = self.services.entry(service).or_default();
        if !servers.contains_key(&server) && servers.len() >= MAX_SERVERS {
            self.overflowed += 1;
            return;
        }
        let entry = servers.entry(server).or_default();
        entry.active = entry.active.saturating_add(1);
        entry.last_seen_s = now_s;
    }

    pub fn closed(&mut self, service: usize, server: SocketAddr, now_s: u64) {
        if let Some(entry) = self
            .services
            .get_mut(&service)
            .and_then(|servers| servers.get_mut(&server))
        {
            entry.active = entry.active.saturating_sub(1);
            entry.last_seen_s = now_s;
        }
    }

    /// Forgets servers unused for [`RECENT_S`] and returns each service's view.
    pub fn views(&mut self, now_s: u64) -> BTreeMap<usize, View> {
        let mut views = BTreeMap::new();
        for (service, servers) in &mut self.services {
            servers.retain(|_, u| u.active > 0 || now_s.saturating_sub(u.last_seen_s) < RECENT_S);
            if servers.is_empty() {
                continue;
            }
            // BTreeMap iteration is sorted, so the same set gives the same text on every host.
            let mut canonical: Vec<String> = servers.keys().map(|s| s.to_string()).collect();
            canonical.sort();
            views.insert(
                *service,
                View {
                    fingerprint: fingerprint(&canonical),
                    servers: canonical.len(),
                },
            );
        }
        self.services.retain(|_, servers| !servers.is_empty());
        views
    }
}

/// FNV-1a 64 over the sorted `ip:port` strings, newline-separated: stable across hosts,
/// versions and architectures (unlike the seeded hashers used for maps), and cheap enough that
/// Prometheus users can recompute it from a server list by hand if they must.
pub fn fingerprint(sorted_servers: &[String]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, server) in sorted_servers.iter().enumerate() {
        if i > 0 {
            hash ^= u64::from(b'\n');
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        for byte in server.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn same_set_same_fingerprint_in_any_order() {
        let mut a = RingView::default();
        let mut b = RingView::default();
        for s in ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"] {
            a.opened(0, addr(s), 100);
        }
        for s in ["10.0.0.3:11211", "10.0.0.1:11211", "10.0.0.2:11211"] {
            b.opened(0, addr(s), 200);
        }
        let (va, vb) = (a.views(300), b.views(300));
        assert_eq!(va, vb);
        assert_eq!(va[&0].servers, 3);
        assert_eq!(va[&0].fingerprint.len(), 16);
        // Pinned: FNV-1a 64 of the newline-joined sorted list, recomputable anywhere (this is
        // `printf '10.0.0.1:11211\n10.0.0.2:11211\n10.0.0.3:11211'` through any FNV-1a 64).
        assert_eq!(va[&0].fingerprint, "8fd719b6f7f1ce90");
        assert_eq!(fingerprint(&["10.0.0.1:11211".into()]), "dab78e6e5c611ef1");
    }

    #[test]
    fn a_different_set_differs_and_idle_servers_age_out() {
        let mut view = RingView::default();
        view.opened(0, addr("10.0.0.1:11211"), 0);
        view.opened(0, addr("10.0.0.2:11211"), 0);
        let both = view.views(10)[&0].clone();
        view.closed(0, addr("10.0.0.2:11211"), 20);
        // Still recent: the pool may reconnect.
        assert_eq!(view.views(20 + RECENT_S - 1)[&0], both);
        let one = view.views(20 + RECENT_S)[&0].clone();
        assert_eq!(one.servers, 1);
        assert_ne!(one.fingerprint, both.fingerprint);
        // The open connection keeps its server however old.
        assert_eq!(view.views(100_000)[&0].servers, 1);
        view.closed(0, addr("10.0.0.1:11211"), 100_000);
        assert!(view.views(100_000 + RECENT_S).is_empty());
    }

    #[test]
    fn bounded_per_service() {
        let mut view = RingView::default();
        for i in 0..(MAX_SERVERS + 10) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
            view.opened(1, SocketAddr::from((ip, 11211)), 0);
        }
        assert_eq!(view.views(1)[&1].servers, MAX_SERVERS);
        assert_eq!(view.overflowed, 10);
    }
}
