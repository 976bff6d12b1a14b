//! CPU time and memory of the server processes (and of the load generator itself) over a
//! benchmark's measured window, from `/proc`.

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
    procs: Vec<(String, u32, Option<procstat::Sample>, u64)>,
}

/// The load generator's own entry.
pub const GENERATOR: &str = "chatctl (load generator)";

impl Window {
    /// Starts measuring `procs` and this process.
    pub fn begin(procs: &[(String, u32)]) -> Self {
        let mut all: Vec<(String, u32)> = procs.to_vec();
        all.push((GENERATOR.to_owned(), std::process::id()));
        Self {
            started: Instant::now(),
            procs: all
                .into_iter()
                .map(|(name, pid)| {
                    let sample = procstat::sample(pid);
                    let rss = sample.map_or(0, |s| s.rss_bytes);
                    (name, pid, sample, rss)
                })
                .collect(),
        }
    }

    /// Records peak memory; call now and then.
    pub fn sample_peaks(&mut self) {
        for (_, pid, _, peak) in &mut self.procs {
            if let Some(rss) = procstat::rss_bytes(*pid) {
                *peak = (*peak).max(rss);
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
            .map(|(name, pid, before, peak)| {
                let now = procstat::sample(pid);
                let cpu = match (before, now) {
                    (Some(b), Some(n)) => n.cpu.saturating_sub(b.cpu).as_secs_f64(),
                    _ => 0.0,
                };
                Usage {
                    name,
                    pid,
                    cpu_seconds: cpu,
                    cpu_percent: 100.0 * cpu / wall,
                    rss_mib: mib(now.map_or(0, |s| s.rss_bytes)),
                    peak_rss_mib: mib(peak),
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
