//! Starting a stack in dependency order, supervising it, and stopping it in order.

use std::future::Future;
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot, watch};

use super::child::{self, ChildSpec, Role};
use super::components::{self, Backends};
use super::config::{Auth, StackConfig};
use super::keeper::{self, KeeperEvent, Running};
use super::layout::{Layout, MAX_SOCKET_PATH};
use super::lock::{LockError, StateLock};
use super::ports::PortPicker;
use super::secrets::{Secrets, set_mode};
use super::state::{ChildInfo, Phase, ShutdownReport, StackInfo};
use super::{StackError, io_error, logs, orphans, postgres, probe, programs, redis};
use crate::{limits, procstat};

/// A started stack. [`Stack::run`] supervises it until a shutdown is asked for, then stops
/// it in order. Dropping it without `run` kills the children.
#[derive(Debug)]
pub struct Stack {
    layout: Layout,
    info: StackInfo,
    info_tx: watch::Sender<StackInfo>,
    children: Vec<Running>,
    _lock: StateLock,
}

/// The chatcluster binaries and external programs a configuration needs.
struct Programs {
    redis: PathBuf,
    haproxy: Option<PathBuf>,
    postgres: Option<programs::PostgresBin>,
    gateway: Option<PathBuf>,
    worker: Option<PathBuf>,
}

impl Programs {
    /// Finds every program first, so a missing one fails before anything starts.
    fn find(config: &StackConfig, layout: &Layout, workers: usize) -> Result<Self, StackError> {
        let gateways = config.gateways > 0;
        let data_version = postgres::data_version(&layout.postgres_data());
        Ok(Self {
            redis: programs::redis_server()?,
            haproxy: gateways.then(programs::haproxy).transpose()?,
            postgres: config
                .with_postgres()
                .then(|| programs::postgres(config.postgres_bin_dir.as_deref(), data_version))
                .transpose()?,
            gateway: gateways
                .then(|| programs::chatcluster("chatcluster-gateway", config.bin_dir.as_deref()))
                .transpose()?,
            worker: (workers > 0)
                .then(|| programs::chatcluster("chatcluster-worker", config.bin_dir.as_deref()))
                .transpose()?,
        })
    }
}

fn already_running(layout: &Layout) -> StackError {
    let detail = StackInfo::read(&layout.state_file())
        .map(|info| {
            let page = info
                .page_url
                .map(|u| format!(", page {u}"))
                .unwrap_or_default();
            format!(
                " (chatctl pid {}, since {}{page})",
                info.supervisor_pid, info.started_at
            )
        })
        .unwrap_or_default();
    StackError::AlreadyRunning {
        state_dir: layout.root().display().to_string(),
        detail,
    }
}

impl Stack {
    /// Takes the state directory's lock, then starts Redis, PostgreSQL, the workers, the
    /// gateways and HAProxy, each checked ready before the next. On failure whatever started
    /// is stopped again and the error names the child and quotes its log.
    pub async fn start(config: &StackConfig) -> Result<Stack, StackError> {
        let layout = Layout::new(config.state_dir());
        let root = layout.root().to_owned();
        std::fs::create_dir_all(&root).map_err(io_error(format!("create {}", root.display())))?;
        let lock = match StateLock::acquire(&layout.lock()) {
            Ok(lock) => lock,
            Err(LockError::Held(_)) => return Err(already_running(&layout)),
            Err(e) => return Err(StackError::Lock(e)),
        };
        let as_root = nix::unistd::geteuid().is_root();
        // Root's PostgreSQL runs as another user, who must be able to pass through.
        set_mode(&root, if as_root { 0o711 } else { 0o700 })
            .map_err(io_error(format!("chmod {}", root.display())))?;
        let workers = if config.with_postgres() {
            config.workers
        } else {
            0
        };
        if workers < config.workers {
            tracing::warn!(
                workers = config.workers,
                "--no-postgres: no workers run (they write to PostgreSQL)"
            );
        }
        let programs = Programs::find(config, &layout, workers)?;
        for index in 0..config.gateways {
            let socket = layout.gateway_socket(index);
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(StackError::Invalid(format!(
                    "{} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may have: use a shorter --state-dir",
                    socket.display()
                )));
            }
        }
        let left = orphans::stop_leftovers(&layout.state_file()).await;
        if !left.is_empty() {
            tracing::warn!(children = ?left, "stopped processes a previous chatctl left running");
        }
        for dir in [layout.run(), layout.redis()] {
            std::fs::create_dir_all(&dir).map_err(io_error(format!("create {}", dir.display())))?;
        }
        let secrets = Secrets::load_or_create(&layout.secrets())
            .map_err(io_error("create the stack's secrets"))?;
        let log_dir =
            logs::new_run_dir(&layout.logs()).map_err(io_error("create the log directory"))?;
        let file_limit = limits::raise();

