//! CPU time and memory of the server processes (and of the load generator itself) over a
//! benchmark's measured window, from `/proc`. A process counts with its descendants
//! (PostgreSQL works in backends forked by the postmaster); children that end within the
//! window are not counted.

use std::time::Instant;

use serde::Serialize;

use crate::procstat;

/// One process's use of the machine during the window.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Its name (`gateway-0`, `haproxy`, `chatctl` for the load generator).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// CPU seconds used in the window.
    pub cpu_seconds: f64,
    /// Share of one core over the window (200 % = both cores of a 2-core machine).
    pub cpu_percent: f64,
    /// Resident memory at the end, MiB.
    pub rss_mib: f64,
    /// Largest resident memory seen, MiB.
    pub peak_rss_mib: f64,
}

/// Measures a set of processes from [`Window::begin`] to [`Window::end`].
#[derive(Debug)]
pub struct Window {
    started: Instant,
    procs: Vec<Measured>,
}

#[derive(Debug)]
struct Measured {
    name: String,
    pid: u32,
    /// Count the descendants too (not for the load generator: a stack it started is its
    /// children).
    tree: bool,
    before: Option<procstat::Sample>,
    peak: u64,
}

impl Measured {
    fn sample(&self) -> Option<procstat::Sample> {
        if self.tree {
            procstat::tree_sample(self.pid)
        } else {
            procstat::sample(self.pid)
        }
    }
}

/// The load generator's own entry.
pub const GENERATOR: &str = "chatctl (load generator)";

impl Window {
    /// Starts measuring `procs` and this process.
    pub fn begin(procs: &[(String, u32)]) -> Self {
        let mut all: Vec<Measured> = procs
            .iter()
            .map(|(name, pid)| Measured {
                name: name.clone(),
                pid: *pid,
                tree: true,
                before: None,
                peak: 0,
            })
            .collect();
        all.push(Measured {
            name: GENERATOR.to_owned(),
            pid: std::process::id(),
            tree: false,
            before: None,
            peak: 0,
        });
        for m in &mut all {
            m.before = m.sample();
            m.peak = m.before.map_or(0, |s| s.rss_bytes);
        }
        Self {
            started: Instant::now(),
            procs: all,
        }
    }

    /// Records peak memory; call now and then.
    pub fn sample_peaks(&mut self) {
        for m in &mut self.procs {
            if let Some(now) = m.sample() {
                m.peak = m.peak.max(now.rss_bytes);
            }
        }
    }

    /// Ends the window.
    pub fn end(mut self) -> Vec<Usage> {
        self.sample_peaks();
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        self.procs
            .into_iter()
            .map(|m| {
                let now = m.sample();
                let cpu = match (m.before, now) {
                    (Some(b), Some(n)) => n.cpu.saturating_sub(b.cpu).as_secs_f64(),
                    _ => 0.0,
                };
                Usage {
                    name: m.name,
                    pid: m.pid,
                    cpu_seconds: cpu,
                    cpu_percent: 100.0 * cpu / wall,
                    rss_mib: mib(now.map_or(0, |s| s.rss_bytes)),
                    peak_rss_mib: mib(m.peak),
                }
            })
            .collect()
    }
}

/// CPU seconds of the processes whose names start with one of `prefixes`.
pub fn cpu_of(usages: &[Usage], prefixes: &[&str]) -> f64 {
    usages
        .iter()
        .filter(|u| prefixes.iter().any(|p| u.name.starts_with(p)))
        .map(|u| u.cpu_seconds)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_this_process() {
        let window = Window::begin(&[]);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        let usages = window.end();
        assert_eq!(usages.len(), 1);
        assert_eq!(usages[0].name, GENERATOR);
        assert!(usages[0].rss_mib > 0.0);
        assert!(cpu_of(&usages, &["chatctl"]) >= 0.0);
    }
}
