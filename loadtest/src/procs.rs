//! Child processes under test (the hub, the go-control-plane peer): start, wait for
//! their ready file, measure CPU and peak memory from /proc (`procfs`), stop by pid.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub struct Proc {
    pub name: String,
    /// `None` when attached to a process someone else started (`--hub-addr`).
    pub child: Option<Child>,
    pub pid: Option<u32>,
    pub ready: serde_json::Value,
    pub log: PathBuf,
    ticks_per_second: f64,
}

impl Proc {
    /// Starts `argv` with `--ready-file` appended and waits for that file.
    pub fn start(name: &str, argv: &[String], dir: &Path) -> anyhow::Result<Proc> {
        let ready_file = dir.join(format!("{name}.ready.json"));
        let log = dir.join(format!("{name}.log"));
        // A ready file left by the previous run's process would name its (dead) ports.
        match std::fs::remove_file(&ready_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", ready_file.display()));
            }
            _ => {}
        }
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).arg("--ready-file").arg(&ready_file);
        let out = std::fs::File::create(&log)?;
        cmd.stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {argv:?}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited with {status} before it was ready; log: {}",
                    log.display()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&ready_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                break v;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{name} not ready within 60 s; log: {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Proc {
            name: name.to_string(),
            pid: Some(child.id()),
            child: Some(child),
            ready,
            log,
            ticks_per_second: clock_ticks(),
        })
    }

    /// Starts `argv` (a program without a ready file, e.g. etcd: the caller waits for
    /// it to answer), its output in `dir/{name}.log`.
    pub fn spawn(name: &str, argv: &[String], dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}: {argv:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            pid: Some(child.id()),
            child: Some(child),
            ready: serde_json::Value::Null,
            log,
            ticks_per_second: clock_ticks(),
        })
    }

    /// Whether it has exited (its status, once).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// A control plane started elsewhere: `ready` holds its addresses; CPU and memory
    /// are read only if its `pid` is given (and on this machine).
    pub fn attach(name: &str, ready: serde_json::Value, pid: Option<u32>) -> Proc {
        Proc {
            name: name.to_string(),
            child: None,
            pid,
            ready,
            log: PathBuf::from("(external)"),
            ticks_per_second: clock_ticks(),
        }
    }

    pub fn addr(&self, key: &str) -> anyhow::Result<String> {
        self.ready[key]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("{} ready file has no {key:?}", self.name))
    }

    /// User + system CPU seconds so far (`/proc/PID/stat`).
    pub fn cpu_seconds(&self) -> f64 {
        let Some(stat) = self.process().and_then(|p| p.stat().ok()) else {
            return 0.0;
        };
        (stat.utime + stat.stime) as f64 / self.ticks_per_second
    }

    /// Peak resident memory (`VmHWM` of `/proc/PID/status`) in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        self.process()
            .and_then(|p| p.status().ok())
            .and_then(|s| s.vmhwm)
            .map_or(0, |kb| kb * 1024)
    }

    /// Resident memory now (`VmRSS`) in bytes.
    pub fn rss_bytes(&self) -> u64 {
        self.process()
            .and_then(|p| p.status().ok())
            .and_then(|s| s.vmrss)
            .map_or(0, |kb| kb * 1024)
    }

    fn process(&self) -> Option<procfs::process::Process> {
        procfs::process::Process::new(i32::try_from(self.pid?).ok()?).ok()
    }

    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A run that fails part-way still stops what it started.
impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn clock_ticks() -> f64 {
    procfs::ticks_per_second() as f64
}

/// An HTTP/1.1 request to a loopback control or admin port: status and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let (code, body) =
        tributary_controlplane::http_client::request(addr, method, path, body).await?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_and_peak_memory_of_a_running_process() {
        let me = super::Proc::attach("self", serde_json::Value::Null, Some(std::process::id()));
        // Burn a little CPU so that the figure is above zero.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let cpu = me.cpu_seconds();
        assert!(cpu > 0.0 && cpu < 3600.0, "{cpu}");
        // This test binary holds at least a megabyte and far less than the machine.
        let rss = me.peak_rss_bytes();
        assert!(rss > 1 << 20 && rss < 64 << 30, "{rss}");
        // Gone or never there: zero, not an error.
        let gone = super::Proc::attach("gone", serde_json::Value::Null, None);
        assert_eq!((gone.cpu_seconds(), gone.peak_rss_bytes()), (0.0, 0));
    }

    #[test]
    fn a_ready_file_left_by_an_earlier_process_is_not_taken_for_the_new_one() {
        let dir = std::env::temp_dir().join(format!("loadtest-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cp.ready.json"), r#"{"xds": "old"}"#).unwrap();
        // The child writes its ready file a moment after it starts (its path is the
        // argument after --ready-file).
        let argv: Vec<String> = [
            "sh",
            "-c",
            r#"sleep 0.2; echo '{"xds": "new"}' > "$2"; exec sleep 30"#,
            "sh",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = super::Proc::start("cp", &argv, &dir).unwrap();
        assert_eq!(p.addr("xds").unwrap(), "new");
        p.stop();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
