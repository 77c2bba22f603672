//! `cacheprobe run`: the daemon. Attaches the probes, follows the ring buffer into the tracker
//! and serves /metrics until SIGINT/SIGTERM.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::ProbeOffsets;
use anyhow::Context as _;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use std::sync::Mutex;

use crate::{
    config::Config,
    control,
    export::host_metrics,
    export::metrics::{Metrics, ProbeLabels},
    history::{facts_from_sample, listener_drop_facts, History, HistoryLimits, HistorySink},
    host::fd_arming::{self, FdProbeArming},
    host::{parse::TcpExtCounters, Sampler, SamplerConfig},
    ingest::{
        merge::{drain_then_tick, pump, EventQueue},
        pipeline::Pipeline,
    },
    kernel::{
        loader::Probes,
        offsets::{resolve_offsets, SystemLayout},
        probes::{missing_length_probes, PROBES},
        readings::KernelReadings,
    },
    services::SharedServices,
};

/// After draining the rings, let records gather this long before the next wake-up: one
/// wake-up per record costs more CPU (agent context switches, producer wake-ups) than
/// handling the record itself.
const RING_BATCH_DELAY: Duration = Duration::from_millis(1);

pub struct RunArgs {
    pub config_path: PathBuf,
    pub config_explicit: bool,
    pub listen: Option<std::net::SocketAddr>,
    /// Where `diagnose` asks for history (root-only Unix socket).
    pub control_socket: PathBuf,
}

use crate::clock::unix_now;

/// SIGHUP: re-reads the config file. Services, capture switches, key display and the sample
/// interval take effect at once; the listen address and map sizes need a restart (logged).
fn reload(
    args: &RunArgs,
    running: &Config,
    probes: &mut Probes,
    services: &SharedServices,
    pipeline: &mut Pipeline,
) -> anyhow::Result<Config> {
    let mut config = Config::load(&args.config_path, args.config_explicit)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if config.listen != running.listen {
        tracing::warn!(old = %running.listen, new = %config.listen, "listen address changes need a restart; still serving on the old one");
        config.listen = running.listen;
    }
    if config.limits != running.limits {
        tracing::warn!("[limits] changes need a restart; keeping the running limits");
        config.limits = running.limits.clone();
    }
    // /metrics' server took them at start: rotated credentials would otherwise look applied.
    if config.basic_auth != running.basic_auth || config.tls != running.tls {
        tracing::warn!(
            "basic_auth and tls changes need a restart; /metrics still serves with the old ones"
        );
        config.basic_auth = running.basic_auth.clone();
        config.tls = running.tls.clone();
    }
    if config.any_captured() && !probes.capture_sized {
        tracing::warn!("turning capture on needs a restart when no service captured at start (the payload ring is sized then); requests are not decoded until then");
    }
    // Checked before the kernel is told, so a refused reload leaves everything as it was.
    let next = services.load().reconfigured(&config.services)?;
    // Services that move to other slots take their samples along: the kernel gets shifts
    // that suit both orders before the ports change, and the exact ones right after.
    if let Some(bridge) = pipeline.reslot_services(&config, &next) {
        if let Err(err) = probes.set_capture_sample_shifts(&bridge) {
            tracing::warn!(
                error = format!("{err:#}"),
                "cannot change the capture sample"
            );
        }
    }
    probes.set_watched_ports(&config)?;
    services.store(next);
    pipeline.reconfigure(&config);
    apply_capture_shift(probes, pipeline);
    tracing::info!(
        services = config.services.len(),
        path = %args.config_path.display(),
        "config reloaded"
    );
    Ok(config)
}

/// What the event loop needs from each sample: how close anything is to a descriptor limit.
struct SampleNews {
    peak_fd_usage: f64,
}

/// Tells the kernel a capture sample the pipeline chose while reading records or ticking.
fn apply_capture_shift(probes: &mut Probes, pipeline: &mut Pipeline) {
    if let Some(shifts) = pipeline.take_capture_shift() {
        match probes.set_capture_sample_shifts(&shifts) {
            Ok(()) => pipeline.capture_shift_applied(crate::clock::monotonic_ns()),
            Err(err) => tracing::warn!(
                error = format!("{err:#}"),
                "cannot change the capture sample"
            ),
        }
    }
}

