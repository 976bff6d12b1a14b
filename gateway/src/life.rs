//! Which life of Redis the gateway talks to, and whether it can lose writes.
//!
//! Redis 7 keeps its script cache neither in the AOF nor on replicas, so the
//! first script a gateway runs on a Redis process that restarted (or on a
//! replica promoted by a failover) fails with `NOSCRIPT`. Before loading its
//! scripts again, the gateway records the new process in every shard's life
//! key ([`chatcluster_protocol::scripts::NEW_LIFE`]), which starts a new
//! generation — and so new epochs, above every reserved offset — unless both
//! the old and the new process lose no acknowledged write in a crash. This
//! module reads that from `INFO` and `CONFIG GET appendfsync`.

/// The Redis process serving the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Life {
    /// `run_id`: changes with every process.
    pub run_id: String,
    /// Whether a crash of this process loses no acknowledged write: the AOF is
    /// on with `appendfsync always`, it is a primary, and not a replica
    /// promoted by a failover (which may have lagged behind the old primary).
    pub lossless: bool,
}

/// Reads a [`Life`] from the text of `INFO server persistence replication`
/// and the value of `appendfsync` (`None` when `CONFIG` is not allowed: then
/// the process counts as one that can lose writes).
pub fn parse(info: &str, appendfsync: Option<&str>) -> Result<Life, String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let run_id = field("run_id")
        .filter(|id| !id.is_empty())
        .ok_or("INFO has no run_id")?
        .to_owned();
    let lossless = field("aof_enabled") == Some("1")
        && appendfsync == Some("always")
        && field("role") == Some("master")
        && field("second_repl_offset").is_none_or(|offset| offset == "-1");
    Ok(Life { run_id, lossless })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\nrun_id:647e6bacd157acc7eaed719d7c1020e5930ef3ec\r\n\
        # Persistence\r\nloading:0\r\naof_enabled:1\r\n\
        # Replication\r\nrole:master\r\nconnected_slaves:0\r\nsecond_repl_offset:-1\r\n";

    #[test]
    fn only_an_fsynced_aof_on_an_unpromoted_primary_is_lossless() {
        let life = parse(INFO, Some("always")).unwrap();
        assert_eq!(life.run_id, "647e6bacd157acc7eaed719d7c1020e5930ef3ec");
        assert!(life.lossless);
        assert!(!parse(INFO, Some("everysec")).unwrap().lossless);
        assert!(!parse(INFO, None).unwrap().lossless, "CONFIG refused");
        let no_aof = INFO.replace("aof_enabled:1", "aof_enabled:0");
        assert!(!parse(&no_aof, Some("always")).unwrap().lossless);
        let promoted = INFO.replace("second_repl_offset:-1", "second_repl_offset:4211");
        assert!(!parse(&promoted, Some("always")).unwrap().lossless);
        let replica = INFO.replace("role:master", "role:slave");
        assert!(!parse(&replica, Some("always")).unwrap().lossless);
        assert!(parse("# Server\r\nredis_version:7\r\n", Some("always")).is_err());
    }
}
