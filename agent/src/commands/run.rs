//! `cacheprobe run`: the daemon. Attaches the probes, follows the ring buffer into the tracker
//! and serves /metrics until SIGINT/SIGTERM.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use aya::maps::{MapData, RingBuf};

use crate::{
    config::Config,
    metrics::{Metrics, ProbeLabels},
    pipeline::{PayloadOutcome, Pipeline},
    probes::{
        loader::{Probes, PROBES},
        offsets::{resolve_offsets, SystemLayout},
    },
};

pub struct RunArgs {
    pub config_path: PathBuf,
    pub config_explicit: bool,
    pub listen: Option<std::net::SocketAddr>,
}

/// Payloads name sockets whose opening may still sit in the event ring (the two rings are read
/// separately): on an unknown socket, catch up on events and offer the payload again.
fn drain_payloads(
    pipeline: &mut Pipeline,
    payloads: &mut RingBuf<MapData>,
    events: &mut RingBuf<MapData>,
) {
    while let Some(item) = payloads.next() {
        if pipeline.on_payload_record(&item) == PayloadOutcome::UnknownSocket {
            drain(events, |bytes| pipeline.on_socket_record(bytes));
            let _ = pipeline.on_payload_record(&item);
        }
    }
}

/// Hands every record in the ring to `handle`, in order, without copying.
fn drain(ring: &mut RingBuf<MapData>, mut handle: impl FnMut(&[u8])) {
    while let Some(item) = ring.next() {
        handle(&item);
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut config = Config::load(&args.config_path, args.config_explicit)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }

    let resolution = resolve_offsets(&SystemLayout::discover());
    for missing in &resolution.missing {
        tracing::warn!(what = missing.subject.as_str(), "{}", missing.reason);
    }
    let probes = Probes::load(&config, &resolution.offsets)?;
    if !probes.any_attached() {
        anyhow::bail!("no probe could be attached; run `cacheprobe check` to see why");
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        attached = probes.status.values().filter(|s| s.is_attached()).count(),
        "probes attached"
    );

    let (metrics, registry) = Metrics::new();
    for spec in PROBES {
        let up = probes
            .status
            .get(spec.program)
            .is_some_and(|s| s.is_attached());
        metrics
            .probe_up
            .get_or_create(&ProbeLabels {
                probe: format!("{}/{}", spec.category, spec.event),
            })
            .set(up as i64);
    }
    let registry = Arc::new(registry);
    let listener = crate::http::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, "serving metrics on /metrics");
    tokio::spawn(crate::http::serve(listener, registry.clone()));

    let mut pipeline = Pipeline::new(&config, metrics.clone());

    let mut probes = probes;
    let events = probes
        .take_events()
        .context("event ring buffer already taken")?;
    let payloads = probes
        .take_payloads()
        .context("payload ring buffer already taken")?;
    // SAFETY: each AsyncFd takes ownership of its ring buffer, which owns its fd, so the fd
    // stays open and unchanged for as long as it is registered.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("cannot poll the event ring buffer: {err}"))?;
    let mut payload_ring = unsafe { AsyncFd::register_with_interest(payloads, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("cannot poll the payload ring buffer: {err}"))?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), |bytes| pipeline.on_socket_record(bytes));
                guard.clear_ready();
                drain_payloads(&mut pipeline, payload_ring.get_mut(), guard.get_inner_mut());
            }
            guard = payload_ring.readable_mut() => {
                let mut guard = guard?;
                drain_payloads(&mut pipeline, guard.get_inner_mut(), ring.get_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => {
                pipeline.tick(crate::clock::monotonic_ns(), Some(&probes), &config);
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching probes"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: detaching probes"); break; }
        }
    }
    drop(payload_ring);
    drop(ring);
    drop(probes);
    Ok(())
}
