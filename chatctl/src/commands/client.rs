//! `token`, `chat`, `publish`, `subscribe` and `bots`.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chatcluster_protocol::frame::{ServerFrame, Since};
use chatctl::client::{Event, Identity, Session, SessionConfig, Target, Wire, endpoint, format};
use chatctl::stack::{Layout, layout, secrets::Secrets};

/// Where to connect and how, shared by the client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Gateway or HAProxy WebSocket URL, or a gateway's socket as unix:/path/gateway-0.sock
    /// [default: the running local stack's (chatctl up), else ws://127.0.0.1:8080/ws].
    #[arg(long, env = "CHATCTL_URL")]
    url: Option<String>,
    /// JWT for gateways in AUTH_MODE=jwt [default: minted from the local stack's secret when
    /// it runs with --auth jwt].
    #[arg(long, env = "CHATCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Frame encoding.
    #[arg(long, env = "CHATCTL_ENCODING", value_enum, default_value_t = Wire::Json)]
    encoding: Wire,
    /// State directory of the local stack used for the defaults [default: as `chatctl up`].
    #[arg(long, env = "CHATCTL_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl ConnectArgs {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(layout::default_state_dir)
    }

    fn target(&self) -> anyhow::Result<Target> {
        Ok(endpoint::target(self.url.as_deref(), &self.state_dir())?)
    }

    fn identity(&self, target: &Target, user: Option<&str>) -> anyhow::Result<Identity> {
        Ok(endpoint::identity(
            self.token.as_deref(),
            user,
            target,
            &self.state_dir(),
        )?)
    }

    async fn session(&self, user: Option<&str>) -> anyhow::Result<Session> {
        let target = self.target()?;
        let identity = self.identity(&target, user)?;
        let config = SessionConfig::new(target, self.encoding.into(), identity);
        Ok(Session::start(config).await?)
    }
}

/// Options of `chatctl token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The user (`sub`).
    #[arg(long, env = "CHATCTL_USER")]
    user: String,
    /// Channel patterns the token allows (`*`, `?` globs), comma-separated [default: all].
    #[arg(long, env = "CHATCTL_TOKEN_CHANNELS", value_delimiter = ',')]
    channels: Vec<String>,
    /// Lifetime.
    #[arg(long, env = "CHATCTL_TOKEN_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// HS256 secret [default: the local stack's, from its state directory].
    #[arg(long, env = "CHATCTL_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// State directory of the local stack [default: as `chatctl up`].
    #[arg(long, env = "CHATCTL_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

/// `chatctl token`: prints a token for the user.
pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let secret = match args.secret {
        Some(secret) => secret,
        None => {
            let dir = args.state_dir.unwrap_or_else(layout::default_state_dir);
            Secrets::jwt_secret(&Layout::new(&dir).secrets())
                .with_context(|| {
                    format!(
                        "no JWT secret in {}: start `chatctl up --auth jwt` or pass --secret",
                        dir.display()
                    )
                })?
                .expose()
                .to_owned()
        }
    };
    let channels = (!args.channels.is_empty()).then_some(args.channels);
    say!(
        "{}",
        chatctl::token::mint(&secret, &args.user, args.ttl, channels)?
    );
    Ok(ExitCode::SUCCESS)
}

/// Options of `chatctl chat`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Your user name (with AUTH_MODE=none; with a token, the token names you).
    #[arg(long, env = "CHATCTL_USER")]
    user: Option<String>,
    /// Channels to join at start, comma-separated.
    #[arg(long, env = "CHATCTL_JOIN", value_delimiter = ',')]
    join: Vec<String>,
}

