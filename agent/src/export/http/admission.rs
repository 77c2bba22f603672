//! Who may hold a /metrics connection: a total cap, a cap per source address, and, when the total cap is hit, eviction of a connection that is still waiting for its request head.
//!
//! A connection that has not sent a complete request head yet costs the attacker nothing, so
//! at the total cap the newcomer wins over a waiting connection: first from sources that have
//! not had a request admitted in the last 10 minutes, then from the source holding the most
//! waiting connections, then the oldest. A scraper that sends its request right after connecting
//! (Prometheus does) therefore cannot be locked out by any number of idle or slow connections,
//! and one source can never hold more than its share of the slots.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::{Notify, OwnedSemaphorePermit};

/// Bounds on /metrics connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once, whatever their state.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_per_source: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 32,
            max_per_source: 8,
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source already holds `max_per_source` connections.
    PerSource,
    /// `max_connections` are open and every one of them is already being answered.
    Full,
}

#[derive(Debug)]
struct Slot {
    source: IpAddr,
    /// Still waiting for its request head (and TLS handshake): evictable.
    waiting: bool,
    scraping: bool,
    /// Holds one of the scrape permits, and since when its response has been ready to send.
    permit: Option<Option<Instant>>,
    evict: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Source {
    connections: usize,
    waiting: usize,
    scraping: usize,
}

/// Sources remembered as having sent a complete, admitted request recently.
const MAX_TRUSTED_SOURCES: usize = 256;
const TRUST_WINDOW: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// Ordered by id, so by age.
    slots: BTreeMap<u64, Slot>,
    sources: HashMap<IpAddr, Source>,
    /// When each source last had a request admitted (auth passed): its connections are
    /// evicted only after those of sources that never completed one, such as a flood of
    /// half-open connections or half-sent TLS handshakes.
    trusted: HashMap<IpAddr, Instant>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        if let Some(source) = self.sources.get_mut(&slot.source) {
            source.connections -= 1;
            source.waiting -= slot.waiting as usize;
            source.scraping -= slot.scraping as usize;
            if source.connections == 0 {
                self.sources.remove(&slot.source);
            }
        }
        Some(slot)
    }

    fn is_trusted(&self, source: &IpAddr) -> bool {
        self.trusted
            .get(source)
            .is_some_and(|since| since.elapsed() < TRUST_WINDOW)
    }

    /// The waiting connection to give up for a newcomer: one from a source without a recent
    /// admitted request if there is any, then from the source with the most waiting
    /// connections, then the oldest.
    fn victim(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter(|(_, slot)| slot.waiting)
            .map(|(&id, slot)| {
                let waiting = self.sources.get(&slot.source).map_or(0, |s| s.waiting);
                (
                    !self.is_trusted(&slot.source),
                    waiting,
                    std::cmp::Reverse(id),
                )
            })
            .max()
            .map(|(_, _, std::cmp::Reverse(id))| id)
    }

    fn trust(&mut self, source: IpAddr) {
        self.trusted.insert(source, Instant::now());
        if self.trusted.len() > MAX_TRUSTED_SOURCES {
            if let Some(oldest) = self
                .trusted
                .iter()
                .min_by_key(|(_, since)| **since)
                .map(|(source, _)| *source)
            {
                self.trusted.remove(&oldest);
            }
        }
    }
}

/// The table of open /metrics connections.
#[derive(Debug)]
pub struct Admission {
    limits: ConnectionLimits,
    table: Mutex<Table>,
}

/// A connection let in: [`Admitted::evicted`] says whether another one was closed for it.
#[derive(Debug)]
pub struct Admitted {
    pub ticket: Ticket,
    pub evicted: bool,
}

