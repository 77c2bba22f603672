//! The process a record came from, by name: the thread-group leader's `comm`, what `ps -o comm`
//! and the host sampler ([`crate::host`]) show. The kernel programs stamp records with the
//! *thread's* comm (`bpf_get_current_comm`) and the process id (the tgid), so memcached's
//! requests would read `mc-worker` while its fds read `memcached`: two rows in top, a finding
//! naming a thread, a `comm` label that joins nothing. Every record is renamed here.
//!
//! Why user space and not the kernel: reading `task->group_leader->comm` in the programs would
//! cost two dependent CO-RE reads (and a 16-byte copy) on every captured call, the per-call
//! BPF time the capture budget fights, for a name that changes once per process. Here it is a
//! /proc read per new (process, thread name) pair, and two compares per record otherwise.
//!
//! The kernel's tgid is a pid of the initial pid namespace: /proc/<tgid> names the same
//! process only where the agent sees that namespace (the packaged unit runs it on the host).
//! Elsewhere [`ProcessNames::from_proc`] keeps thread names rather than guess.
//!
//! Bounded: at most [`MAX_PROCESSES`] pairs, and everything is forgotten every
//! [`FORGET_AFTER_NS`] of record time, so a pid reused by another program (or a process that
//! renamed itself) has its right name again within that.

use agent_common::COMM_LEN;

use crate::kernel::events::comm_str;

/// Distinct (process, thread name) pairs remembered; one more clears the table.
pub const MAX_PROCESSES: usize = 4096;
/// How long a name read from /proc is trusted.
pub const FORGET_AFTER_NS: u64 = 60_000_000_000;

/// Reads a process's name (its /proc `comm`) by tgid; None when it is gone or unreadable.
pub type ReadName = Box<dyn FnMut(u32) -> Option<String> + Send>;

type Key = (u32, [u8; COMM_LEN]);

pub struct ProcessNames {
    /// The last two distinct pairs looked up and their names: records alternate between few
    /// processes (a client and its server), and this is the per-record path.
    recent: [(Key, String); 2],
    /// Whether `recent[slot]` holds a looked-up name (a zeroed key is a real one: pid 0).
    recent_valid: [bool; 2],
    next: usize,
    known: foldhash::HashMap<Key, String>,
    read_name: Option<ReadName>,
    /// Record time after which everything is read again.
    forget_at_ns: Option<u64>,
}

impl ProcessNames {
    /// Names from /proc when the agent sees the kernel's pids; thread names otherwise.
    pub fn from_proc() -> Self {
        if sees_kernel_pids() {
            Self::new(Some(Box::new(read_proc_comm)))
        } else {
            tracing::warn!(
                "not in the host's pid namespace: requests are named by thread, not process"
            );
            Self::new(None)
        }
    }

    /// `read_name`: None names every record by its thread.
    pub fn new(read_name: Option<ReadName>) -> Self {
        ProcessNames {
            recent: Default::default(),
            recent_valid: [false; 2],
            next: 0,
            known: foldhash::HashMap::default(),
            read_name,
            forget_at_ns: None,
        }
    }

    /// The slot of [`ProcessNames::recent`] naming the process `pid` whose thread is called
    /// `thread`, seen at `ts_ns` (record time). Take the name with [`ProcessNames::name`].
    pub fn slot(&mut self, pid: u32, thread: &[u8; COMM_LEN], ts_ns: u64) -> usize {
        for slot in 0..2 {
            let (key, _) = &self.recent[slot];
            if key.0 == pid && key.1 == *thread && self.recent_valid[slot] {
                return slot;
            }
        }
        self.forget_if_due(ts_ns);
        let key = (pid, *thread);
        let name = self.lookup(key).to_owned();
        let slot = self.next;
        self.next ^= 1;
        self.recent[slot] = (key, name);
        self.recent_valid[slot] = true;
        slot
    }

    pub fn name(&self, slot: usize) -> &str {
        &self.recent[slot].1
    }

    /// For callers that must lend the name while borrowing the rest of their state mutably:
    /// give it back with [`ProcessNames::put_back`].
    pub fn take(&mut self, slot: usize) -> String {
        std::mem::take(&mut self.recent[slot].1)
    }

    pub fn put_back(&mut self, slot: usize, name: String) {
        self.recent[slot].1 = name;
    }

    /// The name of `pid`'s process, for records off the per-record path (socket events).
    pub fn of(&mut self, pid: u32, thread: &[u8; COMM_LEN], ts_ns: u64) -> String {
        let slot = self.slot(pid, thread, ts_ns);
        self.name(slot).to_owned()
    }

    fn lookup(&mut self, key: Key) -> &str {
        if self.known.len() >= MAX_PROCESSES && !self.known.contains_key(&key) {
            self.known.clear();
        }
        let read_name = &mut self.read_name;
        self.known.entry(key).or_insert_with(|| {
            // pid 0 is the idle task (softirq context), not a process /proc lists.
            let read = if key.0 == 0 {
                None
            } else {
                read_name.as_mut().and_then(|read| read(key.0))
            };
            // Gone already (a short-lived client) or unreadable: its thread's name is the
            // best there is.
            read.filter(|name| !name.is_empty())
                .unwrap_or_else(|| comm_str(&key.1).into_owned())
        })
    }

    fn forget_if_due(&mut self, ts_ns: u64) {
        match self.forget_at_ns {
            Some(at) if ts_ns < at => {}
            Some(_) => {
                self.known.clear();
                self.recent_valid = [false; 2];
                self.forget_at_ns = Some(ts_ns.saturating_add(FORGET_AFTER_NS));
            }
            None => self.forget_at_ns = Some(ts_ns.saturating_add(FORGET_AFTER_NS)),
        }
    }