/// `chatctl chat`.
pub async fn chat(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let session = args.connect.session(args.user.as_deref()).await?;
    for channel in &args.join {
        session
            .handle
            .subscribe(channel, None)
            .await
            .with_context(|| format!("joining #{channel}"))?;
    }
    chatctl::chat::run(session, chatctl::shutdown::requested()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Options of `chatctl publish`.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Publish as this user.
    #[arg(long, env = "CHATCTL_USER")]
    user: Option<String>,
    /// The channel.
    #[arg(long, short, env = "CHATCTL_CHANNEL")]
    channel: String,
    /// Print each reply as JSON (channel, offset, msg_id).
    #[arg(long)]
    json: bool,
    /// Texts to publish, one message each [default: one message per line of stdin].
    texts: Vec<String>,
}

/// `chatctl publish`: exit 1 if any message was not accepted.
pub async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let session = args.connect.session(args.user.as_deref()).await?;
    let texts: Box<dyn Iterator<Item = std::io::Result<String>>> = if args.texts.is_empty() {
        Box::new(std::io::stdin().lock().lines())
    } else {
        Box::new(args.texts.into_iter().map(Ok))
    };
    let mut failed = 0;
    for text in texts {
        let text = text.context("reading stdin")?;
        match session.handle.publish(&args.channel, &text).await {
            Ok(reply) if args.json => say!("{}", serde_json::to_string(&reply)?),
            Ok(reply) => say!(
                "#{} offset {} {}",
                reply.channel,
                reply.offset,
                reply.msg_id
            ),
            Err(e) => {
                failed += 1;
                eprintln!("chatctl publish: not published: {e}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Options of `chatctl subscribe`.
#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Subscribe as this user.
    #[arg(long, env = "CHATCTL_USER")]
    user: Option<String>,
    /// Channels, repeatable or comma-separated.
    #[arg(
        long,
        short,
        env = "CHATCTL_CHANNEL",
        value_delimiter = ',',
        required = true
    )]
    channel: Vec<String>,
    /// One JSON object per line, as the server pushes them (`type` message, direct, presence).
    #[arg(long)]
    json: bool,
    /// Start after this offset (with --epoch; one channel): the missed messages come first.
    #[arg(long, requires = "epoch")]
    since: Option<u64>,
    /// The epoch of --since.
    #[arg(long, requires = "since")]
    epoch: Option<String>,
    /// Exit after this many channel messages.
    #[arg(long)]
    count: Option<u64>,
    /// Also print presence changes.
    #[arg(long)]
    presence: bool,
}

/// `chatctl subscribe`: streams messages to stdout; notices go to stderr.
pub async fn subscribe(args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    if args.since.is_some() && args.channel.len() != 1 {
        anyhow::bail!("--since needs exactly one --channel");
    }
    let mut session = args.connect.session(args.user.as_deref()).await?;
    let since = args
        .since
        .zip(args.epoch.clone())
        .map(|(offset, epoch)| Since { offset, epoch });
    for channel in &args.channel {
        let reply = session
            .handle
            .subscribe(channel, since.clone())
            .await
            .with_context(|| format!("subscribing to #{channel}"))?;
        if let (Some(since), false) = (&since, reply.recovered) {
            eprintln!(
                "! #{channel}: offsets after {} are no longer in Redis (epoch {}); paging history",
                since.offset, reply.epoch
            );
            let mut before = reply.offset + 1;
            let mut pages = Vec::new();
            while before > since.offset + 1 {
                let page = session
                    .handle
                    .history(channel, Some(before), Some(100))
                    .await?;
                let Some(oldest) = page.first().map(|m| m.offset) else {
                    break;
                };
                before = oldest;
                pages.push(page);
            }
            for message in pages
                .into_iter()
                .rev()
                .flatten()
                .filter(|m| m.offset > since.offset)
            {
                print_event(&Event::Message(message), &session.user, args.json)?;
            }
        }
        eprintln!(
            "subscribed to #{channel} (epoch {}, offset {})",
            reply.epoch, reply.offset
        );
    }
    let mut seen = 0;
    let shutdown = chatctl::shutdown::requested();
    tokio::pin!(shutdown);
    while args.count.is_none_or(|n| seen < n) {
        let event = tokio::select! {
            () = &mut shutdown => break,
            event = session.events.recv() => match event {
                Some(event) => event,
                None => break,
            },
        };
        match &event {
            Event::Message(_) => seen += 1,
            Event::Presence(_) if !args.presence => continue,
            Event::Disconnected { .. }
            | Event::Reconnected { .. }
            | Event::Gap { .. }
            | Event::InboxNotRecovered => {
                eprintln!("{}", format::event(&event, &session.user));
                continue;
            }
            _ => {}
        }
        print_event(&event, &session.user, args.json)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_event(event: &Event, me: &str, json: bool) -> anyhow::Result<()> {
    if !json {
        say!("{}", format::event(event, me));
        return Ok(());
    }
    let frame: ServerFrame = match event.clone() {
        Event::Message(m) => ServerFrame::Message(m),
        Event::Direct(d) => ServerFrame::Direct(d),
        Event::Presence(p) => ServerFrame::Presence(p),
        _ => return Ok(()),
    };
    say!("{}", serde_json::to_string(&frame)?);
    Ok(())
}

/// Options of `chatctl bots`.
#[derive(Debug, clap::Args)]
pub struct BotsArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Number of bots.
    #[arg(long, env = "CHATCTL_BOTS", default_value_t = 2)]
    count: usize,
    /// Messages per second of each bot while it sends its ten.
    #[arg(long, env = "CHATCTL_BOT_RATE", default_value_t = 5.0)]
    rate: f64,
    /// Pause after each ten messages.
    #[arg(long, env = "CHATCTL_BOT_PAUSE", default_value = "2s", value_parser = humantime::parse_duration)]
    pause: Duration,
    /// Stop after this long [default: run until Ctrl-C].
    #[arg(long, env = "CHATCTL_BOT_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
}

/// `chatctl bots`.
pub async fn bots(args: BotsArgs) -> anyhow::Result<ExitCode> {
    if args.rate <= 0.0 {
        anyhow::bail!("--rate must be above 0");
    }
    let target = args.connect.target()?;
    let config = chatctl::bots::BotsConfig {
        target: target.clone(),
        encoding: args.connect.encoding.into(),
        count: args.count,
        rate: args.rate,
        pause: args.pause,
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let connect = args.connect.clone();
    let (stats, mut bots) = chatctl::bots::start(
        &config,
        move |name| {
            connect
                .identity(&target, Some(&name))
                .map_err(|e| chatctl::client::ClientError::BadTarget(e.to_string()))
        },
        stop,
    )?;
    eprintln!(
        "{} bots → {} (Ctrl-C stops them)",
        args.count, config.target
    );
    let started = Instant::now();
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let shutdown = chatctl::shutdown::requested();
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    let mut failures = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = &mut deadline => break,
            _ = ticker.tick() => eprintln!(
                "bots: {} online, {} sent ({:.1}/s), {} errors",
                stats.online.load(Ordering::Relaxed),
                stats.sent.load(Ordering::Relaxed),
                stats.sent.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
                stats.errors.load(Ordering::Relaxed),
            ),
            Some(done) = bots.join_next() => {
                if let Ok(Err(e)) = done {
                    failures += 1;
                    eprintln!("a bot stopped: {e}");
                }
                if bots.is_empty() {
                    break;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    while let Some(done) = bots.join_next().await {
        if let Ok(Err(e)) = done {
            failures += 1;
            eprintln!("a bot stopped: {e}");
        }
    }
    say!(
        "bots: {} messages sent in {:.1}s, {} errors, {failures} bots failed",
        stats.sent.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        stats.errors.load(Ordering::Relaxed)
    );
    Ok(
        if failures == 0 && stats.errors.load(Ordering::Relaxed) == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}