        let mut ports = PortPicker::default();
        let web = config.gateways > 0;
        let port = web
            .then(|| ports.pick("--port", config.port, Some(8080)))
            .transpose()?;
        let stats_port = web
            .then(|| ports.pick("--stats-port", config.stats_port, Some(8404)))
            .transpose()?;
        let redis_port = ports.pick("--redis-port", config.redis_port, None)?;
        let postgres_port = programs
            .postgres
            .is_some()
            .then(|| ports.pick("--postgres-port", config.postgres_port, None))
            .transpose()?;

        let info = StackInfo {
            state_dir: root.clone(),
            supervisor_pid: std::process::id(),
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            phase: Phase::Starting,
            auth: config.auth.as_str().to_owned(),
            port: None,
            stats_port: None,
            page_url: None,
            ws_url: None,
            stats_url: None,
            metrics_url: None,
            redis_port,
            postgres_port,
            log_dir: log_dir.clone(),
            children: Vec::new(),
            shutdown: None,
        };
        let (info_tx, _) = watch::channel(info.clone());
        let mut stack = Stack {
            layout,
            info,
            info_tx,
            children: Vec::new(),
            _lock: lock,
        };
        match (port, stats_port) {
            (Some(port), Some(stats_port)) => stack.set_front_ports(port, stats_port),
            _ => stack.publish(),
        }

