//! What `/proc` says about a process: CPU time, resident memory, start time, open-file limit.
//!
//! The supervisor uses the start time to recognise its own children after a crash (a pid
//! alone may have been reused); the benchmarks sample CPU and RSS of every server process.

use std::time::Duration;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time consumed so far.
    pub cpu: Duration,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The fields of `/proc/<pid>/stat` after the command name (which may contain spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_owned).collect())
}

/// CPU time and RSS of `pid`, or `None` when it is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let fields = stat_fields(pid)?;
    // After the name: state is field 3 (index 0 here); utime 14 and stime 15 → 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = ticks_per_second();
    let cpu = Duration::from_micros((utime + stime) * 1_000_000 / ticks);
    Some(Sample {
        cpu,
        rss_bytes: rss_bytes(pid).unwrap_or(0),
    })
}

/// The parent of `pid`.
fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// `pid` and every process below it (PostgreSQL's backends are children of the postmaster).
pub fn tree(pid: u32) -> Vec<u32> {
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, parent(p)?)))
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let current = found[i];
        found.extend(
            all.iter()
                .filter(|(_, parent)| *parent == current)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found
}

/// CPU time and RSS of `pid` and its descendants together, or `None` when `pid` is gone.
pub fn tree_sample(pid: u32) -> Option<Sample> {
    let own = sample(pid)?;
    Some(
        tree(pid)
            .into_iter()
            .skip(1)
            .filter_map(sample)
            .fold(own, |sum, s| Sample {
                cpu: sum.cpu + s.cpu,
                rss_bytes: sum.rss_bytes + s.rss_bytes,
            }),
    )
}

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// When `pid` started, in clock ticks after boot (field 22 of `/proc/<pid>/stat`); with the
/// pid it names one process for the life of the machine.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// Whether `pid` is alive and is the process that started at `started` (see [`start_time`]).
/// A zombie counts as gone.
pub fn is_same_process(pid: u32, started: u64) -> bool {
    stat_fields(pid).is_some_and(|f| {
        f.first().map(String::as_str) != Some("Z")
            && f.get(19).and_then(|s| s.parse().ok()) == Some(started)
    })
}

/// The soft open-file limit of `pid` (`Max open files` in `/proc/<pid>/limits`).
pub fn open_file_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The command name of `pid` (`/proc/<pid>/comm`).
pub fn command_name(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let sample = sample(pid).expect("own stat");
        assert!(sample.rss_bytes > 0);
        let started = start_time(pid).expect("start time");
        assert!(is_same_process(pid, started));
        assert!(!is_same_process(pid, started + 1));
        assert!(open_file_limit(pid).expect("limits") > 0);
        assert!(command_name(pid).is_some());
    }

    #[test]
    fn a_tree_includes_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn");
        let me = std::process::id();
        let tree = tree(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()), "{tree:?}");
        let own = sample(me).expect("own");
        let all = tree_sample(me).expect("tree");
        assert!(all.rss_bytes > own.rss_bytes);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn gone_processes_read_as_none() {
        // Pid numbers above the kernel's pid_max never exist.
        assert!(sample(4_194_304 + 7).is_none());
        assert!(!is_same_process(4_194_304 + 7, 1));
    }
}
