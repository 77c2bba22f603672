//! Detector: memcache-queue messages lost on connections the queue server had closed (naming
//! the producer process and queue), and queues whose consumers fell behind.

use super::{DiagnoseThresholds, Finding, Severity};
use crate::{history::HistorySnapshot, queues::flow::QueueReport};

fn outcome_words(outcome: &str) -> &'static str {
    match outcome {
        "unnoticed" => {
            "no error reached the producer for them (or they were sent noreply): silently lost"
        }
        "eof" => "the producer then read EOF (it could have retried)",
        "reset" => "the producer then got a reset (it could have retried)",
        "unknown" => {
            "what the producer saw next is not known on this kernel (no send/receive tracepoints)"
        }
        _ => "outcome unknown",
    }
}

pub fn detect(
    snapshot: &HistorySnapshot,
    thresholds: &DiagnoseThresholds,
    findings: &mut Vec<Finding>,
) {
    for queue in &snapshot.queues {
        let lost: u64 = queue.lost.iter().map(|l| l.count).sum();
        if lost > 0 {
            findings.push(messages_lost(queue, lost));
        }
        let backlog = queue.enqueued.saturating_sub(queue.dequeued);
        match queue.oldest_waiting_s {
            Some(age) if age >= thresholds.queue_backlog_s && backlog > 0 => {
                findings.push(queue_backlog(queue, age, backlog));
            }
            _ => {}
        }
    }
}

fn messages_lost(queue: &QueueReport, lost: u64) -> Finding {
    let unnoticed: u64 = queue
        .lost
        .iter()
        .filter(|l| l.outcome == "unnoticed")
        .map(|l| l.count)
        .sum();
    let mut finding = Finding::new(
        "queue-messages-lost",
        if unnoticed > 0 {
            Severity::Critical
        } else {
            Severity::Warning
        },
        format!(
            "{lost} message(s) to queue {} ({}) were written onto connections the queue \
             server had already closed",
            queue.queue, queue.service
        ),
    );
    for l in &queue.lost {
        finding.evidence.push(format!(
            "{} enqueue(s) by {}: {}",
            l.count,
            l.process,
            outcome_words(&l.outcome)
        ));
        if !finding.subjects.processes.contains(&l.process) {
            finding.subjects.processes.push(l.process.clone());
        }
    }
    finding
        .evidence
        .push("counted since the agent started (not only in the diagnosed window)".to_string());
    finding.advice = "The queue server closed these producers' idle connections and \
                      their next enqueue went nowhere. Make producers reconnect after \
                      idling (a client idle timeout below the server's) and check the \
                      reply of every enqueue, retrying on EOF or reset."
        .to_string();
    finding.value("lost", lost as f64);
    finding.value("lost_unnoticed", unnoticed as f64);
    finding.subjects.services.push(queue.service.clone());
    finding.magnitude = lost as f64;
    finding
}

fn queue_backlog(queue: &QueueReport, age: f64, backlog: u64) -> Finding {
    let mut finding = Finding::new(
        "queue-backlog",
        Severity::Warning,
        format!(
            "consumers of queue {} ({}) fell behind: the oldest message has waited \
             {age:.0} s",
            queue.queue, queue.service
        ),
    );
    finding.evidence.push(format!(
        "{} enqueued and {} dequeued since the agent started ({backlog} more in \
         than out; messages queued before the agent started are not counted)",
        queue.enqueued, queue.dequeued
    ));
    finding.advice = "Check that the queue's consumers run and keep up (their \
                      process, their connections to the queue server, their error \
                      logs); add consumers if the enqueue rate outgrew them."
        .to_string();
    finding.value("oldest_waiting_s", age);
    finding.value("depth_relative", backlog as f64);
    finding.subjects.services.push(queue.service.clone());
    finding.magnitude = age;
    finding
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queues::flow::QueueFlow;

    const S: u64 = 1_000_000_000;

    fn snapshot(flow: &QueueFlow, now_s: u64) -> HistorySnapshot {
        HistorySnapshot {
            queues: flow.reports(now_s * S, |_| Some("starling".to_string())),
            ..HistorySnapshot::default()
        }
    }

    #[test]
    fn names_the_producer_and_queue_that_lost_messages() {
        let mut flow = QueueFlow::default();
        flow.lost(0, "jobs", "producer", "unnoticed");
        flow.lost(0, "jobs", "producer", "unnoticed");
        flow.lost(0, "jobs", "cron", "eof");
        let mut findings = Vec::new();
        detect(
            &snapshot(&flow, 1),
            &DiagnoseThresholds::default(),
            &mut findings,
        );
        assert_eq!(findings.len(), 1, "{findings:?}");
        let f = &findings[0];
        assert_eq!(
            (f.id.as_str(), f.severity),
            ("queue-messages-lost", Severity::Critical)
        );
        assert!(
            f.title.contains("3 message(s) to queue jobs"),
            "{}",
            f.title
        );
        assert_eq!(f.subjects.processes, ["cron", "producer"]);
        assert!(
            f.evidence[1].contains("2 enqueue(s) by producer: no error"),
            "{f:?}"
        );
        assert_eq!(f.values["lost_unnoticed"], 2.0);
    }

    #[test]
    fn reports_a_queue_whose_oldest_message_waits_too_long() {
        let fp5 = || crate::queues::flow::Fingerprint { len: 5, head: None };
        let mut flow = QueueFlow::default();
        flow.enqueued(0, "mail", fp5(), S);
        flow.enqueued(0, "mail", fp5(), 2 * S);
        flow.enqueued(0, "fast", fp5(), 2 * S);
        flow.dequeued(0, "fast", fp5(), 3 * S);
        let th = DiagnoseThresholds::default();
        let mut findings = Vec::new();
        // 30 s after the first enqueue: below the default 60 s.
        detect(&snapshot(&flow, 31), &th, &mut findings);
        assert!(findings.is_empty(), "{findings:?}");
        detect(&snapshot(&flow, 100), &th, &mut findings);
        assert_eq!(findings.len(), 1, "{findings:?}");
        let f = &findings[0];
        assert_eq!(f.id, "queue-backlog");
        assert!(f.title.contains("queue mail"), "{}", f.title);
        assert_eq!(f.values["oldest_waiting_s"], 99.0);
        assert_eq!(f.values["depth_relative"], 2.0);
    }
}