    /// Drops names of pids that may have been reused: called once a tick, so the per-record
    /// path never looks at the clock. (A `recent` hit bypasses [`ProcessNames::slot`]'s
    /// check, so expiry must reach it from here too.)
    pub fn tick(&mut self, now_ns: u64) {
        if self.forget_at_ns.is_some_and(|at| now_ns >= at) {
            self.forget_if_due(now_ns);
        }
    }
}

/// /proc/<pid>/comm without its newline.
fn read_proc_comm(pid: u32) -> Option<String> {
    let mut name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    name.truncate(name.trim_end_matches('\n').len());
    Some(name)
}

/// Whether /proc shows the initial pid namespace, whose pids the kernel programs report. Its
/// inode number is fixed (`PROC_PID_INIT_INO`).
fn sees_kernel_pids() -> bool {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    std::fs::read_link("/proc/self/ns/pid")
        .map(|link| link.to_string_lossy() == format!("pid:[{PROC_PID_INIT_INO}]"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn raw(name: &str) -> [u8; COMM_LEN] {
        let mut raw = [0u8; COMM_LEN];
        raw[..name.len()].copy_from_slice(name.as_bytes());
        raw
    }

    type FakeProc = Arc<Mutex<Vec<(u32, String)>>>;

    /// A /proc of the given (pid, name)s, which the test may change.
    fn fake_proc(processes: &[(u32, &str)]) -> (ProcessNames, FakeProc) {
        let table = Arc::new(Mutex::new(
            processes
                .iter()
                .map(|&(pid, name)| (pid, name.to_string()))
                .collect::<Vec<_>>(),
        ));
        let read = table.clone();
        let names = ProcessNames::new(Some(Box::new(move |pid| {
            read.lock()
                .unwrap()
                .iter()
                .find(|(p, _)| *p == pid)
                .map(|(_, name)| name.clone())
        })));
        (names, table)
    }

    fn name_of(names: &mut ProcessNames, pid: u32, thread: &str, ts_ns: u64) -> String {
        let slot = names.slot(pid, &raw(thread), ts_ns);
        names.name(slot).to_string()
    }

    #[test]
    fn a_worker_thread_is_named_by_its_process() {
        let (mut names, _) = fake_proc(&[(100, "memcached"), (200, "python3")]);
        assert_eq!(name_of(&mut names, 100, "mc-worker", 0), "memcached");
        assert_eq!(name_of(&mut names, 200, "python3", 1), "python3");
        assert_eq!(name_of(&mut names, 100, "mc-worker", 2), "memcached");
        // Another thread of the same process: the same name.
        assert_eq!(name_of(&mut names, 100, "memcached", 3), "memcached");
    }

    #[test]
    fn a_process_gone_from_proc_keeps_its_thread_name() {
        let (mut names, _) = fake_proc(&[]);
        assert_eq!(name_of(&mut names, 300, "mc-worker", 0), "mc-worker");
        // No /proc at all (another pid namespace), and the idle task's pid 0.
        let mut names = ProcessNames::new(None);
        assert_eq!(name_of(&mut names, 100, "mc-worker", 0), "mc-worker");
        let (mut names, _) = fake_proc(&[(0, "init?")]);
        assert_eq!(name_of(&mut names, 0, "swapper/1", 0), "swapper/1");
    }

    #[test]
    fn a_reused_pid_gets_its_new_name_after_the_names_expire() {
        let (mut names, table) = fake_proc(&[(100, "memcached")]);
        assert_eq!(name_of(&mut names, 100, "worker", 0), "memcached");
        table.lock().unwrap()[0].1 = "nutcracker".to_string();
        // Still trusted (and found among the recent pairs without a read).
        assert_eq!(name_of(&mut names, 100, "worker", 1_000), "memcached");
        names.tick(FORGET_AFTER_NS + 1);
        assert_eq!(
            name_of(&mut names, 100, "worker", FORGET_AFTER_NS + 2),
            "nutcracker"
        );
    }

    #[test]
    fn many_processes_are_forgotten_rather_than_kept() {
        let (mut names, _) = fake_proc(&[]);
        for pid in 1..=(MAX_PROCESSES as u32 + 10) {
            name_of(&mut names, pid, "client", 0);
        }
        assert!(names.known.len() <= MAX_PROCESSES, "{}", names.known.len());
        assert_eq!(name_of(&mut names, 5, "client", 0), "client");
    }

    #[test]
    fn reads_proc_once_per_process_and_thread() {
        let reads = Arc::new(Mutex::new(0u32));
        let counted = reads.clone();
        let mut names = ProcessNames::new(Some(Box::new(move |pid| {
            *counted.lock().unwrap() += 1;
            Some(format!("p{pid}"))
        })));
        for i in 0..100u64 {
            // Three processes in turn: more than the two recent slots hold.
            let pid = 1 + (i % 3) as u32;
            assert_eq!(name_of(&mut names, pid, "t", i), format!("p{pid}"));
        }
        assert_eq!(*reads.lock().unwrap(), 3);
    }

    #[test]
    fn this_process_is_named_from_proc() {
        // The test runner's own pid, read through the real /proc.
        let pid = std::process::id();
        let expected = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(read_proc_comm(pid).as_deref(), Some(expected.trim_end()));
        assert_eq!(read_proc_comm(u32::MAX), None);
    }
}
