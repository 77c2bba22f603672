//! The pipeline's queue side: feeds the queue flow (enqueues sent, enqueues and dequeues the
//! server answered, enqueues written onto dead connections) and sets the queue metrics.

use crate::{
    conn::{dead_writes::DeadWrite, tracking::Endpoint},
    export::metrics::{Metrics, QueueLostLabels, QueueNameLabels},
    memcache::{QueueOpKind, RequestObservation},
    model::{Role, Status},
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
        let queue = self.flow.lost(
            write.endpoint.service,
            &queue,
            &write.comm,
            write.outcome.as_str(),
        );
        metrics
            .queue_messages_lost
            .get_or_create(&QueueLostLabels {
                service: services
                    .name(write.endpoint.service)
                    .unwrap_or_default()
                    .to_string(),
                queue,
                outcome: write.outcome.as_str(),
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
        let (Some(op), Role::Server) = (request.queue, endpoint.role) else {
            return;
        };
        let name = String::from_utf8_lossy(queue);
        let fingerprint = Fingerprint {
            len: request.value_len.unwrap_or(0),
            head: request.value_head,
        };
        let delta = match (op.op, request.status) {
            (QueueOpKind::Enqueue, Status::Stored) => {
                self.flow
                    .enqueued(endpoint.service, &name, fingerprint, request.request_ts_ns);
                1
            }
            (QueueOpKind::Dequeue | QueueOpKind::Open, Status::Hit) => {
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
