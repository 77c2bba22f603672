//! What the bytes say, checked against real memcached's own counters: the value-size and
//! keys-per-request histograms against `stats` (pymemcache `set_many`/`get_many`, values up to
//! 1 MB that memcached writes back as many iovecs), and the slab fit `diagnose` reports against
//! `stats slabs` of a memcached started with non-default `-f`/`-n`, read from its command line.

use std::time::Duration;

use cacheprobe_tests::*;

/// memcached's per-item overhead in its `bytes` stat for the keys below: the 48-byte item
/// header, the 4-byte key and its terminator, "\r\n" after the value and the 8-byte CAS id
/// (client flags 0 are not stored).
const ITEM_OVERHEAD: f64 = 48.0 + 4.0 + 1.0 + 2.0 + 8.0;

fn histogram(scrape: &Scrape, name: &str, service: &str, role: &str, command: &str) -> (f64, f64) {
    let labels = [("service", service), ("role", role), ("command", command)];
    (
        scrape.sum(&format!("{name}_count"), &labels),
        scrape.sum(&format!("{name}_sum"), &labels),
    )
}

/// ~5 s. Service "sizes": 60 distinct keys stored in one pymemcache `set_many` (values of 0 B to
/// 1 MB, six of 1 MB), then `get_many` of 1, 7 and 60 keys plus misses, and 5 single gets.
/// Service "slabs": memcached `-f 1.5 -n 40`, 400 items of 10 B to 300 KB (below its
/// 512 KiB chunk limit, so none is chunked).
#[test]
fn value_sizes_keys_per_request_and_slab_fit_match_memcached() {
    require_root();
    let (sizes_port, slabs_port) = (unique_port(), unique_port());
    let _sizes = start_memcached(None, "127.0.0.1", sizes_port, &[]).unwrap();
    let _slabs =
        start_memcached(None, "127.0.0.1", slabs_port, &["-f", "1.5", "-n", "40"]).unwrap();
    let agent = Agent::start_with_config(
        "sizes",
        &format!(
            "sample_interval_seconds = 1\n\n\
             [[services]]\nname = \"sizes\"\nport = {sizes_port}\nprotocol = \"memcache\"\n\n\
             [[services]]\nname = \"slabs\"\nport = {slabs_port}\nprotocol = \"memcache\"\n\n\
             [limits]\ncapture_records_per_second = 0\n\n\
             [diagnose]\nslab_waste_ratio = 0.001\nslab_min_items = 1\n"
        ),
    )
    .unwrap();
    let before = server_stats(sizes_port, "stats");
    let script = format!(
        "from pymemcache.client.base import Client\n\
         SIZES = [0, 10, 100, 1000, 5000, 40000, 100000, 200000, 400000, 1000000]\n\
         a = Client(('127.0.0.1', {sizes_port}))\n\
         keys = ['k%03d' % i for i in range(60)]\n\
         vals = {{k: bytes([65 + i % 26]) * SIZES[i % 10] for i, k in enumerate(keys)}}\n\
         assert not a.set_many(vals, noreply=False)\n\
         for n in (1, 7, 60):\n\
         \x20   got = a.get_many(keys[:n] + ['miss%d' % j for j in range(n // 7)])\n\
         \x20   assert got == {{k: vals[k] for k in keys[:n]}}\n\
         for k in keys[:5]:\n\
         \x20   assert a.get(k) == vals[k]\n\
         b = Client(('127.0.0.1', {slabs_port}))\n\
         for batch in range(8):\n\
         \x20   items = {{'s%03d' % i: b'x' * (10 + (i * 7919) % 4000) for i in range(batch * 50, batch * 50 + 45)}}\n\
         \x20   items.update({{'s%03d' % i: b'y' * (20000 + i * 700) for i in range(batch * 50 + 45, batch * 50 + 50)}})\n\
         \x20   assert not b.set_many(items, noreply=False)\n"
    );
    python(None, &script).unwrap();
    let after = server_stats(sizes_port, "stats");
    let delta = |name: &str| after[name] - before[name];
    let scrape = agent.wait_for(Duration::from_secs(10), |s| {
        ["client", "server"].iter().all(|role| {
            histogram(
                s,
                "cacheprobe_memcache_value_size_bytes",
                "sizes",
                role,
                "get",
            )
            .0 >= delta("get_hits")
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let scrape = Scrape::parse(&agent.scrape_text().unwrap_or(scrape.text));
    let value_bytes = after["bytes"] - after["curr_items"] * ITEM_OVERHEAD;
    eprintln!(
        "memcached: cmd_set {} cmd_get {} get_hits {} get_misses {} bytes {} curr_items {} \
         (values {value_bytes} B)",
        delta("cmd_set"),
        delta("cmd_get"),
        delta("get_hits"),
        delta("get_misses"),
        after["bytes"],
        after["curr_items"]
    );
    assert_eq!(delta("cmd_set"), 60.0);
    assert_eq!(after["curr_items"], 60.0);
    for role in ["client", "server"] {
        let sets = histogram(
            &scrape,
            "cacheprobe_memcache_value_size_bytes",
            "sizes",
            role,
            "set",
        );
        eprintln!("{role}: set values {sets:?}");
        // Every store, and its value bytes as memcached accounts them.
        assert_eq!(sets, (delta("cmd_set"), value_bytes), "{role}");
        let hits = histogram(
            &scrape,
            "cacheprobe_memcache_value_size_bytes",
            "sizes",
            role,
            "get",
        );
        eprintln!("{role}: get values {hits:?}");
        assert_eq!(hits.0, delta("get_hits"), "{role}");
        // Hits: keys 0..1, 0..7, 0..60 and 0..5 of the stored values.
        let stored = |n: usize| {
            [
                0.0, 10.0, 100.0, 1000.0, 5000.0, 40000.0, 100000.0, 200000.0, 400000.0, 1e6,
            ]
            .iter()
            .cycle()
            .take(n)
            .sum::<f64>()
        };
        assert_eq!(
            hits.1,
            stored(1) + stored(7) + stored(60) + stored(5),
            "{role}"
        );
        // memcached's cmd_get counts keys: the histogram's sum; 3 multi-gets and 5 gets.
        let keys = histogram(
            &scrape,
            "cacheprobe_memcache_keys_per_request",
            "sizes",
            role,
            "get",
        );
        eprintln!("{role}: keys per get {keys:?}");
        assert_eq!(keys, (8.0, delta("cmd_get")), "{role}");
        // Six of the 60 stored values are 1 MB: above the 512 KiB bucket.
        let up_to_512k: f64 = scrape
            .matching(
                "cacheprobe_memcache_value_size_bytes_bucket",
                &[("service", "sizes"), ("role", role), ("command", "set")],
            )
            .filter(|s| s.labels.get("le").and_then(|le| le.parse::<f64>().ok()) == Some(524288.0))
            .map(|s| s.value)
            .sum();
        assert_eq!(up_to_512k, 54.0, "{role}: values up to 512 KiB");
    }
    assert_eq!(
        scrape.sum("cacheprobe_memcache_decode_errors_total", &[]),
        0.0,
        "decode errors"
    );

    // `cacheprobe keys`: per server and view, the largest values are the 1 MB ones, named by
    // key and process; the slowest requests are listed with their latency.
    // The pipeline publishes the keys report once a tick: ask until both views are in it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let keys = loop {
        let keys = keys_report(&agent);
        let views = keys["extremes"].as_array().map_or(0, |all| {
            all.iter().filter(|s| s["service"] == "sizes").count()
        });
        if views >= 2 || std::time::Instant::now() > deadline {
            break keys;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let big_keys: Vec<String> = (0..6).map(|i| format!("k{:03}", i * 10 + 9)).collect();
    // The process that made the call, not its thread: memcached's workers are "mc-worker".
    for (role, process) in [("client", "python3"), ("server", "memcached")] {
        let server = keys["extremes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "sizes" && s["role"] == role)
            .unwrap_or_else(|| panic!("no {role} extremes: {keys:#}"));
        let largest = server["largest_values"].as_array().unwrap();
        assert!(largest.len() >= 5, "{server:#}");
        for entry in &largest[..5] {
            assert_eq!(entry["value"], 1_000_000, "{server:#}");
            assert_eq!(entry["process"], process, "{server:#}");
            assert!(
                big_keys.contains(&entry["key"].as_str().unwrap().to_string()),
                "{entry}"
            );
        }
        let slowest = server["slowest_requests"].as_array().unwrap();
        assert!(
            !slowest.is_empty() && slowest[0]["value"].as_u64().unwrap() > 0,
            "{server:#}"
        );
    }

    // Slab fit against memcached's own slab accounting, with its settings read from /proc.
    let slabs = server_stats(slabs_port, "stats slabs");
    let used_chunks: f64 = slabs
        .iter()
        .filter(|(k, _)| k.ends_with(":used_chunks"))
        .map(|(_, v)| v)
        .sum();
    let chunk_bytes: f64 = slabs
        .iter()
        .filter_map(|(k, v)| {
            let class = k.strip_suffix(":used_chunks")?;
            Some(v * slabs[&format!("{class}:chunk_size")])
        })
        .sum();
    eprintln!("stats slabs: {used_chunks} chunks, {chunk_bytes} B");
    assert_eq!(used_chunks, 400.0);
    let server = format!("127.0.0.1:{slabs_port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let finding = loop {
        let (_, report) = daemon_report(&agent);
        let found = report["findings"].as_array().and_then(|all| {
            all.iter()
                .find(|f| f["id"] == "slab-waste" && f["subjects"]["servers"][0] == server.as_str())
                .cloned()
        });
        match found {
            Some(f) if f["values"]["items"] == 400.0 => break f,
            other if std::time::Instant::now() > deadline => {
                panic!("no slab-waste finding for {server} with 400 items: {other:#?}\n{report:#}")
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    eprintln!("{finding:#}");
    let evidence = finding["evidence"].to_string();
    assert!(
        evidence.contains("-f 1.5 -n 40"),
        "settings from /proc: {evidence}"
    );
    assert_eq!(finding["values"]["chunk_bytes"], chunk_bytes, "{finding:#}");
    assert_eq!(
        finding["values"]["waste_ratio"].as_f64().unwrap(),
        1.0 - finding["values"]["item_bytes"].as_f64().unwrap() / chunk_bytes
    );
}