/// When the send/receive programs may come off (`limits.socket_probes_on_demand`): they are
/// attached at once when a watched connection's peer closes, and detached once none has for
/// [`LengthProbeArming::QUIET`].
struct LengthProbeArming {
    /// The kernel allows it ([`Probes::on_demand_blocker`]).
    kernel_can: bool,
    /// When the programs were last needed.
    needed_at: Instant,
}

impl LengthProbeArming {
    const QUIET: Duration = Duration::from_secs(2);

    fn apply(
        &mut self,
        config: &Config,
        probes: &mut Probes,
        pipeline: &Pipeline,
        metrics: &Metrics,
    ) {
        let on_demand =
            config.limits.socket_probes_on_demand && self.kernel_can && !config.any_captured();
        let now = Instant::now();
        if !on_demand || pipeline.any_peer_closed() {
            self.needed_at = now;
        }
        let armed = now.duration_since(self.needed_at) < Self::QUIET;
        if armed == probes.length_probes_armed() {
            return;
        }
        self.change(armed, now, probes);
        metrics
            .send_receive_probes_attached
            .set(i64::from(probes.length_probes_armed()));
    }

    fn change(&mut self, armed: bool, now: Instant, probes: &mut Probes) {
        match probes.set_length_probes_armed(armed) {
            Ok(()) => tracing::info!(
                armed,
                took_us = now.elapsed().as_micros() as u64,
                "send/receive probes {}",
                if armed {
                    "attached"
                } else {
                    "detached: no watched connection needs them"
                }
            ),
            Err(err) => {
                tracing::warn!(
                    error = format!("{err:#}"),
                    armed,
                    "cannot change the send/receive probes"
                );
                // Given up for this run: the programs go back on and stay on.
                self.kernel_can = false;
                let _ = probes.set_length_probes_armed(true);
            }
        }
    }
}

/// Hands the pipeline the kernel's sampled-call totals, which weight sampled requests (an
/// object without them leaves the 2^shift weight, said once).
fn read_sampled_calls(probes: &Probes, pipeline: &mut Pipeline) {
    let totals = match probes.sampled_calls() {
        Ok(totals) => Some(totals),
        Err(err) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    error = format!("{err:#}"),
                    impact = "sampled request counters scale by 2^shift (rougher)",
                    "cannot read the kernel's sampled-call counters"
                )
            });
            None
        }
    };
    pipeline.observe_sampled_calls(totals.as_deref(), crate::clock::monotonic_ns());
}

/// Applies the arming decision for the EMFILE/ENFILE probes after a sample.
fn arm_fd_probes(probes: &mut Probes, arming: &mut FdProbeArming, metrics: &Metrics, peak: f64) {
    if let Some(armed) = arming.observe(peak) {
        match probes.set_fd_exhaustion_armed(armed) {
            Ok(()) if armed => tracing::info!(
                peak_fd_usage = peak,
                "descriptors running short: EMFILE/ENFILE probes attached"
            ),
            Ok(()) => tracing::info!("descriptor usage low: EMFILE/ENFILE probes detached"),
            Err(err) => tracing::warn!(%err, armed, "cannot change the EMFILE/ENFILE probes"),
        }
    }
    metrics
        .fd_exhaustion_probes_armed
        .set(i64::from(probes.fd_exhaustion_armed()));
}