        let started = stack
            .start_children(config, &programs, &secrets, &mut ports, workers, file_limit)
            .await;
        if let Err(e) = started {
            stack.abort().await;
            return Err(e);
        }
        stack.info.phase = Phase::Running;
        stack.publish();
        Ok(stack)
    }

    async fn start_children(
        &mut self,
        config: &StackConfig,
        programs: &Programs,
        secrets: &Secrets,
        ports: &mut PortPicker,
        workers: usize,
        file_limit: limits::FileLimit,
    ) -> Result<(), StackError> {
        let redis_port = self.info.redis_port;
        let redis_conf = redis::write_config(
            &self.layout.redis(),
            redis_port,
            config.redis_fsync,
            &secrets.redis_password,
        )
        .map_err(io_error("write redis.conf"))?;
        let spec = redis::spec(
            programs.redis.clone(),
            &redis_conf,
            redis_port,
            &secrets.redis_password,
        );
        self.launch(spec, Some(redis_port), None).await?;

        let mut backends = Backends {
            redis_url: probe::redis_url(redis_port, &secrets.redis_password),
            database_url: None,
            jwt_secret: (config.auth == Auth::Jwt).then(|| secrets.jwt_secret.expose().to_owned()),
        };
        if let (Some(bin), Some(port)) = (&programs.postgres, self.info.postgres_port) {
            let run_as = postgres::run_as(&config.postgres_user)?;
            postgres::prepare_dir(&self.layout.postgres(), run_as, &config.postgres_user).await?;
            let data = self.layout.postgres_data();
            let initdb_log = self.info.log_dir.join("initdb.log");
            if postgres::data_version(&data).is_none() {
                tracing::info!(data = %data.display(), "first run: initdb");
            }
            postgres::initdb(bin, &data, run_as, &secrets.postgres_password, &initdb_log).await?;
            let connections = u32::try_from(20 + 10 * (config.gateways + workers))
                .unwrap_or(1000)
                .max(100);
            let spec = postgres::spec(bin, &data, port, run_as, connections);
            self.launch(spec, Some(port), None).await?;
            backends.database_url = Some(postgres::url(port, &secrets.postgres_password));
        }

        if let Some(program) = &programs.worker {
            for index in 0..workers {
                let admin = ports.pick("worker admin", None, None)?;
                let spec = components::worker(config, program, index, admin, &backends);
                self.launch(spec, Some(admin), None).await?;
            }
        }

        let (Some(program), Some(haproxy), Some(port), Some(stats_port)) = (
            &programs.gateway,
            &programs.haproxy,
            self.info.port,
            self.info.stats_port,
        ) else {
            return Ok(());
        };
        let mut sockets = Vec::new();
        for index in 0..config.gateways {
            let socket = self.layout.gateway_socket(index);
            let admin = ports.pick("gateway admin", None, None)?;
            let spec = components::gateway(config, program, index, &socket, admin, &backends);
            self.launch(spec, Some(admin), Some(socket.clone())).await?;
            sockets.push(socket);
        }
        // Another stack starting at the same moment may have taken a port picked earlier.
        let port = ports.still_free("--port", port, config.port)?;
        let stats_port = ports.still_free("--stats-port", stats_port, config.stats_port)?;
        if (Some(port), Some(stats_port)) != (self.info.port, self.info.stats_port) {
            self.set_front_ports(port, stats_port);
        }
        let cfg = components::haproxy_config(
            config,
            port,
            stats_port,
            sockets,
            file_limit.haproxy_max_conn(),
        );
        let cfg_path = self.layout.haproxy_config();
        std::fs::write(&cfg_path, cfg.render()).map_err(io_error("write haproxy.cfg"))?;
        chatcluster_haproxy::check(haproxy, &cfg_path)?;
        let spec = components::haproxy(config, haproxy, &cfg_path, stats_port);
        self.launch(spec, Some(port), None).await
    }

    /// Records HAProxy's ports and the URLs made of them.
    fn set_front_ports(&mut self, port: u16, stats_port: u16) {
        self.info.port = Some(port);
        self.info.stats_port = Some(stats_port);
        self.info.page_url = Some(format!("http://127.0.0.1:{port}/"));
        self.info.ws_url = Some(format!("ws://127.0.0.1:{port}/ws"));
        self.info.stats_url = Some(format!(
            "http://127.0.0.1:{stats_port}{}",
            chatcluster_haproxy::STATS_PATH
        ));
        self.info.metrics_url = Some(format!(
            "http://127.0.0.1:{stats_port}{}",
            chatcluster_haproxy::METRICS_PATH
        ));
        self.publish();
    }

    /// Spawns one child, records it, and waits until it is ready.
    async fn launch(
        &mut self,
        spec: ChildSpec,
        port: Option<u16>,
        socket: Option<PathBuf>,
    ) -> Result<(), StackError> {
        let log = self.info.log_dir.join(format!("{}.log", spec.name));
        tracing::info!(child = %spec.name, "starting");
        let start_error =
            |source: child::StartError, spec: &ChildSpec, log: &Path| StackError::Start {
                name: spec.name.clone(),
                source,
                log: log.display().to_string(),
                tail: child::log_tail(log, 15),
            };
        let mut process = child::spawn(&spec, &log).map_err(|e| start_error(e, &spec, &log))?;
        let pid = process.id().unwrap_or(0);
        self.info.children.push(ChildInfo {
            name: spec.name.clone(),
            role: spec.role,
            pid: Some(pid),
            start_time: procstat::start_time(pid),
            restarts: 0,
            last_exit: None,
            port,
            socket,
            log: log.clone(),
        });
        self.publish();
        let error = child::wait_ready(&mut process, &spec)
            .await
            .err()
            .map(|e| start_error(e, &spec, &log));
        self.children.push(Running {
            spec,
            child: process,
            log,
        });
        error.map_or(Ok(()), Err)
    }

    /// What is running now.
    pub fn info(&self) -> &StackInfo {
        &self.info
    }

    /// Follows the state as it changes (restarts, shutdown).
    pub fn watch(&self) -> watch::Receiver<StackInfo> {
        self.info_tx.subscribe()
    }

    /// Writes the state file and tells watchers.
    fn publish(&self) {
        if let Err(e) = self.info.write(&self.layout.state_file()) {
            tracing::warn!(error = %e, "cannot write the state file");
        }
        self.info_tx.send_replace(self.info.clone());
    }

    fn apply(&mut self, event: KeeperEvent) {
        match event {
            KeeperEvent::Exited { index, status, .. } => {
                if let Some(c) = self.info.children.get_mut(index) {
                    c.pid = None;
                    c.start_time = None;
                    c.last_exit = Some(status);
                }
            }
            KeeperEvent::Restarted {
                index,
                pid,
                start_time,
            } => {
                if let Some(c) = self.info.children.get_mut(index) {
                    c.pid = Some(pid);
                    c.start_time = start_time;
                    c.restarts += 1;
                }
            }
            KeeperEvent::SpawnFailed { .. } => {}
        }
        self.publish();
    }

    /// Supervises until `shutdown` completes, then stops everything in order and reports.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> ShutdownReport {
        let (events_tx, mut events) = mpsc::channel(64);
        let mut keepers = Vec::new();
        for (index, running) in std::mem::take(&mut self.children).into_iter().enumerate() {
            let (stop_tx, stop_rx) = oneshot::channel();
            let role = running.spec.role;
            let handle = tokio::spawn(keeper::keep(running, index, stop_rx, events_tx.clone()));
            keepers.push((role, stop_tx, handle));
        }
        drop(events_tx);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(event) = events.recv() => self.apply(event),
            }
        }
        tracing::info!(
            "stopping: HAProxy and gateways drain, workers finish, then Redis and PostgreSQL"
        );
        self.info.phase = Phase::Stopping;
        self.publish();
        let mut outcomes = Vec::new();
        for phase in 0..=2 {
            let (now, later): (Vec<_>, Vec<_>) = keepers
                .into_iter()
                .partition(|(role, ..)| role.stop_phase() == phase);
            keepers = later;
            let mut handles = Vec::new();
            for (_, stop_tx, handle) in now {
                let _ = stop_tx.send(());
                handles.push(handle);
            }
            let joined = futures_util::future::join_all(handles);
            tokio::pin!(joined);
            let results = loop {
                tokio::select! {
                    results = &mut joined => break results,
                    Some(event) = events.recv() => self.apply(event),
                }
            };
            for result in results {
                match result {
                    Ok(outcome) => {
                        tracing::info!(child = %outcome.name, clean = outcome.clean, detail = %outcome.detail, "stopped");
                        outcomes.push(outcome);
                    }
                    Err(e) => tracing::error!(error = %e, "a keeper task failed"),
                }
            }
        }
        self.finish(outcomes)
    }

    /// Records the shutdown, checking PostgreSQL's log for a normal shutdown.
    fn finish(&mut self, outcomes: Vec<child::StopOutcome>) -> ShutdownReport {
        let postgres_clean = self
            .info
            .of_role(Role::Postgres)
            .next()
            .map(|c| postgres::log_shows_clean_shutdown(&c.log));
        for child in &mut self.info.children {
            child.pid = None;
            child.start_time = None;
        }
        let report = ShutdownReport {
            children: outcomes,
            postgres_clean,
        };
        self.info.phase = if self.info.phase == Phase::Starting {
            Phase::Failed
        } else {
            Phase::Stopped
        };
        self.info.shutdown = Some(report.clone());
        self.publish();
        report
    }

    /// Stops what a failed start left running, in shutdown order.
    async fn abort(&mut self) {
        let mut outcomes = Vec::new();
        for phase in 0..=2 {
            for running in self
                .children
                .iter_mut()
                .filter(|r| r.spec.role.stop_phase() == phase)
            {
                outcomes.push(child::stop(&mut running.child, &running.spec).await);
            }
        }
        self.children.clear();
        self.finish(outcomes);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Only reached without `run` (a panic, an early return): leave nothing behind.
        for running in &mut self.children {
            let _ = running.child.start_kill();
        }
    }
}