impl Admission {
    pub fn new(limits: ConnectionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            table: Mutex::default(),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Every update leaves the table consistent before it can panic, so a poisoned lock
        // still guards a usable table.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Lets a connection from `source` in, or says why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refusal> {
        let mut table = self.table();
        if table
            .sources
            .get(&source)
            .is_some_and(|s| s.connections >= self.limits.max_per_source)
        {
            return Err(Refusal::PerSource);
        }
        let mut evicted = false;
        if table.slots.len() >= self.limits.max_connections {
            let victim = table.victim().ok_or(Refusal::Full)?;
            if let Some(slot) = table.remove(victim) {
                // notify_one stores the wake-up if the task is not waiting on it yet.
                slot.evict.notify_one();
                evicted = true;
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let evict = Arc::new(Notify::new());
        table.slots.insert(
            id,
            Slot {
                source,
                waiting: true,
                scraping: false,
                permit: None,
                evict: evict.clone(),
            },
        );
        let entry = table.sources.entry(source).or_default();
        entry.connections += 1;
        entry.waiting += 1;
        Ok(Admitted {
            ticket: Ticket {
                admission: self.clone(),
                id,
                evict,
                scrape_permit: Mutex::new(None),
            },
            evicted,
        })
    }

    pub fn open_connections(&self) -> usize {
        self.table().slots.len()
    }
}

/// One admitted connection; dropping it frees its slot.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    evict: Arc<Notify>,
    /// Held until the connection ends, i.e. until the body is written: it bounds how many
    /// encoded bodies exist, not just how many encodes run.
    scrape_permit: Mutex<Option<Arc<OwnedSemaphorePermit>>>,
}

impl Ticket {
    /// Resolves when the slot was given to a newcomer.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// The request head has arrived: the connection is no longer evictable. False if it was
    /// evicted already.
    pub fn head_complete(&self) -> bool {
        let mut table = self.admission.table();
        let Some(slot) = table.slots.get_mut(&self.id) else {
            return false;
        };
        if !slot.waiting {
            return true;
        }
        slot.waiting = false;
        let source = slot.source;
        if let Some(source) = table.sources.get_mut(&source) {
            source.waiting -= 1;
        }
        true
    }

    /// The request passed authentication: its source's connections are evicted last.
    pub fn admitted_request(&self) {
        let mut table = self.admission.table();
        if let Some(source) = table.slots.get(&self.id).map(|slot| slot.source) {
            table.trust(source);
        }
    }

    /// Claims the one scrape a source may have in flight; false if its source already has one
    /// (so a source that never reads its responses holds at most one encoded body).
    pub fn start_scrape(&self) -> bool {
        let mut table = self.admission.table();
        let Some(slot) = table.slots.get(&self.id) else {
            return false;
        };
        if slot.scraping {
            return true;
        }
        let source = slot.source;
        let Some(counts) = table.sources.get_mut(&source) else {
            return false;
        };
        if counts.scraping >= 1 {
            return false;
        }
        counts.scraping += 1;
        if let Some(slot) = table.slots.get_mut(&self.id) {
            slot.scraping = true;
        }
        true
    }

    /// Keeps a scrape permit until the connection ends.
    pub fn hold(&self, permit: Arc<OwnedSemaphorePermit>) {
        *self
            .scrape_permit
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(permit);
        if let Some(slot) = self.admission.table().slots.get_mut(&self.id) {
            slot.permit = Some(None);
        }
    }

    /// The response is encoded and being written: from now on a client that does not take it
    /// can lose its permit to a waiting scrape.
    pub fn response_ready(&self) {
        if let Some(slot) = self.admission.table().slots.get_mut(&self.id) {
            if slot.permit.is_some() {
                slot.permit = Some(Some(Instant::now()));
            }
        }
    }

