//! The agent under exactly the capabilities the systemd unit grants, as a non-root user: probes
//! attach and metrics flow.

use std::{process::Command, time::Duration};

use cacheprobe_tests::*;

/// Capabilities from packaging/systemd/cacheprobe.service (AmbientCapabilities).
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/systemd/cacheprobe.service"),
    )
    .unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("unit grants ambient capabilities");
    line.split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

#[test]
fn agent_works_with_only_the_units_capabilities_as_an_unprivileged_user() {
    require_root();
    let caps = unit_capabilities();
    assert!(caps.contains(&"bpf".to_string()) && caps.contains(&"perfmon".to_string()));
    let plus: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let set = plus.join(",");
    let dir = scratch_dir("caps");
    let port = unique_port();
    let metrics_port = unique_port();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("sample_interval_seconds = 1\n[[services]]\nname = \"memcached\"\nport = {port}\nprotocol = \"memcache\"\n"),
    )
    .unwrap();
    let setpriv = |args: &[&str]| {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--no-new-privs",
            ])
            .arg(format!("--inh-caps=-all,{set}"))
            .arg(format!("--ambient-caps=-all,{set}"))
            .arg(format!("--bounding-set=-all,{set}"))
            .arg(agent_binary())
            .args(args);
        command
    };

    let check = setpriv(&["check", "--json", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!report.contains("\"failed\""), "{report}");
    assert!(!report.contains("\"missing\""), "{report}");

    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let agent = Guard(
        setpriv(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{metrics_port}"),
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let mut scrape = None;
    for _ in 0..100 {
        if let Ok(text) = http_get(metrics_port, "/metrics") {
            scrape = Some(text);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        scrape.is_some(),
        "agent never served metrics: {}",
        std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
    );

    let _memcached = start_memcached(None, "127.0.0.1", port, &[]).unwrap();
    python(
        None,
        &format!(
            "from pymemcache.client.base import Client\nc = Client(('127.0.0.1', {port}))\nc.set('a', 'b', noreply=False)\nassert c.get('a') == b'b'\nc.close()\n"
        ),
    )
    .unwrap();
    let mut last = String::new();
    for _ in 0..100 {
        last = http_get(metrics_port, "/metrics").unwrap();
        let parsed = Scrape::parse(&last);
        if parsed.sum("cacheprobe_connections_closed_total", &[]) >= 2.0
            && parsed.sum("cacheprobe_memcache_requests_total", &[("role", "client")]) >= 2.0
            && parsed.sum("cacheprobe_listen_queue_limit", &[("service", "memcached")]) > 0.0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let scrape = Scrape::parse(&last);
    assert_eq!(
        scrape.sum("cacheprobe_connections_opened_total", &[]),
        2.0,
        "{last}"
    );
    assert_eq!(
        scrape.sum("cacheprobe_connections_closed_total", &[]),
        2.0,
        "{last}"
    );
    assert_eq!(
        scrape.sum("cacheprobe_memcache_requests_total", &[("role", "client")]),
        2.0,
        "{last}"
    );
    assert!(
        scrape.sum("cacheprobe_listen_queue_limit", &[("service", "memcached")]) > 0.0,
        "{last}"
    );
    for sample in scrape.matching("cacheprobe_probe_up", &[]) {
        assert_eq!(sample.value, 1.0, "{:?} is down", sample.labels);
    }
    drop(agent);
}

/// Installs the packaged unit the way the .deb does (binary in /usr/bin, config in
/// /etc/cacheprobe, unit in /etc/systemd/system) inside a private mount namespace whose /etc and
/// /usr/bin are overlays on the host's, then boots a real systemd as PID 1 of a private PID
/// namespace with nothing but that unit and empty stub targets. The host keeps no trace.
const SYSTEMD_NAMESPACE_INIT: &str = r#"set -eu
dir=$1
binary=$2
mount -t tmpfs tmpfs "$dir/overlay"
for lower in etc usr/bin; do
  name=$(echo "$lower" | tr / _)
  mkdir -p "$dir/overlay/$name.upper" "$dir/overlay/$name.work"
  mount -t overlay overlay \
    -o "lowerdir=/$lower,upperdir=$dir/overlay/$name.upper,workdir=$dir/overlay/$name.work" "/$lower"
done
install -m 0755 "$binary" /usr/bin/cacheprobe
mkdir -p /etc/cacheprobe
install -m 0644 "$dir/config.toml" /etc/cacheprobe/config.toml
rm -rf /etc/systemd/system
mkdir -p /etc/systemd/system
cp -r "$dir/units/." /etc/systemd/system/
mkdir -p "$dir/no-vendor-units"
mount --bind "$dir/no-vendor-units" /usr/lib/systemd/system
mount -t tmpfs tmpfs /run
# Each hierarchy shows the test's own cgroup as its top (it is also this cgroup namespace's
# root), so the slices systemd creates land there and not at the host's top level.
while read -r test_cgroup mount_point; do
  mount --bind "$test_cgroup" "$mount_point"
done < "$dir/cgroups"
export container=cacheprobe-test
exec /lib/systemd/systemd --system --unit=cacheprobe-test.target --log-target=console
"#;

/// A systemd booted in private PID, mount and cgroup namespaces; killing its PID 1 (on drop)
/// ends every process in it.
struct NamespacedSystemd {
    unshare: Guard,
    init_pid: u32,
    /// Held only to be removed after the namespace (fields drop after `Drop::drop`).
    _cgroups: TestCgroups,
}

/// One fresh child cgroup per mounted cgroup hierarchy, holding the namespace: its cgroup
/// namespace is rooted there, so the slices and scopes the test's systemd creates stay inside
/// and are removed with it.
struct TestCgroups(Vec<(std::path::PathBuf, String)>);

impl TestCgroups {
    fn create() -> TestCgroups {
        let membership = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut dirs = Vec::new();
        for line in mountinfo.lines() {
            let Some((mount, rest)) = line.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = mount.split_whitespace().collect();
            let rest: Vec<&str> = rest.split_whitespace().collect();
            let (Some(mount_point), Some(fstype), Some(options)) =
                (fields.get(4), rest.first(), rest.get(2))
            else {
                continue;
            };
            // This process's path in the hierarchy: cgroup2 is the "0::" line, a v1 hierarchy
            // the line whose controller list matches the mount's options.
            let path = membership.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let matches = match *fstype {
                    "cgroup2" => controllers.is_empty(),
                    "cgroup" => {
                        !controllers.is_empty()
                            && controllers
                                .split(',')
                                .all(|c| options.split(',').any(|o| o == c))
                    }
                    _ => false,
                };
                matches.then(|| path.to_string())
            });
            if let Some(path) = path {
                let dir = std::path::Path::new(mount_point)
                    .join(path.trim_start_matches('/'))
                    .join(format!("cacheprobe-test-{}", std::process::id()));
                if std::fs::create_dir_all(&dir).is_ok() {
                    dirs.push((dir, mount_point.to_string()));
                }
            }
        }
        TestCgroups(dirs)
    }

    /// Lines of "<test cgroup> <hierarchy mount point>" for the namespace's init script.
    fn bind_list(&self) -> String {
        self.0
            .iter()
            .map(|(dir, mount_point)| format!("{} {mount_point}\n", dir.display()))
            .collect()
    }
}

impl Drop for TestCgroups {
    /// Removes the test cgroups and everything systemd made under them, deepest first.
    fn drop(&mut self) {
        fn remove_tree(dir: &std::path::Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        remove_tree(&entry.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        for (dir, _) in &self.0 {
            // The killed processes leave their cgroups a moment after they are reaped.
            for _ in 0..50 {
                remove_tree(dir);
                if !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl NamespacedSystemd {
    fn boot(dir: &std::path::Path) -> NamespacedSystemd {
        let units = dir.join("units");
        std::fs::create_dir_all(units.join("cacheprobe.service.d")).unwrap();
        std::fs::create_dir_all(dir.join("overlay")).unwrap();
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../packaging/systemd/cacheprobe.service"),
            units.join("cacheprobe.service"),
        )
        .unwrap();
        // The targets the unit's default dependencies name, empty: nothing else starts.
        for target in [
            "cacheprobe-test",
            "sysinit",
            "basic",
            "multi-user",
            "network",
            "sockets",
            "paths",
            "timers",
            "slices",
            "shutdown",
            "local-fs",
        ] {
            std::fs::write(
                units.join(format!("{target}.target")),
                format!("[Unit]\nDescription=empty {target} target of the test namespace\n"),
            )
            .unwrap();
        }
        // No journald runs in the namespace; the only change to the shipped unit is where its
        // output goes.
        std::fs::write(
            units.join("cacheprobe.service.d/log.conf"),
            format!(
                "[Service]\nStandardOutput=append:{0}\nStandardError=append:{0}\n",
                dir.join("agent.log").display()
            ),
        )
        .unwrap();
        let script = dir.join("init.sh");
        std::fs::write(&script, SYSTEMD_NAMESPACE_INIT).unwrap();
        let console = std::fs::File::create(dir.join("systemd.log")).unwrap();
        let cgroups = TestCgroups::create();
        std::fs::write(dir.join("cgroups"), cgroups.bind_list()).unwrap();
        let procs_files: Vec<std::ffi::CString> = cgroups
            .0
            .iter()
            .map(|(dir, _)| {
                std::ffi::CString::new(dir.join("cgroup.procs").to_str().unwrap()).unwrap()
            })
            .collect();
        let mut command = Command::new("unshare");
        // SAFETY: the closure only calls open/write/close (async-signal-safe) on buffers made
        // before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                for file in &procs_files {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY);
                    if fd >= 0 {
                        libc::write(fd, b"0".as_ptr().cast(), 1);
                        libc::close(fd);
                    }
                }
                Ok(())
            })
        };
        let unshare = Guard(
            command
                .args([
                    "--pid",
                    "--fork",
                    "--mount",
                    "--propagation",
                    "private",
                    "--cgroup",
                    "--mount-proc",
                    "sh",
                ])
                .arg(&script)
                .arg(dir)
                .arg(agent_binary())
                .stdout(console.try_clone().unwrap())
                .stderr(console)
                .spawn()
                .unwrap(),
        );
        let unshare_pid = unshare.0.id();
        let mut init_pid = None;
        for _ in 0..100 {
            let children =
                std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                let pid: u32 = pid.parse().unwrap();
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    init_pid = Some(pid);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let systemd = NamespacedSystemd {
            init_pid: init_pid.unwrap_or_else(|| {
                panic!(
                    "systemd did not start: {}",
                    std::fs::read_to_string(dir.join("systemd.log")).unwrap_or_default()
                )
            }),
            unshare,
            _cgroups: cgroups,
        };
        for _ in 0..100 {
            if systemd
                .systemctl(&["is-system-running"])
                .is_ok_and(|state| state == "running" || state == "degraded")
            {
                return systemd;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "systemd never finished booting: {}",
            std::fs::read_to_string(dir.join("systemd.log")).unwrap_or_default()
        );
    }

    fn systemctl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("nsenter")
            .args(["-t", &self.init_pid.to_string(), "-m", "-p", "systemctl"])
            .args(args)
            .output()
            .map_err(|err| err.to_string())?;
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if output.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{stdout}{}",
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    fn property(&self, name: &str) -> String {
        self.systemctl(&["show", "--value", "-p", name, "cacheprobe.service"])
            .unwrap_or_else(|err| panic!("systemctl show {name}: {err}"))
    }

    /// The agent's pid as the host sees it (MainPID is the namespace's numbering).
    fn agent_host_pid(&self) -> Option<u32> {
        let main_pid = self.property("MainPID");
        if main_pid == "0" {
            return None;
        }
        let namespace = std::fs::read_link(format!("/proc/{}/ns/pid", self.init_pid)).ok()?;
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() == Some(namespace.clone())
                    && std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .unwrap_or_default()
                        .lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))
                        .and_then(|ids| ids.split_whitespace().last().map(str::to_string))
                        == Some(main_pid.clone())
            })
    }

    fn wait_until(&self, what: &str, dir: &std::path::Path, condition: impl Fn(&Self) -> bool) {
        for _ in 0..300 {
            if condition(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out waiting for {what}; systemctl status: {:?}\nagent log:\n{}",
            self.systemctl(&["status", "cacheprobe.service"]),
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
    }
}

impl Drop for NamespacedSystemd {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init kills everything in it.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.init_pid as i32, libc::SIGKILL) };
        let _ = self.unshare.0.wait();
    }
}

fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// The shipped unit under a real systemd: it starts the agent as a dynamic user with exactly the
/// unit's capabilities; after a crash (SIGKILL) systemd restarts it, the crashed instance's
/// programs are gone from the kernel and the new one serves metrics; `systemctl reload` keeps it
/// running; `systemctl stop` is a clean exit that leaves nothing loaded.
#[test]
fn systemd_runs_restarts_and_stops_the_packaged_unit_cleanly() {
    require_root();
    let dir = scratch_dir("systemd");
    let metrics_port = unique_port();
    let service_port = unique_port();
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "listen = \"127.0.0.1:{metrics_port}\"\nsample_interval_seconds = 1\n\
             [[services]]\nname = \"memcached\"\nport = {service_port}\nprotocol = \"memcache\"\n"
        ),
    )
    .unwrap();
    let systemd = NamespacedSystemd::boot(&dir);
    systemd
        .systemctl(&["start", "cacheprobe.service"])
        .unwrap_or_else(|err| panic!("start: {err}"));
    let serves_metrics = |_: &NamespacedSystemd| {
        http_get(metrics_port, "/metrics").is_ok_and(|text| {
            let scrape = Scrape::parse(&text);
            let probes: Vec<_> = scrape.matching("cacheprobe_probe_up", &[]).collect();
            !probes.is_empty() && probes.iter().all(|sample| sample.value == 1.0)
        })
    };
    systemd.wait_until("the agent to serve metrics", &dir, serves_metrics);

    let first = systemd.agent_host_pid().expect("agent pid");
    assert_ne!(uid_of(first), 0, "the unit must not run the agent as root");
    let expected_caps: u64 = unit_capabilities()
        .iter()
        .map(|cap| match cap.as_str() {
            "net_admin" => 1 << 12,
            "sys_ptrace" => 1 << 19,
            "dac_read_search" => 1 << 2,
            "perfmon" => 1 << 38,
            "bpf" => 1 << 39,
            other => panic!("capability {other} missing from this test's table"),
        })
        .sum();
    assert_eq!(
        effective_capabilities(first),
        expected_caps,
        "CapEff of the agent under systemd"
    );
    let first_programs = program_ids_of(first);
    assert!(first_programs.len() >= 3, "agent holds {first_programs:?}");

    // A crash: systemd restarts it after RestartSec, and nothing of the old instance stays.
    systemd
        .systemctl(&["kill", "--signal=SIGKILL", "cacheprobe.service"])
        .unwrap();
    systemd.wait_until("systemd to restart the agent", &dir, |systemd| {
        systemd.property("NRestarts") == "1" && systemd.property("ActiveState") == "active"
    });
    systemd.wait_until("the restarted agent to serve metrics", &dir, serves_metrics);
    let second = systemd.agent_host_pid().expect("restarted agent pid");
    assert_ne!(first, second);
    wait_unloaded(&first_programs, "after the crash", Duration::from_secs(10));
    let second_programs = program_ids_of(second);
    assert_eq!(
        second_programs.len(),
        first_programs.len(),
        "the restarted agent attaches the same programs"
    );

    // Reload is SIGHUP: same process, still serving.
    systemd
        .systemctl(&["reload", "cacheprobe.service"])
        .unwrap();
    systemd.wait_until("the reload to be logged", &dir, |_| {
        std::fs::read_to_string(dir.join("agent.log"))
            .is_ok_and(|log| log.contains("config reloaded"))
    });
    assert_eq!(systemd.agent_host_pid(), Some(second));
    assert!(serves_metrics(&systemd));

    // A clean stop: SIGTERM, exit status 0 (not "failed"), nothing left loaded.
    systemd.systemctl(&["stop", "cacheprobe.service"]).unwrap();
    assert_eq!(systemd.property("ActiveState"), "inactive");
    assert_eq!(systemd.property("Result"), "success");
    wait_unloaded(
        &second_programs,
        "after systemctl stop",
        Duration::from_secs(10),
    );
}
