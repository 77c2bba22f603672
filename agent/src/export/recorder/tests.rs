//! The recorder against a real registry: exemplars, contract labels, label budgets, and the
//! whole exposition's label names and order.

use super::*;
use crate::{
    export::encode::{encode, Format},
    model::{ClosedBy, Role},
};
use prometheus_client::registry::Registry;

/// A recorder over a fresh registry, 10 servers and 10 comms per service.
fn new_recorder(services: SharedServices) -> (ObservationRecorder, Registry) {
    let (metrics, registry) = Metrics::new();
    (
        ObservationRecorder::new(metrics, services, 10, 10),
        registry,
    )
}

fn endpoint(server: &str) -> Endpoint {
    Endpoint {
        service: 0,
        server: server.parse().unwrap(),
        role: Role::Client,
    }
}

/// A slow request with a known sequence number leaves its id on its latency bucket (as
/// OpenMetrics exemplar, dropped from text format 0.0.4); fast ones and ones without a
/// number leave none; no more than the budget per second.
#[test]
fn slow_requests_leave_their_id_as_an_exemplar_at_a_bounded_rate() {
    let (mut recorder, registry) = new_recorder(SharedServices::watching(&[("memcached", 11211)]));
    let server = "10.0.0.2:11211";
    let flow =
        crate::model::flow_id("10.0.0.1:40000".parse().unwrap(), server.parse().unwrap()).unwrap();
    let request = |latency_ns: u64, seq: Option<u32>, ts: u64| MemcacheEvent::Request {
        endpoint: endpoint(server),
        request: crate::memcache::RequestObservation {
            command: Command::Get,
            status: Status::Hit,
            key: None,
            latency_ns: Some(latency_ns),
            request_ts_ns: ts,
            request_bytes: 7,
            response_bytes: 20,
            queue: None,
            seq,
            request_id: seq.map(|seq| crate::model::request_id(flow, seq)),
            value_len: Some(10),
            value_head: None,
            keys_in_request: 1,
            error_text: None,
        },
        sample: crate::memcache::decoders::StreamSample::UNSAMPLED,
        pid: 0,
        comm: [0; agent_common::COMM_LEN],
    };
    // No slice here: only slow requests.
    recorder.set_exemplars(ExemplarPolicy {
        sample_one_in: 0,
        ..ExemplarPolicy::default()
    });
    let second = 1_000_000_000;
    recorder.record_memcache(&request(30_000, Some(1), 7 * second), 1);
    recorder.record_memcache(&request(40_000_000, None, 7 * second), 1);
    let text = encode(&registry, Format::OpenMetrics).unwrap();
    assert!(!text.contains("request_id"), "{text}");
    assert!(!text.contains("cacheprobe_exemplars"), "{text}");
    recorder.record_memcache(&request(30_000_000, Some(123_456), 7 * second), 1);
    let text = encode(&registry, Format::OpenMetrics).unwrap();
    assert!(
        !text.contains("cacheprobe_exemplars"),
        "no marker leaves: {text}"
    );
    let id = crate::model::request_id(flow, 123_456);
    let bucket = text
        .lines()
        .find(|line| line.contains("request_id"))
        .expect("an exemplar");
    assert!(
        bucket.starts_with("cacheprobe_memcache_request_duration_seconds_bucket{")
            && bucket.contains("le=\"0.05\"")
            && bucket.ends_with(&format!(" # {{request_id=\"{id:016x}\"}} 0.03")),
        "{bucket}"
    );
    assert_eq!(text.matches("request_id").count(), 1, "{text}");
    let plain = encode(&registry, Format::PrometheusText).unwrap();
    assert!(!plain.contains("request_id"), "{plain}");
    assert!(!plain.contains("cacheprobe_exemplars"), "{plain}");
    assert!(
        plain.contains(&bucket[..bucket.find(" # ").unwrap()]),
        "the sample stays: {plain}"
    );

    // The budget: one exemplar already spent in second 7, the rest up to the limit, then
    // none until the next second.
    let slow = |seq: u32, ts: u64| match request(5_000_000, Some(seq), ts) {
        MemcacheEvent::Request { request, .. } => request,
        _ => unreachable!(),
    };
    let given = (0..2 * EXEMPLARS_PER_SECOND)
        .filter(|&i| {
            let request = slow(i, 7 * second + u64::from(i));
            recorder.exemplar(&request, 5_000_000).is_some()
        })
        .count();
    assert_eq!(given, EXEMPLARS_PER_SECOND as usize - 1);
    let request = slow(9, 8 * second);
    assert!(recorder.exemplar(&request, 5_000_000).is_some());
}

