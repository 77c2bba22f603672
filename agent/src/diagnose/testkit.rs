//! Synthetic but realistic traffic for detector tests: three memcached servers used by three
//! client programs with a ~90% hit ratio and sub-millisecond latencies, plus the periodic
//! samples the daemon records (fds, connections per process and edge).

use crate::history::{Fact, History, HistoryLimits, HistorySnapshot, RequestRecord};

use crate::model::{Role, Status};

/// 2023-11-14 22:13:00 UTC: a minute boundary, so `T0 + 60k` is second :00.
pub const T0: u64 = 1_699_999_980;
pub const SERVICE: &str = "memcached";
pub const SERVERS: [&str; 3] = ["10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"];
pub const COMMS: [&str; 3] = ["php-fpm", "ruby", "python3"];

pub struct Sim {
    pub history: History,
    rng: u64,
}

impl Sim {
    pub fn new() -> Sim {
        Sim {
            history: History::new(900, HistoryLimits::default()),
            rng: 0x9e3779b97f4a7c15,
        }
    }

    pub fn random(&mut self, below: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % below.max(1)
    }

    pub fn record(&mut self, t: u64, fact: Fact) {
        self.history.record(t, fact);
    }

    pub fn request(
        &mut self,
        t: u64,
        server: &str,
        comm: &str,
        command: &str,
        status: Status,
        latency_us: Option<u32>,
    ) {
        self.record(
            t,
            Fact::Request {
                service: SERVICE.into(),
                server: server.into(),
                role: Role::Client,
                comm: Some(comm.into()),
                command: command.into(),
                status,
                latency_us,
            },
        );
    }

    /// A request answered with an error that said `text`, as the daemon records it.
    #[allow(clippy::too_many_arguments)]
    pub fn error_reply(
        &mut self,
        t: u64,
        (service, server): (&str, &str),
        role: Role,
        comm: &str,
        status: Status,
        text: &str,
        latency_us: u32,
    ) {
        self.history.record_request(
            t,
            &RequestRecord {
                service,
                server,
                role,
                comm: Some(comm),
                command: "get",
                status,
                latency_us: Some(latency_us),
                error_text: Some(text),
            },
        );
    }

    /// A healthy latency: 120-600 us, with one request in 500 taking 2-6 ms.
    pub fn healthy_latency(&mut self) -> u32 {
        if self.random(500) == 0 {
            2000 + self.random(4000) as u32
        } else {
            120 + self.random(480) as u32
        }
    }

    /// One healthy second of traffic to one server from every program.
    pub fn healthy_server_second(&mut self, t: u64, server: &str, hit_per_mille: u64) {
        for comm in COMMS {
            for _ in 0..20 {
                let status = if self.random(1000) < hit_per_mille {
                    Status::Hit
                } else {
                    Status::Miss
                };
                let latency = self.healthy_latency();
                self.request(t, server, comm, "get", status, Some(latency));
            }
            for _ in 0..3 {
                let latency = self.healthy_latency();
                self.request(t, server, comm, "set", Status::Stored, Some(latency));
            }
        }
    }

    /// Healthy traffic on every server for seconds [from, to), with connection pools opened
    /// at the start and samples every 10 seconds.
    pub fn healthy(&mut self, from: u64, to: u64) {
        for t in from..to {
            if t == from {
                self.warm_up(t);
            }
            for server in SERVERS {
                self.healthy_server_second(t, server, 900);
            }
            if (t - from).is_multiple_of(10) {
                self.samples(t);
            }
        }
    }

    fn warm_up(&mut self, t: u64) {
        for comm in COMMS {
            for server in SERVERS {
                self.record(
                    t,
                    Fact::ConnectionOpened {
                        service: SERVICE.into(),
                        server: server.into(),
                        role: Role::Client,
                        comm: Some(comm.into()),
                    },
                );
            }
        }
        self.record(
            t,
            Fact::Syns {
                service: SERVICE.into(),
                direction: crate::model::SynDirection::Out,
                count: 9,
            },
        );
    }

    fn samples(&mut self, t: u64) {
        for (i, comm) in COMMS.iter().enumerate() {
            self.record(
                t,
                Fact::ProcessFds {
                    comm: comm.to_string(),
                    pid: 1000 + i as u32,
                    open_fds: 40 + i as u32,
                    limit: 1024,
                },
            );
            self.record(
                t,
                Fact::ProcessConnections {
                    comm: comm.to_string(),
                    pid: 1000 + i as u32,
                    service: SERVICE.into(),
                    distinct_servers: 3,
                    connections: 3,
                },
            );
            for server in SERVERS {
                self.record(
                    t,
                    Fact::EdgeConnections {
                        service: SERVICE.into(),
                        server: server.into(),
                        role: Role::Client,
                        comm: comm.to_string(),
                        open: 1,
                    },
                );
            }
        }
    }

    pub fn snapshot(&mut self, end: u64) -> HistorySnapshot {
        self.history.advance_to(end);
        self.history.snapshot(0)
    }
}
