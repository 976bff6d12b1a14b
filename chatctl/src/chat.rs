//! `chatctl chat`: the interactive terminal client.
//!
//! The menu of the original client (list users, create a channel, list channels, subscribe,
//! publish, direct message, quit) as commands at a prompt, by number or by name. Plain text
//! goes to the current channel; `/dms` and `/dm` read direct messages back (also those that
//! arrived while offline). Incoming messages print above the line being typed (the
//! line editor redraws it), with line editing and history. The session underneath
//! reconnects and recovers by offset.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustyline::error::ReadlineError;
use tokio::sync::{mpsc, oneshot};

use crate::client::{ClientError, Session, SessionHandle, format};

/// One line typed at the prompt, understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// 1: list users.
    Users,
    /// 2: create a channel.
    Create(String),
    /// 3: list channels.
    Channels,
    /// 4: subscribe to a channel and make it current.
    Join(String),
    /// 5: publish to a channel.
    Publish {
        /// The channel.
        channel: String,
        /// The text.
        text: String,
    },
    /// 6: direct message.
    Direct {
        /// The recipient.
        to: String,
        /// The text.
        text: String,
    },
    /// 7: quit.
    Quit,
    /// Plain text: publish to the current channel.
    Say(String),
    /// Make a subscribed channel current.
    Switch(String),
    /// Unsubscribe.
    Leave(String),
    /// Who is in a channel (the current one by default).
    Who(Option<String>),
    /// The last messages of the current channel from history.
    History(u32),
    /// The conversations (direct messages), the newest first.
    Conversations,
    /// The last `n` direct messages with a user.
    DmHistory {
        /// The other user.
        with: String,
        /// How many.
        n: u32,
    },
    /// The menu.
    Help,
    /// Nothing typed.
    Empty,
}

/// The menu, numbered as the original client's.
pub const MENU: &str = concat!(
    "  1  /users                  list users\n",
    "  2  /create <channel>       create a channel\n",
    "  3  /channels               list channels\n",
    "  4  /join <channel>         subscribe (and make it the current channel)\n",
    "  5  /pub <channel> <text>   publish (plain text goes to the current channel)\n",
    "  6  /msg <user> <text>      direct message\n",
    "  7  /quit                   quit (also Ctrl-D)\n",
    "     /dms                    your conversations (direct messages), newest first\n",
    "     /dm <user> [n]          the last n (20) direct messages with a user\n",
    "     /switch <channel>  /leave <channel>  /who [channel]  /history [n]  /help",
);

/// Parses one line; `Err` says what is wrong with it.
pub fn parse(line: &str) -> Result<Input, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Input::Empty);
    }
    let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    let command = match word.strip_prefix('/') {
        Some(command) => command,
        None if word.len() == 1 && word.chars().all(|c| c.is_ascii_digit()) => word,
        None => return Ok(Input::Say(line.to_owned())),
    };
    let arg = |what: &str| -> Result<String, String> {
        let value = rest.split_whitespace().next().unwrap_or_default();
        if value.is_empty() {
            Err(format!("/{command} needs {what}"))
        } else {
            Ok(value.trim_start_matches(['#', '@']).to_owned())
        }
    };
    let pair = |what: &str| -> Result<(String, String), String> {
        let (first, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if first.is_empty() || text.trim().is_empty() {
            Err(format!("/{command} needs {what}"))
        } else {
            Ok((
                first.trim_start_matches(['#', '@']).to_owned(),
                text.trim().to_owned(),
            ))
        }
    };
    Ok(match command {
        "1" | "users" => Input::Users,
        "2" | "create" | "channel" => Input::Create(arg("a channel name")?),
        "3" | "channels" => Input::Channels,
        "4" | "join" | "subscribe" => Input::Join(arg("a channel name")?),
        "5" | "pub" | "publish" => {
            let (channel, text) = pair("a channel and a text")?;
            Input::Publish { channel, text }
        }
        "6" | "msg" => {
            let (to, text) = pair("a user and a text")?;
            Input::Direct { to, text }
        }
        "7" | "quit" | "exit" => Input::Quit,
        "switch" => Input::Switch(arg("a channel name")?),
        "leave" | "unsubscribe" => Input::Leave(arg("a channel name")?),
        "who" | "presence" => Input::Who(arg("").ok()),
        "history" => Input::History(rest.parse().unwrap_or(20).clamp(1, 100)),
        "dms" | "conversations" => Input::Conversations,
        "dm" => dm_history(rest)?,
        "help" | "menu" | "?" => Input::Help,
        other => return Err(format!("unknown command /{other}; /help lists them")),
    })
}

