//! Measures the history's real heap use with a counting allocator (its own test binary, so no
//! other test allocates concurrently) and checks `History::heap_bytes` does not under-report.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use cacheprobe::history::{Fact, History, HistoryLimits, OPEN_SECONDS};

use cacheprobe::model::{Role, Status};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn request(server: usize, comm: &str, command: &str, status: Status, us: u32) -> Fact {
    Fact::Request {
        service: "memcached".into(),
        server: format!("10.0.0.{server}:11211"),
        role: Role::Client,
        comm: Some(comm.into()),
        command: command.into(),
        status,
        latency_us: Some(us),
    }
}

fn measure(fill: impl FnOnce(&mut History), limits: HistoryLimits) -> (usize, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut history = History::new(limits.capacity_seconds, limits);
    fill(&mut history);
    let measured = LIVE.load(Ordering::Relaxed) - before;
    let estimated = history.heap_bytes();
    drop(history);
    (measured, estimated)
}

#[test]
fn realistic_and_flood_footprints() {
    const T0: u64 = 1_700_000_000;
    let (measured, estimated) = measure(
        |history| {
            for t in 0..900u64 {
                for server in 0..10 {
                    for comm in ["php-fpm", "ruby", "python3"] {
                        for command in ["get", "set", "delete", "gets", "incr"] {
                            for status in [Status::Hit, Status::Miss] {
                                let us = 80 + ((t as u32 * 7 + server as u32 * 13) % 2000);
                                history.record(T0 + t, request(server, comm, command, status, us));
                            }
                        }
                    }
                }
            }
            history.advance_to(T0 + 900 + OPEN_SECONDS);
        },
        HistoryLimits::default(),
    );
    eprintln!("realistic 900 s x 10 servers x 5 commands x 3 comms: measured {measured} B, estimated {estimated} B");
    assert!(measured < 8 << 20, "{measured}");
    assert!(
        estimated as f64 >= measured as f64 * 0.8,
        "estimate {estimated} far below measured {measured}"
    );

    let limits = HistoryLimits::default();
    let bound = History::worst_case_bytes(&limits);
    let (measured, estimated) = measure(
        |history| {
            for t in 0..400u64 {
                for i in 0..3000u64 {
                    let n = t * 3000 + i;
                    history.record(
                        T0 + t,
                        Fact::Request {
                            service: "memcached".into(),
                            server: format!("10.{}.{}.1:11211", n % 250, n / 250 % 250),
                            role: Role::Client,
                            comm: Some(format!("p{n}")),
                            command: format!("c{}", n % 50),
                            status: Status::Hit,
                            latency_us: Some((n % 100_000) as u32),
                        },
                    );
                }
            }
        },
        limits,
    );
    eprintln!("flood of distinct labels, 400 s x 3000 facts: measured {measured} B, estimated {estimated} B, bound {bound} B");
    assert!(
        measured <= bound,
        "measured {measured} above the bound {bound}"
    );
}