/// Fast requests whose id falls in the fixed slice carry it too (the server's fast side of
/// a request slow only on the network), on a budget of their own; others do not.
#[test]
fn the_sampled_slice_leaves_exemplars_whatever_the_latency() {
    let (mut recorder, _registry) = new_recorder(SharedServices::watching(&[("memcached", 11211)]));
    recorder.set_exemplars(ExemplarPolicy {
        sample_one_in: 10,
        ..ExemplarPolicy::default()
    });
    let flow = crate::model::flow_id(
        "10.0.0.1:40000".parse().unwrap(),
        "10.0.0.2:11211".parse().unwrap(),
    )
    .unwrap();
    let request = |seq: u32, ts: u64| crate::memcache::RequestObservation {
        command: Command::Get,
        status: Status::Hit,
        key: None,
        latency_ns: Some(30_000),
        request_ts_ns: ts,
        request_bytes: 7,
        response_bytes: 20,
        queue: None,
        seq: Some(seq),
        request_id: Some(crate::model::request_id(flow, seq)),
        value_len: Some(10),
        value_head: None,
        keys_in_request: 1,
        error_text: None,
    };
    let second = 1_000_000_000;
    // 100 fast requests in one second: about 10 are in the slice, each has its exemplar.
    let mut in_slice = 0;
    for seq in 0..100u32 {
        let request = request(seq * 7, 3 * second);
        let sliced = crate::model::in_exemplar_slice(request.request_id.unwrap(), 10);
        in_slice += usize::from(sliced);
        assert_eq!(
            recorder.exemplar(&request, 30_000).is_some(),
            sliced,
            "{seq}"
        );
    }
    assert!((3..=20).contains(&in_slice), "{in_slice}");
    // The slice's own budget: past EXEMPLARS_PER_SECOND sampled ones, none this second,
    // while slow ones still have theirs.
    let sampled: Vec<u32> = (0..100_000u32)
        .filter(|seq| crate::model::in_exemplar_slice(crate::model::request_id(flow, *seq), 10))
        .take(2 * EXEMPLARS_PER_SECOND as usize)
        .collect();
    let given = sampled
        .iter()
        .filter(|seq| {
            recorder
                .exemplar(&request(**seq, 4 * second), 30_000)
                .is_some()
        })
        .count();
    assert_eq!(given, EXEMPLARS_PER_SECOND as usize);
    assert!(recorder
        .exemplar(&request(1, 4 * second), 5_000_000)
        .is_some());
}

