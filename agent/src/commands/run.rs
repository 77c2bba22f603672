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

use crate::{
    config::Config,
    events,
    metrics::{Metrics, ObservationRecorder, ProbeLabels, SourceLabels},
    probes::{
        loader::{Probes, PROBES},
        offsets::{resolve_offsets, SystemLayout},
    },
    tracking::{ServicePorts, Tracker},
};

pub struct RunArgs {
    pub config_path: PathBuf,
    pub config_explicit: bool,
    pub listen: Option<std::net::SocketAddr>,
}

fn service_ports(config: &Config) -> ServicePorts {
    ServicePorts::new(
        config
            .services
            .iter()
            .enumerate()
            .map(|(index, service)| (service.port, index)),
    )
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

    let mut tracker = Tracker::new(service_ports(&config), config.limits.max_sockets as usize);
    let mut recorder = ObservationRecorder::new(
        metrics.clone(),
        config.services.iter().map(|s| s.name.clone()).collect(),
        config.limits.max_servers_per_service,
        config.limits.max_comms,
    );

    let mut probes = probes;
    let ring = probes.take_events().context("ring buffer already taken")?;
    // SAFETY: the AsyncFd takes ownership of the ring buffer, which owns its fd, so the fd stays
    // open and unchanged for as long as it is registered.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("cannot poll the ring buffer: {err}"))?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut observations = Vec::with_capacity(64);
    let mut reported_losses: std::collections::HashMap<&'static str, u64> =
        std::collections::HashMap::new();
    let mut decode_errors = 0u64;
    let mut syn_in_seen: std::collections::HashMap<u16, u64> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    match events::decode(&item) {
                        Ok(event) => {
                            tracing::trace!(?event, "kernel event");
                            tracker.handle(&event, &mut observations);
                        }
                        Err(err) => {
                            decode_errors += 1;
                            if decode_errors.is_power_of_two() {
                                tracing::warn!(%err, count = decode_errors, "undecodable ring buffer record");
                            }
                        }
                    }
                }
                guard.clear_ready();
                for observation in observations.drain(..) {
                    recorder.record(&observation);
                }
            }
            _ = tick.tick() => {
                tracker.tick(crate::clock::monotonic_ns(), &mut observations);
                for observation in observations.drain(..) {
                    recorder.record(&observation);
                }
                match probes.syn_in_counts() {
                    Ok(counts) => {
                        for (port, total) in counts {
                            let Some(service) = config.service_for_port(port) else { continue };
                            let seen = syn_in_seen.entry(port).or_insert(0);
                            if total > *seen {
                                recorder.record_syn_in(service, total - *seen);
                                *seen = total;
                            }
                        }
                    }
                    Err(err) => tracing::debug!(%err, "cannot read SYN counters"),
                }
                match probes.kernel_losses() {
                    Ok(totals) => {
                        for (source, total) in totals {
                            let seen = reported_losses.entry(source).or_insert(0);
                            if total > *seen {
                                metrics.events_lost.get_or_create(&SourceLabels { source }).inc_by(total - *seen);
                                *seen = total;
                            }
                        }
                    }
                    Err(err) => tracing::debug!(%err, "cannot read kernel loss counters"),
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching probes"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: detaching probes"); break; }
        }
    }
    drop(ring);
    drop(probes);
    Ok(())
}
