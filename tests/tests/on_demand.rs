//! `limits.socket_probes_on_demand` (on by default): with nothing captured, the send/receive programs are off
//! while every watched connection is healthy, and back on when a peer closes, in time for the
//! dead writes that follow (memcached's idle timeout, and a peer that closes just before a
//! write).

use std::time::Duration;

use cacheprobe_tests::*;

const WAIT: Duration = Duration::from_secs(15);

/// The agent's defaults: on demand unless `[limits]` says otherwise.
fn on_demand_config(port: u16, capture: bool) -> String {
    format!(
        "{}\ncapture = {capture}\n",
        services_config(&[("cache", port, "memcache")]).trim_end()
    ) + "\n"
}

fn attached(scrape: &Scrape) -> f64 {
    scrape.sum("cacheprobe_send_receive_probes_attached", &[])
}

fn dead_writes(scrape: &Scrape) -> f64 {
    scrape.sum("cacheprobe_dead_socket_writes_total", &[("role", "client")])
}

/// Healthy pooled traffic leaves the programs off; memcached closing idle clients brings them
/// back, and every late write onto those dead connections is counted, as with them always on.
#[test]
fn healthy_traffic_runs_no_program_and_idle_closes_still_show_dead_writes() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &["-o", "idle_timeout=2"]).unwrap();
    let agent = Agent::start_with_config("on-demand-idle", &on_demand_config(port, false)).unwrap();
    let scrape = agent.wait_for(WAIT, |s| attached(s) == 0.0);
    assert_eq!(attached(&scrape), 0.0, "never detached: {}", agent.log());

    python(None, &idle_then_write_script(port, 3)).unwrap();
    let scrape = agent.wait_for(WAIT, |s| dead_writes(s) >= 3.0);
    assert_eq!(dead_writes(&scrape), 3.0, "{}", scrape.text);
    assert!(
        agent.log().contains("send/receive probes attached"),
        "{}",
        agent.log()
    );
    // Once the closed connections are forgotten, off again.
    let scrape = agent.wait_for(Duration::from_secs(20), |s| attached(s) == 0.0);
    assert_eq!(attached(&scrape), 0.0, "{}", agent.log());
}

/// A peer that closes a moment before the client writes: the close wakes the agent at once, so
/// the programs are back before a write 1 ms or 5 ms after the FIN. One at once after the FIN
/// beats them; the reset it draws still counts it, from the kernel's sequence numbers. Five
/// times each.
#[test]
fn a_write_just_after_the_peer_closes_is_counted() {
    require_root();
    let port = unique_port();
    let agent = Agent::start_with_config("on-demand-race", &on_demand_config(port, false)).unwrap();
    let script = format!(
        "import socket, time\n\
         srv = socket.socket()\n\
         srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         srv.bind(('127.0.0.1', {port}))\n\
         srv.listen(8)\n\
         for delay in [0, 0.001, 0.005] * 5:\n\
         \x20   c = socket.create_connection(('127.0.0.1', {port}))\n\
         \x20   s, _ = srv.accept()\n\
         \x20   c.sendall(b'get a\\r\\n')\n\
         \x20   s.recv(100)\n\
         \x20   time.sleep(2.5)\n\
         \x20   s.close()\n\
         \x20   time.sleep(delay)\n\
         \x20   c.sendall(b'set k 0 0 1 noreply\\r\\nx\\r\\n')\n\
         \x20   time.sleep(0.2)\n\
         \x20   c.close()\n"
    );
    let scrape = agent.wait_for(WAIT, |s| attached(s) == 0.0);
    assert_eq!(attached(&scrape), 0.0, "never detached: {}", agent.log());
    python(None, &script).unwrap();
    let scrape = agent.wait_for(WAIT, |s| dead_writes(s) >= 15.0);
    assert_eq!(dead_writes(&scrape), 15.0, "{}", scrape.text);
}

/// A captured service needs the programs on every call: they stay on.
#[test]
fn capture_keeps_the_programs_on() {
    require_root();
    let port = unique_port();
    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    let agent =
        Agent::start_with_config("on-demand-capture", &on_demand_config(port, true)).unwrap();
    python(None, &gets_script(port, 1, 20)).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let scrape = agent.scrape();
    assert_eq!(attached(&scrape), 1.0, "{}", agent.log());
    let gets = scrape.sum(
        "cacheprobe_memcache_requests_total",
        &[("role", "client"), ("command", "get")],
    );
    assert_eq!(gets, 20.0, "{}", scrape.text);
}

/// `socket_probes_on_demand = false` keeps them on with nothing captured.
#[test]
fn the_programs_stay_on_when_on_demand_is_turned_off() {
    require_root();
    let port = unique_port();
    let config = on_demand_config(port, false) + "[limits]\nsocket_probes_on_demand = false\n";
    let agent = Agent::start_with_config("on-demand-off", &config).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(attached(&agent.scrape()), 1.0, "{}", agent.log());
    assert!(
        !agent.log().contains("send/receive probes detached"),
        "{}",
        agent.log()
    );
}