#[test]
fn close_is_recorded_with_all_contract_labels() {
    let (mut recorder, registry) = new_recorder(SharedServices::watching(&[("memcached", 11211)]));
    recorder.record(&Observation::ConnectionOpened {
        endpoint: endpoint("127.0.0.1:11211"),
        ts_ns: 0,
    });
    recorder.record(&Observation::ConnectionClosed {
        endpoint: endpoint("127.0.0.1:11211"),
        closed_by: ClosedBy::Peer,
        ts_ns: 0,
        duration_ns: Some(3_000_000_000),
        idle_before_close_ns: Some(2_500_000_000),
    });
    let text = encode(&registry, Format::OpenMetrics).unwrap();
    let labels = r#"service="memcached",server="127.0.0.1:11211",role="client""#;
    assert!(
        text.contains(&format!(
            "cacheprobe_connections_opened_total{{{labels}}} 1"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("cacheprobe_connections_active{{{labels}}} 0")),
        "{text}"
    );
    assert!(text.contains(&format!(
        "cacheprobe_connections_closed_total{{{labels},closed_by=\"peer\"}} 1"
    )));
    assert!(text.contains(&format!(
        "cacheprobe_connection_idle_before_close_seconds_bucket{{le=\"5.0\",{labels},closed_by=\"peer\"}} 1"
    )) || text.contains(&format!(
        "cacheprobe_connection_idle_before_close_seconds_bucket{{{labels},closed_by=\"peer\",le=\"5.0\"}} 1"
    )), "{text}");
    assert!(text.contains("cacheprobe_build_info{version=\""), "{text}");
    assert!(
        text.contains("cacheprobe_events_lost_total{source=\"ringbuf\"} 0"),
        "{text}"
    );
}

/// Every family the recorder writes, fed one of each observation, encoded: label names, their
/// order and their values must stay byte for byte what alert rules and dashboards match
/// (packaging/). The expected text was taken from the recorder before its label sets were
/// given one home each; `CACHEPROBE_BLESS=1` rewrites it after a deliberate change.
#[test]
fn exposition_keeps_every_family_label_order() {
    use crate::{
        conn::dead_writes::DeadWrite,
        memcache::{DecodeErrorReason, Key, QueueOp, QueueOpKind, RequestObservation},
        model::{ConnectFailureReason, DeadWriteOutcome, ResetDirection, RetransmitKind},
    };
    let (mut recorder, registry) = new_recorder(SharedServices::watching(&[
        ("memcached", 11211),
        ("starling", 22133),
    ]));
    let client = endpoint("127.0.0.1:11211");
    let server = Endpoint {
        service: 1,
        server: "10.0.0.9:22133".parse().unwrap(),
        role: Role::Server,
    };
    recorder.record(&Observation::ConnectionOpened {
        endpoint: client,
        ts_ns: 0,
    });
    recorder.record(&Observation::ConnectionAdopted { endpoint: server });
    recorder.record(&Observation::ConnectionClosed {
        endpoint: client,
        closed_by: ClosedBy::Peer,
        ts_ns: 0,
        duration_ns: Some(3_000_000_000),
        idle_before_close_ns: Some(2_500_000_000),
    });
    recorder.record(&Observation::DeadSocketWrite(DeadWrite {
        sk: 1,
        endpoint: client,
        comm: "python3".into(),
        pid: 7,
        ts_ns: 0,
        bytes: 30,
        command: Some("set"),
        queue: None,
        noreply: false,
        outcome: DeadWriteOutcome::Eof,
    }));
    recorder.record(&Observation::ConnectFailed {
        endpoint: client,
        reason: ConnectFailureReason::Refused,
    });
    recorder.record(&Observation::Retransmit {
        endpoint: server,
        kind: RetransmitKind::Syn,
    });
    recorder.record(&Observation::Reset {
        endpoint: client,
        direction: ResetDirection::Received,
    });
    recorder.record(&Observation::SynSent { service: 0 });
    recorder.record(&Observation::HandshakeCompleted { service: 1 });
    recorder.record(&Observation::FdExhausted {
        comm: "nutcracker".into(),
        syscall: "accept4",
        errno: 24,
    });
    recorder.record(&Observation::TrackingDropped);
    let request =
        |endpoint: Endpoint, command, status, queue: Option<QueueOp>| MemcacheEvent::Request {
            endpoint,
            request: RequestObservation {
                command,
                status,
                key: Some(Key::new(b"jobs", 250, false)),
                latency_ns: Some(2_000_000),
                request_ts_ns: 0,
                request_bytes: 7,
                response_bytes: 20,
                queue,
                seq: None,
                request_id: None,
                value_len: Some(10),
                value_head: None,
                keys_in_request: 1,
                error_text: None,
            },
            sample: crate::memcache::decoders::StreamSample::UNSAMPLED,
            pid: 0,
            comm: [0; agent_common::COMM_LEN],
        };
    recorder.record_memcache(&request(client, Command::Get, Status::Hit, None), 1);
    let enqueue = QueueOp {
        op: QueueOpKind::Enqueue,
        options: Default::default(),
    };
    recorder.record_memcache(
        &request(server, Command::Set, Status::Stored, Some(enqueue)),
        2,
    );
    recorder.record_memcache(
        &MemcacheEvent::DecodeError {
            service: 0,
            reason: DecodeErrorReason::Garbage,
        },
        1,
    );
    for sent in [true, false] {
        recorder.record_memcache(
            &MemcacheEvent::Bytes {
                endpoint: client,
                sent,
                bytes: 100,
            },
            1,
        );
    }
    recorder.record_key_split(0);
    recorder.publish_ring_views(unix_now());

    // Series order within a family is a hash map's; host_info names this machine.
    let text = encode(&registry, Format::PrometheusText).unwrap();
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with("cacheprobe_host_info{"))
        .collect();
    lines.sort_unstable();
    let actual = lines.join("\n") + "\n";
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/export/testdata/recorder_exposition.txt"
    );
    if std::env::var_os("CACHEPROBE_BLESS").is_some() {
        std::fs::write(path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(path).unwrap();
    assert_eq!(actual, expected);
}

#[test]
fn server_labels_are_bounded_per_service() {
    let mut budget = LabelBudget::new(2);
    assert_eq!(budget.admit(0, "a".into()), "a");
    assert_eq!(budget.admit(0, "b".into()), "b");
    assert_eq!(budget.admit(0, "c".into()), OVERFLOW_LABEL);
    assert_eq!(budget.admit(0, "a".into()), "a");
    assert_eq!(budget.admit(1, "c".into()), "c");
    assert_eq!(budget.folded, 1);
}

/// A blocking queue fetch (`get jobs/t=1000`) is counted as a request, a queue operation and a
/// blocking fetch, but its wait stays out of the latency histogram; a plain fetch is observed.
#[test]
fn blocking_queue_fetches_stay_out_of_the_latency_histogram() {
    use crate::memcache::{KestrelOptions, Key, QueueOp, QueueOpKind};
    let (mut recorder, registry) = new_recorder(SharedServices::watching(&[("kestrel", 22133)]));
    let fetch = |timeout_ms| MemcacheEvent::Request {
        endpoint: endpoint("10.0.0.9:22133"),
        request: RequestObservation {
            command: Command::Get,
            status: Status::Miss,
            key: Some(Key::new(b"jobs", 250, false)),
            latency_ns: Some(1_000_000_000),
            request_ts_ns: 0,
            request_bytes: 17,
            response_bytes: 5,
            queue: Some(QueueOp {
                op: QueueOpKind::EmptyPoll,
                options: KestrelOptions {
                    timeout_ms,
                    ..KestrelOptions::default()
                },
            }),
            seq: None,
            request_id: None,
            value_len: None,
            value_head: None,
            keys_in_request: 1,
            error_text: None,
        },
        sample: crate::memcache::decoders::StreamSample::UNSAMPLED,
        pid: 0,
        comm: [0; agent_common::COMM_LEN],
    };
    for _ in 0..3 {
        recorder.record_memcache(&fetch(Some(1000)), 1);
    }
    recorder.record_memcache(&fetch(None), 1);
    let text = encode(&registry, Format::PrometheusText).unwrap();
    let value = |prefix: &str| -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next())
            .collect()
    };
    assert_eq!(
        value("cacheprobe_memcache_request_duration_seconds_count{"),
        ["1"],
        "{text}"
    );
    assert_eq!(
        value("cacheprobe_memcache_requests_total{"),
        ["4"],
        "{text}"
    );
    assert_eq!(
        value("cacheprobe_queue_blocking_fetches_total{"),
        ["3"],
        "{text}"
    );
    assert!(text.contains(
        "cacheprobe_queue_blocking_fetches_total{service=\"kestrel\",server=\"10.0.0.9:22133\",role=\"client\",queue=\"jobs\",op=\"empty_poll\"} 3"
    ), "{text}");
}