/// Samples /proc on its own thread pool slot so a slow /proc never stalls event processing.
async fn sample_periodically(
    mut sampler: Sampler,
    metrics: Metrics,
    mut last_tcp_ext: TcpExtCounters,
    mut config: tokio::sync::watch::Receiver<Config>,
    news: tokio::sync::mpsc::Sender<SampleNews>,
    history: Arc<Mutex<History>>,
) {
    let mut previous_tcp_ext = None;
    let interval = |config: &Config| Duration::from_secs(config.sample_interval_seconds);
    let mut ticker = tokio::time::interval(interval(&config.borrow()));
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = config.changed() => {
                if changed.is_err() {
                    return;
                }
                // A reload: new services and interval; the TcpExt totals carry on.
                let config = config.borrow_and_update().clone();
                sampler = Sampler::new(SamplerConfig::from_services(&config.services, config.limits.max_comms));
                ticker = tokio::time::interval(interval(&config));
                ticker.tick().await;
                continue;
            }
        }
        let Ok((result, returned)) = tokio::task::spawn_blocking(move || {
            let result = sampler.sample();
            (result, sampler)
        })
        .await
        else {
            tracing::error!("/proc sampler panicked; fd and listen-queue metrics stop");
            return;
        };
        sampler = returned;
        match result {
            Ok(snapshot) => {
                host_metrics::apply(&metrics, &snapshot, &mut last_tcp_ext);
                let facts = facts_from_sample(&snapshot, &mut previous_tcp_ext);
                let now = unix_now();
                let covered = config.borrow().sample_interval_seconds;
                if let Ok(mut history) = history.lock() {
                    for fact in facts {
                        history.record(now, fact);
                    }
                    for (second, fact) in listener_drop_facts(&snapshot, now, covered) {
                        history.record(second, fact);
                    }
                }
                let _ = news.try_send(SampleNews {
                    peak_fd_usage: fd_arming::peak_fd_usage(&snapshot),
                });
            }
            Err(err) => tracing::warn!(%err, "/proc sample failed"),
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM during start-up must still mean a clean exit, not a kill.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let started = Instant::now();
    let mut config = Config::load(&args.config_path, args.config_explicit)?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }

    let (mut probes, offsets) = attach_probes(&config, started)?;
    let can_sample_capture = Probes::can_sample_capture(&offsets);
    let on_demand_blocker = probes.on_demand_blocker(&offsets);
    if let (true, Some(why)) = (config.limits.socket_probes_on_demand, &on_demand_blocker) {
        tracing::info!("send/receive probes stay attached (no socket probes on demand): {why}");
    }
    let metrics = serve_metrics(&config, &probes).await?;
    metrics
        .send_receive_probes_attached
        .set(i64::from(probes.length_probes_armed()));
    metrics.config_last_reload_successful.set(1);

    let services = SharedServices::from_config(&config)?;
    let mut pipeline = new_pipeline(&config, &services, &metrics, can_sample_capture);
    if !missing_length_probes(&probes.status).is_empty() {
        pipeline.without_send_receive_probes();
    }
    let mut fd_probe_arming = FdProbeArming::new();
    // Not needed since before the start: the connections found at start are in the tracker
    // by the first decision (seeded from /proc), so the programs come off at once if none of
    // them has a closed peer.
    let mut length_probe_arming = LengthProbeArming {
        kernel_can: on_demand_blocker.is_none(),
        needed_at: Instant::now()
            .checked_sub(LengthProbeArming::QUIET)
            .unwrap_or_else(Instant::now),
    };
    let (history, control_socket) = serve_history(&args, &services, &mut pipeline, &metrics);

    let (sampler, last_tcp_ext) = adopt_existing(
        &config,
        &mut pipeline,
        &metrics,
        &mut probes,
        &mut fd_probe_arming,
    )
    .await?;
    let (mut news_rx, sampler_config_tx) =
        spawn_sampler(sampler, &metrics, last_tcp_ext, &config, &history);

    let (mut ring, mut payload_ring) = poll_rings(&mut probes)?;
    let mut event_queue = EventQueue::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // After a stall, one tick: a burst of them would read the kernel's sampled calls over
    // intervals of a few milliseconds, whose ratios are noise.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain = drain_timer();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                pump(&mut event_queue, &mut pipeline, guard.get_inner_mut(), payload_ring.get_mut(), crate::clock::monotonic_ns);
                // Before the batch delay: a peer close may be waiting for the probes.
                length_probe_arming.apply(&config, &mut probes, &pipeline, &metrics);
                guard.clear_ready();
                tokio::time::sleep(RING_BATCH_DELAY).await;
            }
            guard = payload_ring.readable_mut() => {
                let mut guard = guard?;
                pump(&mut event_queue, &mut pipeline, ring.get_mut(), guard.get_inner_mut(), crate::clock::monotonic_ns);
                guard.clear_ready();
                tokio::time::sleep(RING_BATCH_DELAY).await;
            }
            _ = drain.tick() => {
                pump(&mut event_queue, &mut pipeline, ring.get_mut(), payload_ring.get_mut(), crate::clock::monotonic_ns);
            }
            Some(news) = news_rx.recv() => {
                arm_fd_probes(&mut probes, &mut fd_probe_arming, &metrics, news.peak_fd_usage);
            }
            _ = tick.tick() => {
                let kernel = KernelReadings::read(&probes);
                read_sampled_calls(&probes, &mut pipeline);
                drain_then_tick(
                    &mut event_queue,
                    &mut pipeline,
                    ring.get_mut(),
                    payload_ring.get_mut(),
                    crate::clock::monotonic_ns,
                    Some(&kernel),
                    &mut || crate::sizes::slab::local_memcacheds(std::path::Path::new("/proc")),
                );
            }
            _ = sighup.recv() => {
                match reload(&args, &config, &mut probes, &services, &mut pipeline) {
                    Ok(new_config) => {
                        config = new_config;
                        let _ = sampler_config_tx.send(config.clone());
                        metrics.config_last_reload_successful.set(1);
                    }
                    Err(err) => {
                        tracing::error!("config reload rejected, keeping the running config: {err:#}");
                        metrics.config_last_reload_successful.set(0);
                    }
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: detaching probes"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: detaching probes"); break; }
        }
        apply_capture_shift(&mut probes, &mut pipeline);
        length_probe_arming.apply(&config, &mut probes, &pipeline, &metrics);
    }
    drop(payload_ring);
    drop(ring);
    drop(probes);
    // A socket left behind reads as a daemon that died; one another daemon holds stays.
    if let Some(path) = control_socket {
        if let Err(err) = std::fs::remove_file(&path) {
            tracing::warn!(%err, socket = %path.display(), "cannot remove the control socket");
        }
    }
    Ok(())
}