    /// Closes the connection that has held a scrape permit with a ready response for longest,
    /// if that is over `grace`: its client is not reading, and this one waits for the permit.
    pub fn preempt_stalled_scrape(&self, grace: Duration) -> bool {
        let mut table = self.admission.table();
        let victim = table
            .slots
            .iter()
            .filter_map(|(&id, slot)| Some((slot.permit??, id)))
            .filter(|(ready, _)| ready.elapsed() > grace)
            .min()
            .map(|(_, id)| id);
        match victim.and_then(|id| table.remove(id)) {
            Some(slot) => {
                slot.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.table().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn admission(max_connections: usize, max_per_source: usize) -> Arc<Admission> {
        Admission::new(ConnectionLimits {
            max_connections,
            max_per_source,
        })
    }

    #[test]
    fn one_source_gets_at_most_its_share() {
        let admission = admission(32, 3);
        let held: Vec<_> = (0..3)
            .map(|_| admission.admit(ip(2)).unwrap().ticket)
            .collect();
        assert_eq!(admission.admit(ip(2)).unwrap_err(), Refusal::PerSource);
        // Another source is unaffected.
        let other = admission.admit(ip(1)).unwrap();
        assert!(!other.evicted);
        drop(held);
        assert_eq!(admission.open_connections(), 1);
        assert!(admission.admit(ip(2)).is_ok());
    }

    #[test]
    fn at_the_cap_the_busiest_sources_oldest_waiting_connection_makes_room() {
        let admission = admission(4, 3);
        let a1 = admission.admit(ip(2)).unwrap().ticket;
        let a2 = admission.admit(ip(2)).unwrap().ticket;
        let b1 = admission.admit(ip(3)).unwrap().ticket;
        let c1 = admission.admit(ip(4)).unwrap().ticket;
        // ip(2) holds the most waiting connections; a1 is its oldest.
        let newcomer = admission.admit(ip(1)).unwrap();
        assert!(newcomer.evicted);
        assert!(!a1.head_complete(), "a1 should have been evicted");
        assert!(a2.head_complete() && b1.head_complete() && c1.head_complete());
        assert_eq!(admission.open_connections(), 4);
        // The eviction is delivered even though nobody was waiting on it yet.
        let woke = poll_once(a1.evicted());
        assert!(woke, "evicted connection was not told");
        // Dropping the evicted ticket does not free someone else's slot.
        drop(a1);
        assert_eq!(admission.open_connections(), 4);
    }

    #[test]
    fn sources_with_admitted_requests_are_evicted_last() {
        let admission = admission(3, 3);
        let scraper = admission.admit(ip(1)).unwrap().ticket;
        assert!(scraper.head_complete());
        scraper.admitted_request();
        drop(scraper);
        // The scraper's next connection is the oldest waiting one, from the least busy source.
        let scraper = admission.admit(ip(1)).unwrap().ticket;
        let flood: Vec<_> = (2..4)
            .map(|last| admission.admit(ip(last)).unwrap().ticket)
            .collect();
        let mut newcomers = Vec::new();
        for last in 10..20 {
            let admitted = admission.admit(ip(last)).unwrap();
            assert!(admitted.evicted);
            newcomers.push(admitted.ticket);
        }
        assert!(scraper.head_complete(), "the trusted source was evicted");
        assert!(flood.iter().all(|ticket| !ticket.head_complete()));
    }

    #[test]
    fn trust_is_remembered_for_a_bounded_number_of_sources() {
        let admission = admission(1, 1);
        for n in 0..(MAX_TRUSTED_SOURCES as u32 + 10) {
            let ticket = admission
                .admit(IpAddr::from(n.to_be_bytes()))
                .unwrap()
                .ticket;
            ticket.admitted_request();
        }
        assert_eq!(admission.table().trusted.len(), MAX_TRUSTED_SOURCES);
    }

    #[test]
    fn connections_being_answered_are_never_evicted() {
        let admission = admission(2, 2);
        let a = admission.admit(ip(2)).unwrap().ticket;
        let b = admission.admit(ip(3)).unwrap().ticket;
        assert!(a.head_complete() && b.head_complete());
        assert_eq!(admission.admit(ip(4)).unwrap_err(), Refusal::Full);
        drop(a);
        let c = admission.admit(ip(4)).unwrap();
        assert!(!c.evicted);
    }

    #[test]
    fn a_source_has_one_scrape_in_flight() {
        let admission = admission(8, 4);
        let a = admission.admit(ip(2)).unwrap().ticket;
        let b = admission.admit(ip(2)).unwrap().ticket;
        let other = admission.admit(ip(3)).unwrap().ticket;
        assert!(a.start_scrape());
        assert!(
            a.start_scrape(),
            "claiming twice on one connection is idempotent"
        );
        assert!(!b.start_scrape());
        assert!(other.start_scrape());
        drop(a);
        assert!(b.start_scrape(), "the slot is released with its connection");
    }

    #[test]
    fn a_permit_holder_that_does_not_take_its_response_is_preempted() {
        let admission = admission(8, 4);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(2));
        let slow = admission.admit(ip(2)).unwrap().ticket;
        let encoding = admission.admit(ip(3)).unwrap().ticket;
        let waiting = admission.admit(ip(1)).unwrap().ticket;
        slow.hold(Arc::new(semaphore.clone().try_acquire_owned().unwrap()));
        encoding.hold(Arc::new(semaphore.clone().try_acquire_owned().unwrap()));
        slow.response_ready();
        assert!(
            !waiting.preempt_stalled_scrape(Duration::from_millis(50)),
            "within its grace the writer keeps its permit"
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(waiting.preempt_stalled_scrape(Duration::from_millis(50)));
        assert!(poll_once(slow.evicted()));
        assert!(
            !waiting.preempt_stalled_scrape(Duration::from_millis(50)),
            "a connection still encoding is never preempted"
        );
        drop(slow);
        assert!(semaphore.try_acquire().is_ok());
    }

    #[test]
    fn the_table_forgets_sources_that_left() {
        let admission = admission(8, 8);
        for last in 0..=255 {
            let ticket = admission.admit(ip(last)).unwrap().ticket;
            assert!(ticket.start_scrape());
        }
        assert_eq!(admission.open_connections(), 0);
        assert!(admission.table().sources.is_empty());
    }

    /// Polls a future once with a no-op waker; true if it completed.
    fn poll_once(future: impl std::future::Future<Output = ()>) -> bool {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        future.as_mut().poll(&mut cx).is_ready()
    }
}
