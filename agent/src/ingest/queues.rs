//! The pipeline's queue side: feeds the queue flow (enqueues sent, enqueues and dequeues the
//! server answered, enqueues written onto dead connections) and sets the queue metrics.

use crate::{
    conn::{dead_writes::DeadWrite, tracking::Endpoint},
    export::metrics::{Metrics, QueueLostLabels, QueueNameLabels},
    memcache::{QueueOpKind, RequestObservation},
    model::{DeadWriteOutcome, Role},
    queues::flow::{Dequeued, Fingerprint, QueueFlow, QueueReport},
    services::SharedServices,
};

#[derive(Debug, Default)]
pub struct QueueSide {
    flow: QueueFlow,
}

impl QueueSide {
    /// A dead write that enqueued to a queue lost that message.
    pub fn count_lost(&mut self, write: &DeadWrite, services: &SharedServices, metrics: &Metrics) {
        let services = services.load();
        if write.command != Some("set") || !services.is_queue(write.endpoint.service) {
            return;
        }
        let queue = write.queue.as_deref().unwrap_or("unknown").to_string();
        // A noreply enqueue was never answered, written onto a live connection or not: the
        // EOF or reset the producer met next belonged to a later call, and this message's
        // loss went unnoticed whatever it saw.
        let outcome = match write.noreply {
            true => DeadWriteOutcome::Unnoticed,
            false => write.outcome,
        };
        let queue = self.flow.lost(
            write.endpoint.service,
            &queue,
            &write.comm,
            outcome.as_str(),
        );
        metrics
            .queue_messages_lost
            .get_or_create(&QueueLostLabels {
                service: services
                    .name(write.endpoint.service)
                    .unwrap_or_default()
                    .to_string(),
                queue,
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Server-side queue flow: time in queue and relative depth.
    pub fn observe(
        &mut self,
        endpoint: &Endpoint,
        request: &RequestObservation,
        queue: &[u8],
        services: &SharedServices,
        metrics: &Metrics,
    ) {
        let (Some(op), Role::Server) = (request.queue_operation(), endpoint.role) else {
            return;
        };
        let name = String::from_utf8_lossy(queue);
        let fingerprint = Fingerprint {
            len: request.value_len.unwrap_or(0),
            head: request.value_head,
        };
        let delta = match op {
            QueueOpKind::Enqueue => {
                self.flow
                    .enqueued(endpoint.service, &name, fingerprint, request.request_ts_ns);
                1
            }
            QueueOpKind::Dequeue | QueueOpKind::Open => {
                let waited =
                    self.flow
                        .dequeued(endpoint.service, &name, fingerprint, request.request_ts_ns);
                if let Dequeued::Waited(seconds) = waited {
                    metrics
                        .queue_wait
                        .get_or_create(&self.labels(endpoint, &name, services))
                        .observe(seconds);
                }
                -1
            }
            _ => return,
        };
        metrics
            .queue_depth
            .get_or_create(&self.labels(endpoint, &name, services))
            .inc_by(delta);
    }

    fn labels(
        &self,
        endpoint: &Endpoint,
        name: &str,
        services: &SharedServices,
    ) -> QueueNameLabels {
        QueueNameLabels {
            service: services
                .load()
                .name(endpoint.service)
                .unwrap_or_default()
                .to_string(),
            queue: self.flow.label(endpoint.service, name),
        }
    }

    /// Every queue seen, for `diagnose`, at monotonic time `now_ns`; None before any was.
    pub fn reports(&self, now_ns: u64, services: &SharedServices) -> Option<Vec<QueueReport>> {
        (!self.flow.is_empty()).then(|| {
            let services = services.load();
            self.flow
                .reports(now_ns, |service| services.name(service).map(str::to_string))
        })
    }

    /// What did not fit in the flow's tables since the last call.
    pub fn take_overflow(&mut self) -> u64 {
        std::mem::take(&mut self.flow.overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Protocol, Service},
        model::Status,
        services::Services,
    };

    /// One memcache-queue service on port 22133.
    fn queue_on_22133() -> SharedServices {
        SharedServices::new(
            Services::new(&[Service {
                name: "queue".into(),
                ports: vec![22133],
                protocol: Protocol::MemcacheQueue,
                capture: true,
            }])
            .unwrap(),
        )
    }

    /// The server's view of a noreply enqueue is `noreply`, not `stored`: it still enters the
    /// queue (backlog, depth). It was left out, so a producer's unconsumed noreply messages
    /// showed no backlog and no depth.
    #[test]
    fn a_noreply_enqueue_the_server_took_is_in_the_queue() {
        let services = queue_on_22133();
        let (metrics, _) = Metrics::new();
        let mut side = QueueSide::default();
        let server = Endpoint {
            service: 0,
            server: "127.0.0.1:22133".parse().unwrap(),
            role: Role::Server,
        };
        for status in [Status::Noreply, Status::Stored] {
            let request = RequestObservation {
                status,
                latency_ns: None,
                response_bytes: 0,
                queue: Some(crate::memcache::QueueOp {
                    op: QueueOpKind::Enqueue,
                    options: Default::default(),
                }),
                value_len: Some(5),
                ..RequestObservation::stored_set(1_000)
            };
            side.observe(&server, &request, b"jobs", &services, &metrics);
        }
        let reports = side.reports(2_000, &services).unwrap();
        assert_eq!(reports[0].enqueued, 2);
    }

    /// A fire-and-forget enqueue (pymemcache sets noreply by default) onto a dead connection
    /// is lost unnoticed even when the producer read EOF next: that EOF answered a later call.
    /// An enqueue that waited for its answer and met EOF could have been retried.
    #[test]
    fn a_noreply_enqueue_lost_is_unnoticed_whatever_came_next() {
        let services = queue_on_22133();
        let (metrics, _) = Metrics::new();
        let mut side = QueueSide::default();
        let write = |noreply: bool| DeadWrite {
            sk: 1,
            endpoint: Endpoint {
                service: 0,
                server: "127.0.0.1:22133".parse().unwrap(),
                role: Role::Client,
            },
            comm: "producer".into(),
            pid: 7,
            ts_ns: 0,
            bytes: 30,
            command: Some("set"),
            queue: Some("jobs".into()),
            noreply,
            outcome: DeadWriteOutcome::Eof,
        };
        side.count_lost(&write(true), &services, &metrics);
        side.count_lost(&write(false), &services, &metrics);
        let reports = side.reports(0, &services).unwrap();
        let mut lost: Vec<(String, u64)> = reports[0]
            .lost
            .iter()
            .map(|l| (l.outcome.clone(), l.count))
            .collect();
        lost.sort();
        assert_eq!(lost, [("eof".to_string(), 1), ("unnoticed".to_string(), 1)]);
    }
}
