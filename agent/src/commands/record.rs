//! Local recording for `diagnose` when no daemon runs: start this same binary as a short-lived
//! `run` with a private control socket, let it watch for the duration, then take its history.
//! The pipeline, probes and history are exactly the daemon's. `cacheprobe top` without a daemon
//! runs the same child ([`PrivateDaemon`]) for as long as it shows.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    clock::unix_now, commands::diagnose::LocalRecorder, config::Config, control,
    history::HistorySnapshot,
};

pub struct ChildRecorder {
    /// The config file diagnose was given (None: defaults).
    pub config_path: Option<PathBuf>,
}

/// A `cacheprobe run` child with a private control socket in a temporary directory; dropping
/// it stops the child (SIGTERM, so the probes detach) and removes the directory.
pub struct PrivateDaemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    log_path: PathBuf,
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; SIGTERM detaches the probes cleanly.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl PrivateDaemon {
    /// Starts the child and waits (up to 15 s) until its control socket answers. `purpose`
    /// names the temporary directory ("diagnose", "top").
    pub fn start(config_path: Option<&Path>, purpose: &str) -> anyhow::Result<PrivateDaemon> {
        let dir = std::env::temp_dir().join(format!("cacheprobe-{purpose}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let socket = dir.join("control.sock");
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut command = Command::new(exe);
        command
            .args(["run", "--listen", "127.0.0.1:0", "--control-socket"])
            .arg(&socket)
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(path) = config_path {
            command.arg("--config").arg(path);
        }
        // Its own process group: a terminal's Ctrl-C or hangup is for the parent, which stops
        // the child itself (the daemon would take SIGHUP as "reload" and live on). If the parent
        // dies without doing so (SIGKILL), the kernel sends the SIGTERM instead.
        command.process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect (no allocation here).
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };
        let child = command.spawn().context("cannot start the probes")?;
        let mut daemon = PrivateDaemon {
            child,
            dir,
            socket,
            log_path,
        };
        let started = Instant::now();
        loop {
            daemon.check_alive()?;
            if control::fetch_history(&daemon.socket, unix_now(), Duration::from_secs(2)).is_ok() {
                return Ok(daemon);
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("the probes did not come up within 15 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// An error with the child's log when it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the probes could not start ({status}): {}",
                std::fs::read_to_string(&self.log_path)
                    .unwrap_or_default()
                    .trim()
            );
        }
        Ok(())
    }
}

impl LocalRecorder for ChildRecorder {
    fn record_for(
        &self,
        duration: Duration,
        _config: &Config,
        progress: &mut dyn FnMut(Duration),
    ) -> anyhow::Result<HistorySnapshot> {
        let daemon = PrivateDaemon::start(self.config_path.as_deref(), "diagnose")?;
        let since = unix_now();
        let watch_start = Instant::now();
        while watch_start.elapsed() < duration {
            progress(watch_start.elapsed());
            std::thread::sleep(
                Duration::from_millis(250).min(duration - watch_start.elapsed().min(duration)),
            );
        }
        progress(duration);
        let snapshot = control::fetch_history(daemon.socket(), since, Duration::from_secs(30))
            .context("cannot read the recorded history")?;
        drop(daemon);
        Ok(snapshot)
    }
}
