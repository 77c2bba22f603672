//! Scripted client workloads whose every count is known, the assertions that check the agent
//! counted them exactly, and a client connected before the agent (shared by the memcache,
//! lifecycle and classic-tracepoint tests).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{scratch_dir, Scrape, PYTHON};

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

/// A pymemcache connection opened (and a set of `key` sent on it) before the agent starts, as a
/// pooled client's would be. After [`EarlyClient::release`] it gets `key` back, lingers and
/// closes; dropped early, it is killed.
pub struct EarlyClient {
    child: Child,
    go: PathBuf,
}

impl EarlyClient {
    /// Starts the client against 127.0.0.1:`port` and returns once its set is answered;
    /// `linger` is how long it stays connected after its get.
    pub fn connect(port: u16, name: &str, key: &str, linger: Duration) -> EarlyClient {
        let go = scratch_dir(name).join("go");
        let script = format!(
            "from pymemcache.client.base import Client\n\
             import os, time\n\
             c = Client(('127.0.0.1', {port}))\n\
             c.set('{key}', 'v', noreply=False)\n\
             print('connected', flush=True)\n\
             while not os.path.exists('{go}'):\n\
             \x20   time.sleep(0.05)\n\
             assert c.get('{key}') == b'v'\n\
             time.sleep({linger})\n\
             c.close()\n",
            go = go.display(),
            linger = linger.as_secs_f64()
        );
        let mut child = Command::new(PYTHON)
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the early pymemcache client");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "connected");
        EarlyClient { child, go }
    }

    /// Lets the client send its get and close.
    pub fn release(&self) {
        std::fs::write(&self.go, "").unwrap();
    }

    /// Waits for the client to finish and asserts its get was answered.
    pub fn finish(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "early client: {status}");
    }
}

impl Drop for EarlyClient {
    fn drop(&mut self) {
        // Already reaped after finish(); otherwise a failed test must not leave it waiting.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
