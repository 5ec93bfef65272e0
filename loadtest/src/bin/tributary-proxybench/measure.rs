//! CPU and memory of a proxy under test, from /proc: the process and its descendants
//! (nginx's master and worker; Envoy and ours are one process with threads, which
//! `/proc/PID/stat` already sums).
//!
//! CPU per request is the proxy's utime + stime over the measured window divided by
//! the requests completed in that window. The clock is `USER_HZ` ticks (10 ms), so a
//! window must hold many seconds of CPU-ticks for the figure to be precise; the
//! fixed-rate window's length (`--measure`) is chosen for that.

use std::io::Cursor;

use procfs::FromRead;
use procfs::process::Stat;

/// CPU ticks (utime + stime) of one process, from the text of its `/proc/PID/stat`.
/// The command name may hold spaces and parentheses; procfs reads past the last `)`.
pub fn ticks_of_stat(text: &str) -> anyhow::Result<u64> {
    let stat = Stat::from_read(Cursor::new(text.as_bytes()))
        .map_err(|e| anyhow::anyhow!("parsing /proc/PID/stat {text:?}: {e}"))?;
    Ok(stat.utime + stat.stime)
}

/// CPU microseconds per request from two tick readings of the same processes.
/// `None` when nothing completed (no figure, rather than infinity).
pub fn cpu_per_request_us(
    ticks_before: u64,
    ticks_after: u64,
    ticks_per_second: u64,
    requests: u64,
) -> Option<f64> {
    if requests == 0 || ticks_per_second == 0 {
        return None;
    }
    let seconds = ticks_after.saturating_sub(ticks_before) as f64 / ticks_per_second as f64;
    Some(seconds * 1e6 / requests as f64)
}

/// The process `pid` and every process descending from it (children first seen
/// through their parent's pid in `/proc/*/stat`).
pub fn tree(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            if let Ok(s) = p.stat() {
                parent_of.push((s.pid, s.ppid));
            }
        }
    }
    descendants(pid, &parent_of)
}

/// Pure part of [`tree`]: `pid` and its descendants in a (pid, parent) list.
pub fn descendants(pid: i32, parent_of: &[(i32, i32)]) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            parent_of
                .iter()
                .filter(|&&(c, pp)| pp == p && c != p)
                .map(|&(c, _)| c),
        );
        i += 1;
    }
    out
}

/// CPU ticks of `pid` and its descendants now.
pub fn tree_ticks(pid: i32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|t| ticks_of_stat(&t).ok())
        .sum()
}

/// Resident memory (VmRSS) of `pid` and its descendants, in bytes. For nginx this sums
/// master and worker, so pages they share after the fork count twice: an upper bound.
pub fn tree_rss_bytes(pid: i32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| procfs::process::Process::new(p).ok()?.status().ok()?.vmrss)
        .map(|kb| kb * 1024)
        .sum()
}

/// Busy ticks of every CPU (all but idle and iowait) from /proc/stat, by CPU number.
pub fn cpu_busy_ticks() -> Vec<u64> {
    use procfs::CurrentSI;
    procfs::KernelStats::current()
        .map(|k| {
            k.cpu_time
                .iter()
                .map(|c| {
                    c.user
                        + c.nice
                        + c.system
                        + c.irq.unwrap_or(0)
                        + c.softirq.unwrap_or(0)
                        + c.steal.unwrap_or(0)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The share of a core that something other than `own_ticks` (the processes placed
/// there) kept busy over `seconds`: another engineer's build on the proxy's core makes
/// every figure of that run suspect, so it is reported with the run.
pub fn other_load(
    core_busy_ticks: u64,
    own_ticks: u64,
    ticks_per_second: u64,
    seconds: f64,
) -> f64 {
    if ticks_per_second == 0 || seconds <= 0.0 {
        return 0.0;
    }
    core_busy_ticks.saturating_sub(own_ticks) as f64 / ticks_per_second as f64 / seconds
}

/// The single CPU of a `taskset -c` list such as `0`; `None` for a list or range.
pub fn single_cpu(list: &str) -> Option<usize> {
    list.trim().parse().ok()
}

/// The kernel's clock ticks per second for /proc times.
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line of /proc/PID/stat (an nginx worker), its name holding a space and
    /// a parenthesis as a command name may: utime is field 14, stime field 15.
    const STAT: &str = "4242 (nginx: wor)ker) S 4241 4241 4241 0 -1 4194624 6027 0 0 0 1234 567 0 0 20 0 1 0 8931296 21655552 1207 18446744073709551615 1 1 0 0 0 0 0 16781312 402745863 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn utime_and_stime_are_read_past_a_command_name_with_parentheses() {
        assert_eq!(ticks_of_stat(STAT).unwrap(), 1234 + 567);
        let err = ticks_of_stat("4242 (nginx) S 1").unwrap_err().to_string();
        assert!(err.contains("/proc/PID/stat"), "{err}");
    }

    #[test]
    fn cpu_per_request_is_the_window_cpu_over_the_requests_of_the_window() {
        // 2.5 s of CPU (250 ticks at 100 Hz) for 200,000 requests: 12.5 us each.
        assert_eq!(cpu_per_request_us(1000, 1250, 100, 200_000), Some(12.5));
        // No requests: no figure.
        assert_eq!(cpu_per_request_us(1000, 1250, 100, 0), None);
        // A counter read out of order never goes negative.
        assert_eq!(cpu_per_request_us(1250, 1000, 100, 10), Some(0.0));
    }

    #[test]
    fn load_on_a_core_beyond_its_own_processes_is_the_interference() {
        // Core busy 1.2 s over 2 s, of which the proxy 1.0 s: 10% was someone else's.
        assert!((other_load(120, 100, 100, 2.0) - 0.1).abs() < 1e-9);
        // Accounting skew (the process counted a tick the core did not): never negative.
        assert_eq!(other_load(99, 100, 100, 2.0), 0.0);
        assert_eq!(single_cpu("0"), Some(0));
        assert_eq!(single_cpu("0-1"), None);
        // This machine has at least one CPU with some busy time.
        assert!(cpu_busy_ticks().iter().any(|&t| t > 0));
    }

    #[test]
    fn a_tree_is_the_process_and_every_descendant() {
        // nginx: master 10, worker 11; an unrelated 12; a grandchild 13 of 10.
        let list = [(10, 1), (11, 10), (12, 1), (13, 11), (1, 0)];
        let mut t = descendants(10, &list);
        t.sort_unstable();
        assert_eq!(t, vec![10, 11, 13]);
        assert_eq!(descendants(12, &list), vec![12]);
        // This test process is found in /proc and counts some CPU and memory.
        let me = std::process::id() as i32;
        assert!(tree(me).contains(&me));
        assert!(tree_rss_bytes(me) > 1 << 20);
    }
}
