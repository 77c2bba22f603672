//! What one program run costs without bpf_stats (issue 19): a pinned thread's non-blocking receives on idle connections, timed with no program, an empty program and the agent attached, interleaved by round.
//!
//! bpf_stats times every run with two clock reads, and on this VM those reads cost more than
//! the agent's program itself: an empty program already reads about 54 ns per run there. A
//! receive that finds nothing still fires `sock_recv_length` and takes the agent's whole
//! sockets-only path (ports and state, watch bits) inside a syscall of a few hundred
//! ns, so tens of ns show plainly in the difference, timed by the caller's clock rather than by
//! the kernel around the program. What it leaves out is what a loaded op adds to any program
//! (colder caches): that is what the empty program's bpf_stats figure in `ab` is for.

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Instant,
};

use anyhow::{bail, Context as _};

use super::{
    floor::EmptyPrograms,
    observe,
    paired::{self, Interval},
    procs::{self, Mode, SysctlGuard},
    report::{Section, Table},
    Bench, DEFAULT_MAX_SOCKETS,
};

/// Receives per timed batch, and batches per arm. A batch is short (about a millisecond) so
/// that most batches escape the preemptions and interrupts of a busy machine, and the arm's
/// figure is the lower quartile of its batches: what the calls cost when nothing else cut in.
const CALLS_PER_BATCH: usize = 1_000;
const BATCHES: usize = 200;

/// The goal of issue 19 for a sockets-only program run.
pub const GOAL_NS: f64 = 45.0;

/// What is attached while an arm is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    Nothing,
    Empty,
    /// The agent, sockets only, on the socket-storage (tp_btf) path.
    Agent,
    /// The agent, sockets only, `socket_storage = false` (the raw path's port check).
    AgentPortCheck,
    /// The `--baseline` build of the agent, sockets only (its default path): before and after
    /// a change in the same rounds.
    Baseline,
}

const ARMS: [Arm; 4] = [Arm::Nothing, Arm::Empty, Arm::Agent, Arm::AgentPortCheck];