/// `/dm <user> [n]`: a user and an optional count (1..=100, default 20).
fn dm_history(rest: &str) -> Result<Input, String> {
    let mut words = rest.split_whitespace();
    let Some(with) = words.next() else {
        return Err("/dm needs a user".to_owned());
    };
    let n = match (words.next(), words.next()) {
        (None, _) => 20,
        (Some(n), None) => n.parse::<u32>().map_err(|_| {
            format!("/dm <user> [n] shows a conversation; send with /msg {with} <text>")
        })?,
        (Some(_), Some(_)) => {
            return Err(format!(
                "/dm <user> [n] shows a conversation; send with /msg {with} <text>"
            ));
        }
    };
    Ok(Input::DmHistory {
        with: with.trim_start_matches('@').to_owned(),
        n: n.clamp(1, 100),
    })
}

/// What the prompt shows and plain text targets, and the direct messages already shown.
#[derive(Debug, Default)]
struct Current {
    channel: Option<String>,
    subscribed: Vec<String>,
    /// Ids of direct messages this client sent and printed on their acknowledgement: their
    /// echo (pushed to all of the sender's connections) is not printed twice.
    sent: std::collections::VecDeque<uuid::Uuid>,
}

/// How many sent direct-message ids are remembered.
const SENT_MEMORY: usize = 256;

/// Prints above the input line (through the line editor) or, without a terminal, to stdout.
/// Lines go through a bounded queue to one printing thread, so slow terminals hold up no task.
#[derive(Debug)]
struct Output {
    queue: mpsc::Sender<String>,
    /// Completes when the printing thread has printed every line and the queue is closed.
    printed: oneshot::Receiver<()>,
}

/// How long [`Output::finish`] waits for the queued lines to be printed.
const PRINT_DRAIN: Duration = Duration::from_secs(2);

impl Output {
    fn start(printer: Option<Box<dyn rustyline::ExternalPrinter + Send>>) -> Self {
        let (queue, mut rx) = mpsc::channel::<String>(1024);
        let (done, printed) = oneshot::channel();
        std::thread::spawn(move || {
            let mut printer = printer;
            while let Some(mut line) = rx.blocking_recv() {
                line.push('\n');
                let printed = printer
                    .as_mut()
                    .is_some_and(|p| p.print(line.clone()).is_ok());
                if !printed {
                    use std::io::Write as _;
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.flush();
                }
            }
            let _ = done.send(());
        });
        Self { queue, printed }
    }

    async fn line(&self, text: impl Into<String>) {
        let _ = self.queue.send(text.into()).await;
    }

    /// Closes the queue and waits (bounded) until the lines in it are printed: the process
    /// exits right after, which would cut off the answer to the last command before a quit
    /// (`/who` then `/quit` piped in).
    async fn finish(self) {
        let Self { queue, printed } = self;
        drop(queue);
        if tokio::time::timeout(PRINT_DRAIN, printed).await.is_err() {
            tracing::debug!("output still printing at exit");
        }
    }
}

fn describe(error: &ClientError) -> String {
    format!("! {error}")
}

