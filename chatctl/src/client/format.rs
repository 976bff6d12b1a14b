//! How pushes and session events read on a terminal, one line each (`chat`, `subscribe`).

use chatcluster_protocol::entry::Timestamp;
use chatcluster_protocol::frame::{ChannelMessage, DirectMessage, PresenceChange, PresenceEvent};

use super::session::{Event, Recovery};

/// `12:00:01`, local time.
pub fn clock(ts: Timestamp) -> String {
    ts.to_datetime()
        .with_timezone(&chrono::Local)
        .format("%H:%M:%S")
        .to_string()
}

/// `[12:00:01] #geral <alice> Olá!`
pub fn message(m: &ChannelMessage) -> String {
    format!("[{}] #{} <{}> {}", clock(m.ts), m.channel, m.user, m.text)
}

/// `[12:00:01] @alice → you: Oi!` or `[12:00:01] you → @bob: Oi!`.
pub fn direct(d: &DirectMessage, me: &str) -> String {
    if d.from == me {
        format!("[{}] you → @{}: {}", clock(d.ts), d.to, d.text)
    } else {
        format!("[{}] @{} → you: {}", clock(d.ts), d.from, d.text)
    }
}

/// `* carol joined #geral`.
pub fn presence(p: &PresenceEvent) -> String {
    let what = match p.event {
        PresenceChange::Join => "joined",
        PresenceChange::Leave => "left",
    };
    format!("* {} {what} #{}", p.user, p.channel)
}

fn recoveries(channels: &[Recovery]) -> String {
    if channels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = channels
        .iter()
        .map(|r| {
            let source = if r.recovered { "" } else { " from history" };
            format!("#{}: {} missed{source}", r.channel, r.missed)
        })
        .collect();
    format!("; {}", parts.join(", "))
}

/// A connection change or gap, for people: `! reconnected; #geral: 3 missed`.
pub fn notice(event: &Event) -> Option<String> {
    match event {
        Event::Disconnected { reason } => {
            Some(format!("! connection lost ({reason}); reconnecting…"))
        }
        Event::Reconnected { channels } => Some(format!("! reconnected{}", recoveries(channels))),
        Event::InboxNotRecovered => Some(
            "! some direct messages sent while away could not be recovered: /dms lists them"
                .to_owned(),
        ),
        Event::Gap {
            channel,
            after,
            before,
        } => Some(format!(
            "! #{channel}: {} message(s) could not be recovered (offsets {}..{})",
            before - after - 1,
            after + 1,
            before - 1
        )),
        Event::Message(_) | Event::Direct(_) | Event::Presence(_) => None,
    }
}

/// Any event as one line.
pub fn event(event: &Event, me: &str) -> String {
    match event {
        Event::Message(m) => message(m),
        Event::Direct(d) => direct(d, me),
        Event::Presence(p) => presence(p),
        other => notice(other).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_well() {
        let m = ChannelMessage {
            channel: "geral".into(),
            offset: 3,
            msg_id: uuid::Uuid::nil(),
            user: "alice".into(),
            text: "Olá!".into(),
            ts: Timestamp(0),
            clock: 1,
        };
        assert!(
            message(&m).ends_with("] #geral <alice> Olá!"),
            "{}",
            message(&m)
        );
        let gap = Event::Gap {
            channel: "geral".into(),
            after: 3,
            before: 7,
        };
        assert_eq!(
            notice(&gap).as_deref(),
            Some("! #geral: 3 message(s) could not be recovered (offsets 4..6)")
        );
        let back = Event::Reconnected {
            channels: vec![Recovery {
                channel: "geral".into(),
                missed: 2,
                recovered: true,
            }],
        };
        assert_eq!(
            notice(&back).as_deref(),
            Some("! reconnected; #geral: 2 missed")
        );
    }
}