/// The pipeline, without a capture budget where the kernel cannot tell healthy connections
/// apart.
fn new_pipeline(
    config: &Config,
    services: &SharedServices,
    metrics: &Metrics,
    can_sample_capture: bool,
) -> Pipeline {
    let mut pipeline = Pipeline::new(config, services.clone(), metrics.clone());
    pipeline.set_process_names(crate::ingest::process_names::ProcessNames::from_proc());
    if !can_sample_capture {
        tracing::warn!(
            "this kernel does not let the programs tell healthy connections apart: payload \
             decoding has no budget and decodes every connection"
        );
        pipeline.disable_capture_budget();
    }
    pipeline
}

/// The kernel wakes us only when a ring passes its threshold (one wake-up per batch, not per
/// record); this timer reads whatever arrived more slowly, so no record waits longer.
fn drain_timer() -> tokio::time::Interval {
    let mut drain = tokio::time::interval(Duration::from_millis(
        agent_common::wakeup::DRAIN_INTERVAL_MS,
    ));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    drain
}

/// Loads and attaches the kernel programs for this kernel's layouts, which it returns too.
/// Fails when nothing attached. `started` is when the agent started, for the log line.
fn attach_probes(config: &Config, started: Instant) -> anyhow::Result<(Probes, ProbeOffsets)> {
    let resolution = resolve_offsets(&SystemLayout::discover());
    for missing in &resolution.missing {
        tracing::warn!(what = missing.subject.as_str(), "{}", missing.reason);
    }
    let probes = Probes::load(config, &resolution)?;
    if !probes.any_attached() {
        anyhow::bail!("no probe could be attached; run `cacheprobe check` to see why");
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        attached = probes.status.values().filter(|s| s.is_attached()).count(),
        "probes attached"
    );
    Ok((probes, resolution.offsets))
}

/// Creates the metrics (with each probe's `probe_up`) and serves them on the listen address.
async fn serve_metrics(config: &Config, probes: &Probes) -> anyhow::Result<Metrics> {
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
    let listener = crate::export::http::bind(config.listen).await?;
    tracing::info!(listen = %config.listen, "serving metrics on /metrics");
    let tls = config
        .tls
        .as_ref()
        .map(|files| files.acceptor())
        .transpose()?;
    tokio::spawn(crate::export::http::serve(
        listener,
        crate::export::http::Server {
            registry: registry.clone(),
            auth: config.basic_auth.clone(),
            tls,
            limits: crate::export::http::admission::ConnectionLimits {
                max_per_source: config.limits.http_connections_per_source,
                ..Default::default()
            },
            closed: metrics.http_connections_rejected.clone(),
        },
    ));
    Ok(metrics)
}

