//! The soak's churn and idle generators (each on its own thread, counting what it did) and
//! their handles.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::super::idle::{connect_from, source_address};
use super::{CHURN_PER_SECOND, IDLE_PER_SECOND, SOURCES};

/// What the churn and idle generators did, counted by themselves.
#[derive(Default)]
pub(super) struct Counts {
    pub(super) churn_connections: AtomicU64,
    pub(super) churn_gets: AtomicU64,
    pub(super) idle_connections: AtomicU64,
    pub(super) idle_sets: AtomicU64,
    /// Idle connections memcached closed (seen as EOF).
    pub(super) idle_closed_by_peer: AtomicU64,
    pub(super) dead_writes: AtomicU64,
}

fn churn(target: SocketAddrV4, stop: &AtomicBool, counts: &Counts) -> anyhow::Result<()> {
    let mut next = 0usize;
    let mut reply = [0u8; 64];
    let mut tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..CHURN_PER_SECOND {
            let source = source_address(1 + next % SOURCES);
            next += 1;
            let mut stream = connect_from(source, target)?;
            counts.churn_connections.fetch_add(1, Ordering::Relaxed);
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(b"gets churn\r\n")?;
            // A miss is exactly "END\r\n".
            let mut got = 0;
            while got < 5 {
                let n = stream.read(&mut reply[got..])?;
                if n == 0 {
                    bail!("memcached closed a churn connection before answering");
                }
                got += n;
            }
            counts.churn_gets.fetch_add(1, Ordering::Relaxed);
        }
        tick += Duration::from_secs(1);
        if let Some(wait) = tick.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    Ok(())
}

/// Opens IDLE_PER_SECOND connections a second, stores one value on each and waits for memcached
/// to close it; then writes once more (the dead write) and closes. After `stop` it still waits
/// for the open ones, so every connection it counts ends the same way.
fn idle(target: SocketAddrV4, stop: &AtomicBool, counts: &Counts) -> anyhow::Result<()> {
    let mut waiting: Vec<(TcpStream, Instant)> = Vec::new();
    let mut next = 0usize;
    let mut last_open = Instant::now() - Duration::from_secs(1);
    let mut buf = [0u8; 64];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && waiting.is_empty() {
            return Ok(());
        }
        if !stopping && last_open.elapsed() >= Duration::from_secs(1) {
            last_open = Instant::now();
            for _ in 0..IDLE_PER_SECOND {
                let mut stream = connect_from(source_address(1 + next % SOURCES), target)?;
                next += 1;
                counts.idle_connections.fetch_add(1, Ordering::Relaxed);
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(b"set idle 0 0 1\r\nv\r\n")?;
                let n = stream.read(&mut buf)?;
                if !buf[..n].starts_with(b"STORED") {
                    bail!("idle set answered {:?}", String::from_utf8_lossy(&buf[..n]));
                }
                counts.idle_sets.fetch_add(1, Ordering::Relaxed);
                stream.set_nonblocking(true)?;
                waiting.push((stream, Instant::now()));
            }
        }
        let mut index = 0;
        while index < waiting.len() {
            let (stream, since) = &mut waiting[index];
            match stream.read(&mut buf) {
                Ok(0) => {
                    counts.idle_closed_by_peer.fetch_add(1, Ordering::Relaxed);
                    // The application has not noticed the close and writes again, then reads
                    // its answer and meets the reset (the agent reports the write's outcome
                    // with that read, or after 5 s without one).
                    if stream.write(b"version\r\n").is_ok() {
                        counts.dead_writes.fetch_add(1, Ordering::Relaxed);
                        stream.set_nonblocking(false)?;
                        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                        let _ = stream.read(&mut buf);
                    }
                    waiting.swap_remove(index);
                    continue;
                }
                Ok(_) => bail!("memcached sent an idle connection unasked bytes"),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    if since.elapsed() > Duration::from_secs(30) {
                        bail!("memcached did not close an idle connection within 30 s");
                    }
                }
                Err(err) => return Err(err).context("idle connection"),
            }
            index += 1;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The churn and idle generators, each on its own thread until stopped.
pub(super) struct Generators {
    stop: Arc<AtomicBool>,
    pub(super) counts: Arc<Counts>,
    churn: thread::JoinHandle<anyhow::Result<()>>,
    idle: thread::JoinHandle<anyhow::Result<()>>,
}

impl Generators {
    pub(super) fn start(target: SocketAddrV4) -> Generators {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let churn_thread = {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            thread::spawn(move || churn(target, &stop, &counts))
        };
        let idle_thread = {
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            thread::spawn(move || idle(target, &stop, &counts))
        };
        Generators {
            stop,
            counts,
            churn: churn_thread,
            idle: idle_thread,
        }
    }

    /// A generator ended early (it failed).
    pub(super) fn finished(&self) -> bool {
        self.churn.is_finished() || self.idle.is_finished()
    }

    /// Stops and joins both; returns their counts and how they ended.
    pub(super) fn stop(self) -> anyhow::Result<(Arc<Counts>, anyhow::Result<()>)> {
        self.stop.store(true, Ordering::Relaxed);
        let churn_result = self
            .churn
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))?;
        let idle_result = self
            .idle
            .join()
            .map_err(|_| anyhow::anyhow!("idle thread panicked"))?;
        let generated = churn_result
            .context("churn generator")
            .and_then(|()| idle_result.context("idle generator"));
        Ok((self.counts, generated))
    }
}

/// The generators' counts, read once they stopped.
pub(super) struct Counted {
    pub(super) churn_connections: u64,
    pub(super) churn_gets: u64,
    pub(super) idle_connections: u64,
    pub(super) idle_sets: u64,
    pub(super) idle_closed_by_peer: u64,
    pub(super) dead_writes: u64,
}

impl Counts {
    pub(super) fn load(&self) -> Counted {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counted {
            churn_connections: load(&self.churn_connections),
            churn_gets: load(&self.churn_gets),
            idle_connections: load(&self.idle_connections),
            idle_sets: load(&self.idle_sets),
            idle_closed_by_peer: load(&self.idle_closed_by_peer),
            dead_writes: load(&self.dead_writes),
        }
    }
}
