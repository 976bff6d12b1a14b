//! Processes left behind by a `chatctl up` that died without stopping its children (SIGKILL,
//! a crash, a closed terminal): found through the previous `stack.json` and stopped before a
//! new stack starts on the same directory, so ports, sockets and data are not fought over.
//!
//! A pid is trusted only if its start time matches the recorded one (pids are reused).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::child::{Role, signal};
use super::state::StackInfo;
use crate::procstat;

/// Stops the children recorded in `state_file` that are still alive; returns their names.
/// Call only while holding the state lock (so their supervisor is known to be gone).
pub async fn stop_leftovers(state_file: &Path) -> Vec<String> {
    let Ok(info) = StackInfo::read(state_file) else {
        return Vec::new();
    };
    let alive: Vec<(String, Role, u32, u64)> = info
        .children
        .iter()
        .filter_map(|c| Some((c.name.clone(), c.role, c.pid?, c.start_time?)))
        .filter(|(_, _, pid, started)| procstat::is_same_process(*pid, *started))
        .collect();
    if alive.is_empty() {
        return Vec::new();
    }
    // The shutdown order of a normal stop, so no data is lost on the way.
    for phase in 0..=2 {
        let group: Vec<_> = alive.iter().filter(|c| c.1.stop_phase() == phase).collect();
        for (_, role, pid, _) in &group {
            let sig = match role {
                Role::Postgres => Signal::SIGINT,
                _ => Signal::SIGTERM,
            };
            signal(*pid, sig);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while group
            .iter()
            .any(|(_, _, pid, started)| procstat::is_same_process(*pid, *started))
        {
            if Instant::now() > deadline {
                for (_, _, pid, started) in &group {
                    if procstat::is_same_process(*pid, *started) {
                        signal(*pid, Signal::SIGKILL);
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    alive.into_iter().map(|(name, ..)| name).collect()
}