/// Keeps this process multi-threaded for the whole measure. A receive looks its descriptor up
/// without taking a reference only in a single-threaded process (the kernel's `fdget` fast
/// path); with a second thread it takes and drops one (two atomics). Starting an agent adds a
/// thread here (the one that follows its stderr), so without this the agent's arms, and only
/// they, paid that too: about 40 ns per receive that session 13 read as the program's own
/// cost. A parked thread puts every arm on the same path, the one a multi-threaded server or
/// client takes anyway.
struct Companion {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Companion {
    fn start() -> anyhow::Result<Companion> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("percall-companion".into())
            .spawn(move || {
                let _ = stopped.recv();
            })
            .context("cannot start the companion thread")?;
        Ok(Companion {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Companion {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One arm of one round: ns per receive on the watched and on the unwatched connection.
#[derive(Debug, Clone, Copy, Default)]
struct Timed {
    watched: f64,
    unwatched: f64,
}

/// One round's arms, plus (in the agent arm) the same receives timed with bpf_stats on and
/// what bpf_stats said one run of the receive program took.
#[derive(Debug, Default)]
struct Round {
    nothing: Timed,
    empty: Timed,
    agent: Timed,
    port_check: Timed,
    baseline: Option<Timed>,
    with_stats: Option<f64>,
    stats_ns_per_run: Option<f64>,
    /// bpf_stats' ns per run of the empty receive program, timed the same way.
    empty_stats_ns_per_run: Option<f64>,
}

/// The figures over rounds, each a median with its 95% interval.
pub(super) struct PerCall {
    pub(super) rounds: usize,
    /// The agent's program, all in (dispatch included): agent minus nothing, watched socket.
    pub(super) program: Option<Interval>,
    /// An empty program, all in: the floor any program pays here without bpf_stats.
    pub(super) empty: Option<Interval>,
    /// What the agent's program does beyond an empty one.
    pub(super) over_empty: Option<Interval>,
    /// The port-check path's program, all in.
    pub(super) port_check: Option<Interval>,
    /// What an unwatched socket's receive pays with the agent attached.
    pub(super) unwatched: Option<Interval>,
    /// bpf_stats' own figure for the same runs, and what turning it on added per call.
    pub(super) stats_reported: Option<Interval>,
    pub(super) stats_added: Option<Interval>,
    /// bpf_stats' figure for an empty program, and ours minus it (paired by round).
    pub(super) empty_stats_reported: Option<Interval>,
    pub(super) stats_over_empty: Option<Interval>,
    /// The receive itself with nothing attached.
    pub(super) base: Option<Interval>,
    /// With `--baseline`: that build's figures from the same rounds.
    pub(super) baseline: Option<BaselineFigures>,
}

/// The `--baseline` build's arm, and this build against it paired by round.
pub(super) struct BaselineFigures {
    pub(super) path: String,
    /// Its program, all in, on the watched connection.
    pub(super) program: Option<Interval>,
    /// Its program beyond an empty one.
    pub(super) over_empty: Option<Interval>,
    /// An unwatched connection's receive with it attached.
    pub(super) unwatched: Option<Interval>,
    /// This build minus the baseline, per round: watched and unwatched connection.
    pub(super) change_watched: Option<Interval>,
    pub(super) change_unwatched: Option<Interval>,
}

/// An idle loopback connection: the thread times receives on `client`, which never has data.
struct Idle {
    client: TcpStream,
    _server: TcpStream,
}

impl Idle {
    fn open(listener: &TcpListener) -> anyhow::Result<Idle> {
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok(Idle {
            client,
            _server: server,
        })
    }

    /// The lower quartile over [`BATCHES`] of ns per non-blocking receive (each finds nothing).
    fn time(&self) -> anyhow::Result<f64> {
        let fd = self.client.as_raw_fd();
        let mut byte = 0u8;
        let mut batches = Vec::with_capacity(BATCHES);
        for _ in 0..BATCHES {
            let mut unexpected = 0usize;
            let started = Instant::now();
            for _ in 0..CALLS_PER_BATCH {
                // SAFETY: an open socket and a one-byte buffer that outlives the call.
                let n = unsafe { libc::recv(fd, (&raw mut byte).cast(), 1, libc::MSG_DONTWAIT) };
                unexpected += usize::from(n >= 0);
            }
            let elapsed = started.elapsed();
            if unexpected > 0 {
                bail!("an idle connection received data or closed ({unexpected} receives)");
            }
            batches.push(elapsed.as_nanos() as f64 / CALLS_PER_BATCH as f64);
        }
        batches.sort_by(f64::total_cmp);
        batches
            .get(batches.len() / 4)
            .copied()
            .context("no batch timed")
    }
}

impl Bench {
    pub(super) fn per_call_cost(&mut self) -> anyhow::Result<()> {
        crate::util::step("BPF cost per program run without bpf_stats (idle receives)");
        let watched = TcpListener::bind(("127.0.0.1", procs::free_port(18900)?))?;
        let unwatched = TcpListener::bind(("127.0.0.1", procs::free_port(18950)?))?;
        let port = watched.local_addr()?.port();
        // Opened before any agent starts: each agent adopts them at attach, as it would a
        // pooled connection.
        let on_watched = Idle::open(&watched)?;
        let on_unwatched = Idle::open(&unwatched)?;
        let _pinned = procs::Pinned::thread_to(procs::Cpu::Last)?;
        let _companion = Companion::start()?;
        let rounds = self.plan.rounds;
        let mut arms = ARMS.to_vec();
        if self.baseline.is_some() {
            arms.push(Arm::Baseline);
        }
        let mut results = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let mut this = Round::default();
            for index in 0..arms.len() {
                // Rotated, so no arm always runs first or right after an agent stopped.
                let arm = arms[(index + round) % arms.len()];
                eprintln!("xtask: per-call round {}/{rounds}, {arm:?}", round + 1);
                self.time_arm(arm, port, &on_watched, &on_unwatched, &mut this)?;
            }
            results.push(this);
        }
        let mut per_call = summarize(&results);
        if let Some(path) = &self.baseline {
            per_call.baseline = Some(summarize_baseline(&results, path.display().to_string()));
        }
        let section = self.per_call_section(&per_call, port);
        self.targets.per_call = Some(per_call);
        self.finish(section);
        Ok(())
    }

    fn time_arm(
        &self,
        arm: Arm,
        port: u16,
        on_watched: &Idle,
        on_unwatched: &Idle,
        round: &mut Round,
    ) -> anyhow::Result<()> {
        let both = || -> anyhow::Result<Timed> {
            Ok(Timed {
                watched: on_watched.time()?,
                unwatched: on_unwatched.time()?,
            })
        };
        match arm {
            Arm::Nothing => round.nothing = both()?,
            Arm::Empty => {
                let floor = EmptyPrograms::attach(&["sock_send_length", "sock_recv_length"])?;
                round.empty = both()?;
                // The receive program is the second one attached.
                let receive = floor.ids.get(1).copied();
                let (_, per_run) = stats_view(&floor.ids, on_watched, |id, _| Some(id) == receive)?;
                round.empty_stats_ns_per_run = per_run;
            }
            Arm::Baseline => {
                let binary = self
                    .baseline
                    .as_ref()
                    .context("a baseline arm without --baseline")?;
                let mut agent =
                    self.start_binary_on(binary, &[port], Mode::SocketsOnly, DEFAULT_MAX_SOCKETS)?;
                round.baseline = Some(both()?);
                agent.guard.check_running()?;
                agent.stop()?;
            }
            Arm::Agent | Arm::AgentPortCheck => {
                let mode = if arm == Arm::Agent {
                    Mode::SocketsOnly
                } else {
                    Mode::SocketsOnlyPortCheck
                };
                let mut agent = self.start_agent(port, mode, DEFAULT_MAX_SOCKETS)?;
                let timed = both()?;
                if arm == Arm::Agent {
                    round.agent = timed;
                    let (programs, _) = procs::bpf_object_ids(agent.pid())?;
                    let (with_stats, per_run) = stats_view(&programs, on_watched, |_, stats| {
                        stats.name.ends_with("sock_recv_length")
                    })?;
                    round.with_stats = Some(with_stats);
                    round.stats_ns_per_run = per_run;
                } else {
                    round.port_check = timed;
                }
                agent.guard.check_running()?;
                agent.stop()?;
            }
        }
        Ok(())
    }
}

/// The watched receives timed again with bpf_stats on, and bpf_stats' ns per run of the
/// receive program (`receive` picks it among `programs`) over them.
fn stats_view(
    programs: &[u32],
    on_watched: &Idle,
    receive: impl Fn(u32, &observe::ProgramStats) -> bool,
) -> anyhow::Result<(f64, Option<f64>)> {
    let _stats = SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?;
    let before = observe::program_stats(programs)?;
    let timed = on_watched.time()?;
    let after = observe::program_stats(programs)?;
    let (ns, runs) = observe::run_deltas(&before, &after, receive);
    Ok((timed, (runs > 0).then(|| ns as f64 / runs as f64)))
}

fn summarize(rounds: &[Round]) -> PerCall {
    let over = |f: &dyn Fn(&Round) -> Option<f64>| -> Option<Interval> {
        let values: Vec<f64> = rounds.iter().filter_map(f).collect();
        paired::median_ci(&values)
    };
    PerCall {
        rounds: rounds.len(),
        program: over(&|r| Some(r.agent.watched - r.nothing.watched)),
        empty: over(&|r| Some(r.empty.watched - r.nothing.watched)),
        over_empty: over(&|r| Some(r.agent.watched - r.empty.watched)),
        port_check: over(&|r| Some(r.port_check.watched - r.nothing.watched)),
        unwatched: over(&|r| Some(r.agent.unwatched - r.nothing.unwatched)),
        stats_reported: over(&|r| r.stats_ns_per_run),
        stats_added: over(&|r| r.with_stats.map(|with| with - r.agent.watched)),
        empty_stats_reported: over(&|r| r.empty_stats_ns_per_run),
        stats_over_empty: over(&|r| Some(r.stats_ns_per_run? - r.empty_stats_ns_per_run?)),
        base: over(&|r| Some(r.nothing.watched)),
        baseline: None,
    }
}

fn summarize_baseline(rounds: &[Round], path: String) -> BaselineFigures {
    let over = |f: &dyn Fn(&Round, &Timed) -> f64| -> Option<Interval> {
        let values: Vec<f64> = rounds
            .iter()
            .filter_map(|r| r.baseline.as_ref().map(|b| f(r, b)))
            .collect();
        paired::median_ci(&values)
    };
    BaselineFigures {
        path,
        program: over(&|r, b| b.watched - r.nothing.watched),
        over_empty: over(&|r, b| b.watched - r.empty.watched),
        unwatched: over(&|r, b| b.unwatched - r.nothing.unwatched),
        change_watched: over(&|r, b| r.agent.watched - b.watched),
        change_unwatched: over(&|r, b| r.agent.unwatched - b.unwatched),
    }
}

pub(super) fn ns(interval: Option<Interval>) -> String {
    interval.map_or("n/a".into(), |i| {
        format!("{:.1} ns (95% CI {:.1} .. {:.1})", i.median, i.low, i.high)
    })
}

pub(super) fn verdict(interval: Option<Interval>) -> String {
    interval.map_or("not measured".into(), |i| i.against(GOAL_NS).label().into())
}

impl Bench {
    fn per_call_section(&self, per_call: &PerCall, port: u16) -> Section {
        let mut section = Section::new("Cost per program run without bpf_stats");
        section.say(format!(
            "Issue 19. bpf_stats reads the clock twice around every program run, and on this VM \
             that costs more than the agent's sockets-only program (an empty program reads about \
             54 ns per run in `ab`). Here nothing times the program from inside: one thread, \
             pinned to one CPU, makes non-blocking receives on an idle loopback connection \
             (each finds nothing, fires `sock_recv_length` and takes the agent's whole \
             sockets-only path: on the tp_btf path the socket's ports and state by direct loads \
             and the watch bits) and times them with its \
             own clock, {BATCHES} batches of {CALLS_PER_BATCH} per arm, the lower quartile of the \
             batches (short batches, so most escape preemption on a busy machine). A second, \
             parked thread keeps the process multi-threaded in every arm: a single-threaded \
             process's receive skips the descriptor's reference count, and the thread that \
             follows a running agent's log would otherwise put the agent's arms alone on the \
             slower path (about 40 ns per receive, which session 13 counted as the program's). \
             Each of \
             {rounds} rounds times, in an order rotated every round: nothing attached; an empty \
             program on `sock_send_length`/`sock_recv_length`; the agent, sockets only, on port \
             {port} (a fresh agent each round, which adopts the connection at attach, as it \
             would a pooled one); the same agent with `socket_storage = false` (the raw path's \
             port check). Differences are taken within a round, then the median over rounds \
             with a 95% bootstrap interval. A second connection on an unwatched port shows what \
             the rest of a host's sockets pay. In the agent arm the same receives are timed \
             once more with `kernel.bpf_stats_enabled=1`, and so are the empty program's. Left out: what a loaded op adds to \
             any program (caches the op has cooled), which `ab`'s empty program measures.",
            rounds = per_call.rounds
        ));
        let mut table = Table::new(&["what", "ns per receive (median over rounds, 95% CI)"]);
        for (what, value) in [
            ("the receive itself, nothing attached", per_call.base),
            (
                "an empty program, all in (dispatch included)",
                per_call.empty,
            ),
            (
                "the agent's program, all in (watched connection, tp_btf path)",
                per_call.program,
            ),
            (
                "the agent's program beyond an empty one",
                per_call.over_empty,
            ),
            (
                "the agent's program, all in (port check, socket_storage = false)",
                per_call.port_check,
            ),
            (
                "an unwatched connection's receive, agent attached",
                per_call.unwatched,
            ),
            (
                "bpf_stats' own figure for one run of the receive program",
                per_call.stats_reported,
            ),
            (
                "what turning bpf_stats on adds to one receive",
                per_call.stats_added,
            ),
            (
                "bpf_stats' figure for one run of the empty program",
                per_call.empty_stats_reported,
            ),
            (
                "bpf_stats: the agent's program minus the empty one (paired by round)",
                per_call.stats_over_empty,
            ),
        ] {
            table.row(vec![what.to_string(), ns(value)]);
        }
        if let Some(baseline) = &per_call.baseline {
            let mut rows = Table::new(&[
                "the --baseline build (sockets only, its default path)",
                "ns per receive (median over rounds, 95% CI)",
            ]);
            for (what, value) in [
                ("its program, all in (watched connection)", baseline.program),
                ("its program beyond an empty one", baseline.over_empty),
                (
                    "an unwatched connection's receive, it attached",
                    baseline.unwatched,
                ),
                (
                    "this build minus the baseline, watched (paired by round)",
                    baseline.change_watched,
                ),
                (
                    "this build minus the baseline, unwatched (paired by round)",
                    baseline.change_unwatched,
                ),
            ] {
                rows.row(vec![what.to_string(), ns(value)]);
            }
            section.say(format!(
                "With `--baseline {}`: that build, sockets only, is a fifth arm of the same \
                 rounds (rotated with the others).",
                baseline.path
            ));
            section.table("", rows);
        }
        section.command(format!(
            "{}   # sockets only; and with socket_storage = false\n\
             recv(fd, buf, 1, MSG_DONTWAIT) x {CALLS_PER_BATCH} x {BATCHES} per arm, pinned",
            self.agent_command(Mode::SocketsOnly)
        ));
        section.table("", table);
        section
    }
}
