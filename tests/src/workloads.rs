//! Scripted client workloads whose every count is known, and the assertions that check the
//! agent counted them exactly (shared by the memcache and classic-tracepoint tests).

use crate::Scrape;

/// A pymemcache + python-memcache script whose exact outcome is known.
pub fn scripted_text_workload(port: u16) -> String {
    format!(
        "from pymemcache.client.base import Client\n\
         import memcache\n\
         c = Client(('127.0.0.1', {port}))\n\
         for i in range(5):\n\
         \x20   assert c.set('k%d' % i, 'v%d' % i, noreply=False)\n\
         for i in range(3):\n\
         \x20   assert c.get('k%d' % i) is not None\n\
         assert c.get('nope1') is None and c.get('nope2') is None\n\
         got = c.get_many(['k0', 'k1', 'k2', 'nope3'])\n\
         assert len(got) == 3\n\
         assert c.delete('k4', noreply=False) and not c.delete('k4', noreply=False)\n\
         assert c.touch('k0', 100, noreply=False)\n\
         c.close()\n\
         m = memcache.Client(['127.0.0.1:{port}'])\n\
         assert m.set('m1', 'x')\n\
         assert m.get('m1') == 'x'\n\
         assert m.get('m2') is None\n\
         m.disconnect_all()\n"
    )
}

/// Asserts `role`'s request counts for [`scripted_text_workload`], plus what the test sent
/// besides it on the same server: `extra_hits` get hits and `extra_requests` requests in all
/// (those hits included).
pub fn assert_text_workload(scrape: &Scrape, role: &str, extra_hits: f64, extra_requests: f64) {
    let count = |command: &str, status: &str| {
        scrape.requests(&[("role", role), ("command", command), ("status", status)])
    };
    assert_eq!(count("set", "stored"), 6.0, "{role}: {}", scrape.text);
    // 3 single hits + 3 multi-get hits + python-memcache's hit.
    assert_eq!(
        count("get", "hit"),
        7.0 + extra_hits,
        "{role}: {}",
        scrape.text
    );
    assert_eq!(count("get", "miss"), 4.0, "{role}: {}", scrape.text);
    assert_eq!(count("delete", "deleted"), 1.0, "{role}");
    assert_eq!(count("delete", "not_found"), 1.0, "{role}");
    assert_eq!(count("touch", "touched"), 1.0, "{role}");
    assert_eq!(
        scrape.requests(&[("role", role)]),
        20.0 + extra_requests,
        "{role}: {}",
        scrape.text
    );
}