/// Carries out one command for user `me`; `false` to quit.
async fn execute(
    input: Input,
    me: &str,
    handle: &SessionHandle,
    current: &Mutex<Current>,
    out: &Output,
) -> bool {
    let current_channel = || {
        current
            .lock()
            .map(|c| c.channel.clone())
            .unwrap_or_default()
    };
    let result: Result<(), ClientError> = async {
        match input {
            Input::Empty => {}
            Input::Help => out.line(MENU).await,
            Input::Quit => return Err(ClientError::Closed),
            Input::Users => {
                out.line(format!("users: {}", handle.users().await?.join(", ")))
                    .await
            }
            Input::Channels => {
                out.line(format!("channels: {}", handle.channels().await?.join(", ")))
                    .await
            }
            Input::Create(channel) => {
                let created = handle.create_channel(&channel).await?;
                out.line(format!(
                    "#{channel} {}",
                    if created { "created" } else { "exists already" }
                ))
                .await;
            }
            Input::Join(channel) => {
                let reply = handle.subscribe(&channel, None).await?;
                out.line(format!(
                    "joined #{channel} (newest offset {}; present: {})",
                    reply.offset,
                    reply.presence.join(", ")
                ))
                .await;
                if let Ok(mut c) = current.lock() {
                    c.channel = Some(channel.clone());
                    if !c.subscribed.contains(&channel) {
                        c.subscribed.push(channel);
                    }
                }
            }
            Input::Switch(channel) => {
                let known = current
                    .lock()
                    .map(|c| c.subscribed.contains(&channel))
                    .unwrap_or(false);
                if known {
                    if let Ok(mut c) = current.lock() {
                        c.channel = Some(channel);
                    }
                } else {
                    out.line(format!("! not in #{channel}: /join {channel} first"))
                        .await;
                }
            }
            Input::Leave(channel) => {
                handle.unsubscribe(&channel).await?;
                if let Ok(mut c) = current.lock() {
                    c.subscribed.retain(|s| *s != channel);
                    if c.channel.as_deref() == Some(channel.as_str()) {
                        c.channel = c.subscribed.last().cloned();
                    }
                }
                out.line(format!("left #{channel}")).await;
            }
            Input::Publish { channel, text } => {
                handle.publish(&channel, &text).await?;
            }
            Input::Say(text) => match current_channel() {
                Some(channel) => {
                    handle.publish(&channel, &text).await?;
                }
                None => {
                    out.line("! no current channel: /join <channel> first (or /help)")
                        .await
                }
            },
            Input::Direct { to, text } => {
                let reply = handle.message(&to, &text).await?;
                if let Ok(mut c) = current.lock() {
                    if c.sent.len() == SENT_MEMORY {
                        c.sent.pop_front();
                    }
                    c.sent.push_back(reply.msg_id);
                }
                let now = chatcluster_protocol::entry::Timestamp::now();
                out.line(format!("[{}] you → @{to}: {text}", format::clock(now)))
                    .await;
            }
            Input::Who(channel) => match channel.or_else(current_channel) {
                Some(channel) => {
                    let users = handle.presence(&channel).await?;
                    out.line(format!("in #{channel}: {}", users.join(", ")))
                        .await;
                }
                None => out.line("! /who <channel>").await,
            },
            Input::History(n) => match current_channel() {
                Some(channel) => {
                    for m in handle.history(&channel, None, Some(n)).await? {
                        out.line(format::message(&m)).await;
                    }
                }
                None => out.line("! no current channel").await,
            },
            Input::Conversations => {
                let conversations = handle.conversations(None, None).await?;
                if conversations.is_empty() {
                    out.line("no direct messages yet").await;
                }
                for c in conversations {
                    out.line(format!("@{}: {}", c.with, format::direct(&c.last, me)))
                        .await;
                }
            }
            Input::DmHistory { with, n } => {
                let messages = handle.dm_history(&with, None, Some(n)).await?;
                if messages.is_empty() {
                    out.line(format!("no direct messages with @{with}")).await;
                }
                for m in messages {
                    out.line(format::direct(&m, me)).await;
                }
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => true,
        Err(ClientError::Closed) => false,
        Err(e) => {
            out.line(describe(&e)).await;
            true
        }
    }
}

/// A line from the input thread, with the way to tell it the command is done.
type Line = (Option<String>, oneshot::Sender<()>);

/// Reads lines on a thread of its own (the line editor blocks), one at a time: the next
/// prompt (which names the current channel) appears once the previous command is done.
fn input_thread(
    mut editor: rustyline::DefaultEditor,
    user: String,
    current: Arc<Mutex<Current>>,
    lines: mpsc::Sender<Line>,
) {
    std::thread::spawn(move || {
        loop {
            let channel = current.lock().ok().and_then(|c| c.channel.clone());
            let prompt = match channel {
                Some(channel) => format!("{user} #{channel}> "),
                None => format!("{user}> "),
            };
            let line = match editor.readline(&prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    Some(line)
                }
                Err(ReadlineError::Interrupted | ReadlineError::Eof) => None,
                Err(_) => None,
            };
            let quit = line.is_none();
            let (done, wait) = oneshot::channel();
            if lines.blocking_send((line, done)).is_err() || quit {
                return;
            }
            let _ = wait.blocking_recv();
        }
    });
}

/// Runs the interactive client until the user quits (or `shutdown` completes).
pub async fn run(
    session: Session,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), std::io::Error> {
    let Session {
        handle,
        mut events,
        user,
    } = session;
    let mut editor = rustyline::DefaultEditor::new().map_err(std::io::Error::other)?;
    let printer = editor
        .create_external_printer()
        .ok()
        .map(|p| Box::new(p) as Box<dyn rustyline::ExternalPrinter + Send>);
    let out = Output::start(printer);
    let current = Arc::new(Mutex::new(Current::default()));
    out.line(format!("connected as {user}. Commands:\n{MENU}"))
        .await;
    let (lines_tx, mut lines) = mpsc::channel::<Line>(1);
    input_thread(editor, user.clone(), current.clone(), lines_tx);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            line = lines.recv() => {
                let Some((Some(line), done)) = line else { break };
                let keep_going = match parse(&line) {
                    Ok(input) => execute(input, &user, &handle, &current, &out).await,
                    Err(problem) => {
                        out.line(format!("! {problem}")).await;
                        true
                    }
                };
                let _ = done.send(());
                if !keep_going {
                    break;
                }
            }
            event = events.recv() => match event {
                Some(crate::client::Event::Direct(d))
                    if current.lock().is_ok_and(|c| c.sent.contains(&d.msg_id)) => {}
                Some(event) => out.line(format::event(&event, &user)).await,
                None => {
                    out.line("! session ended").await;
                    break;
                }
            },
        }
    }
    out.finish().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn menu_numbers_and_names() {
        assert_eq!(parse("1"), Ok(Input::Users));
        assert_eq!(parse("/users"), Ok(Input::Users));
        assert_eq!(parse("2 tech"), Ok(Input::Create("tech".into())));
        assert_eq!(parse("3"), Ok(Input::Channels));
        assert_eq!(parse("/join #geral"), Ok(Input::Join("geral".into())));
        assert_eq!(
            parse("5 geral olá a todos"),
            Ok(Input::Publish {
                channel: "geral".into(),
                text: "olá a todos".into()
            })
        );
        assert_eq!(
            parse("/msg @bob oi"),
            Ok(Input::Direct {
                to: "bob".into(),
                text: "oi".into()
            })
        );
        assert_eq!(parse("7"), Ok(Input::Quit));
        assert_eq!(parse("hello there"), Ok(Input::Say("hello there".into())));
        assert_eq!(
            parse("42 is the answer"),
            Ok(Input::Say("42 is the answer".into()))
        );
        assert_eq!(parse("  "), Ok(Input::Empty));
        assert_eq!(parse("/history 5"), Ok(Input::History(5)));
        assert_eq!(parse("/who"), Ok(Input::Who(None)));
        assert_eq!(parse("/dms"), Ok(Input::Conversations));
        assert_eq!(
            parse("/dm @bob"),
            Ok(Input::DmHistory {
                with: "bob".into(),
                n: 20
            })
        );
        assert_eq!(
            parse("/dm bob 500"),
            Ok(Input::DmHistory {
                with: "bob".into(),
                n: 100
            })
        );
    }

    #[test]
    fn dm_shows_a_conversation_and_points_senders_to_msg() {
        assert_eq!(parse("/dm"), Err("/dm needs a user".into()));
        let wrong = parse("/dm bob olá").expect_err("a text is not a count");
        assert!(wrong.contains("/msg bob"), "{wrong}");
    }

    #[test]
    fn incomplete_commands_say_what_is_missing() {
        assert_eq!(parse("/join"), Err("/join needs a channel name".into()));
        assert_eq!(parse("6 bob"), Err("/6 needs a user and a text".into()));
        assert!(parse("/fly").expect_err("unknown").contains("/help"));
    }
}