/// Recent history for `cacheprobe diagnose`, fed by the pipeline and served on a root-only
/// Unix socket (without the socket, diagnose attaches its own probes); and the socket's path
/// when this agent bound it, to remove at exit.
fn serve_history(
    args: &RunArgs,
    services: &SharedServices,
    pipeline: &mut Pipeline,
    metrics: &Metrics,
) -> (Arc<Mutex<History>>, Option<PathBuf>) {
    let history = Arc::new(Mutex::new(History::new(
        HistoryLimits::default().capacity_seconds,
        HistoryLimits::default(),
    )));
    pipeline.add_sink(Box::new(HistorySink::new(
        history.clone(),
        services.clone(),
    )));
    pipeline.set_history(history.clone());
    let bound = match control::bind(&args.control_socket) {
        Ok(listener) => {
            tracing::info!(socket = %args.control_socket.display(), "serving history to `cacheprobe diagnose`");
            tokio::spawn(control::serve_with_counters(
                listener,
                history.clone(),
                Some(Arc::new(metrics.top_registry())),
            ));
            Some(args.control_socket.clone())
        }
        Err(err) => {
            tracing::warn!(%err, "no control socket: `cacheprobe diagnose` will attach its own probes");
            None
        }
    };
    (history, bound)
}

/// Connections and processes that existed before we started: seeds the tracker (so the
/// active gauge is right from the first scrape), the host metrics and the fd-probe arming.
/// Returns the sampler and the TcpExt totals for the periodic samples.
async fn adopt_existing(
    config: &Config,
    pipeline: &mut Pipeline,
    metrics: &Metrics,
    probes: &mut Probes,
    fd_probe_arming: &mut FdProbeArming,
) -> anyhow::Result<(Sampler, TcpExtCounters)> {
    let mut sampler = Sampler::new(SamplerConfig::from_services(
        &config.services,
        config.limits.max_comms,
    ));
    let (initial, sampler) = tokio::task::spawn_blocking(move || {
        let result = sampler.sample_with_connections();
        (result, sampler)
    })
    .await?;
    let mut last_tcp_ext = Default::default();
    match initial {
        Ok((snapshot, connections)) => {
            let mut seeded = Vec::new();
            pipeline.tracker_mut().seed_all(
                connections.iter().map(|c| (c.local, c.remote, c.state)),
                &mut seeded,
            );
            pipeline.record_observations(seeded);
            host_metrics::apply(metrics, &snapshot, &mut last_tcp_ext);
            let peak = fd_arming::peak_fd_usage(&snapshot);
            arm_fd_probes(probes, fd_probe_arming, metrics, peak);
            tracing::info!(
                connections = connections.len(),
                processes = snapshot.processes.len(),
                namespaces = snapshot.network_namespaces,
                "existing watched connections adopted"
            );
        }
        Err(err) => {
            tracing::warn!(%err, "cannot read /proc: existing connections are learned on first use")
        }
    }
    Ok((sampler, last_tcp_ext))
}

/// Starts the periodic /proc samples: their news for the event loop, and where a reload
/// sends them the new config.
fn spawn_sampler(
    sampler: Sampler,
    metrics: &Metrics,
    last_tcp_ext: TcpExtCounters,
    config: &Config,
    history: &Arc<Mutex<History>>,
) -> (
    tokio::sync::mpsc::Receiver<SampleNews>,
    tokio::sync::watch::Sender<Config>,
) {
    let (news_tx, news_rx) = tokio::sync::mpsc::channel::<SampleNews>(4);
    let (sampler_config_tx, sampler_config_rx) = tokio::sync::watch::channel(config.clone());
    tokio::spawn(sample_periodically(
        sampler,
        metrics.clone(),
        last_tcp_ext,
        sampler_config_rx,
        news_tx,
        history.clone(),
    ));
    (news_rx, sampler_config_tx)
}

/// The event and payload rings, registered with the runtime for readiness.
fn poll_rings(probes: &mut Probes) -> anyhow::Result<(AsyncFd<Ring>, AsyncFd<Ring>)> {
    let events = probes
        .take_events()
        .context("event ring buffer already taken")?;
    let payloads = probes
        .take_payloads()
        .context("payload ring buffer already taken")?;
    // SAFETY: each AsyncFd takes ownership of its ring buffer, which owns its fd, so the fd
    // stays open and unchanged for as long as it is registered.
    let ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("cannot poll the event ring buffer: {err}"))?;
    let payload_ring = unsafe { AsyncFd::register_with_interest(payloads, Interest::READABLE) }
        .map_err(|err| anyhow::anyhow!("cannot poll the payload ring buffer: {err}"))?;
    Ok((ring, payload_ring))
}

/// A ring buffer of the kernel programs, as the agent holds it.
type Ring = aya::maps::RingBuf<aya::maps::MapData>;