/// A producer and a queue server on one host: each end counts its own operations under its
/// role (one series for both added up to twice the enqueues), and only what the queue did.
/// An enqueue refused (not_stored, error) or never answered, or a fetch that timed out, is a
/// request by status, not an operation; an empty poll and a noreply enqueue are.
#[test]
fn queue_operations_are_per_role_and_only_what_the_queue_did() {
    use crate::memcache::{Key, QueueOp, QueueOpKind};
    let (mut recorder, registry) = new_recorder(SharedServices::watching(&[("starling", 22133)]));
    let at = |role| Endpoint {
        role,
        ..endpoint("127.0.0.1:22133")
    };
    let request = |role, command, status, op| MemcacheEvent::Request {
        endpoint: at(role),
        request: RequestObservation {
            command,
            status,
            key: Some(Key::new(b"jobs", 250, false)),
            queue: Some(QueueOp {
                op,
                options: Default::default(),
            }),
            ..RequestObservation::stored_set(0)
        },
        sample: crate::memcache::decoders::StreamSample::UNSAMPLED,
        pid: 0,
        comm: [0; agent_common::COMM_LEN],
    };
    use QueueOpKind::{Dequeue, EmptyPoll, Enqueue};
    for role in [Role::Client, Role::Server] {
        for (command, status, op) in [
            (Command::Set, Status::Stored, Enqueue),
            (Command::Set, Status::Noreply, Enqueue),
            (Command::Set, Status::NotStored, Enqueue),
            (Command::Set, Status::ServerError, Enqueue),
            (Command::Set, Status::Unanswered, Enqueue),
            (Command::Get, Status::Hit, Dequeue),
            (Command::Get, Status::Timeout, Dequeue),
            (Command::Get, Status::Unknown, Dequeue),
            (Command::Get, Status::Miss, EmptyPoll),
        ] {
            recorder.record_memcache(&request(role, command, status, op), 1);
        }
    }
    let text = encode(&registry, Format::PrometheusText).unwrap();
    let mut ops: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("cacheprobe_queue_operations_total{"))
        .collect();
    ops.sort_unstable();
    let series = |role: &str, op: &str, n: u32| {
        format!(
            "cacheprobe_queue_operations_total{{service=\"starling\",server=\"127.0.0.1:22133\",\
             role=\"{role}\",queue=\"jobs\",op=\"{op}\"}} {n}"
        )
    };
    assert_eq!(
        ops,
        [
            series("client", "dequeue", 1),
            series("client", "empty_poll", 1),
            series("client", "enqueue", 2),
            series("server", "dequeue", 1),
            series("server", "empty_poll", 1),
            series("server", "enqueue", 2),
        ],
        "{text}"
    );
    // Every request is still counted as one, by its status.
    let requests: u32 = text
        .lines()
        .filter(|l| l.starts_with("cacheprobe_memcache_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u32>().unwrap())
        .sum();
    assert_eq!(requests, 18, "{text}");
}
