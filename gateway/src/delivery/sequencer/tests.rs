//! The sequencer driven input by input: every interleaving below is forced,
//! not waited for.

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

use chatcluster_protocol::codec::Encoding;
use chatcluster_protocol::entry::Timestamp;
use chatcluster_protocol::frame::{ChannelMessage, PresenceChange, PresenceEvent};

use super::*;
use crate::outbox::{Inbox, Outbox};

const EPOCH: &str = "e1";
const KEEP: usize = 1024;

fn message(offset: u64) -> ChannelMessage {
    ChannelMessage {
        channel: "geral".into(),
        offset,
        msg_id: uuid::Uuid::from_u128(u128::from(offset)),
        user: "alice".into(),
        text: format!("m{offset}"),
        ts: Timestamp(0),
        clock: offset,
    }
}

fn live(offset: u64, epoch: &str) -> Input {
    Input::Live {
        offset,
        epoch: epoch.into(),
        frame: SharedFrame::new(ServerFrame::Message(message(offset))),
    }
}

fn presence(user: &str) -> Input {
    Input::Presence(SharedFrame::new(ServerFrame::Presence(PresenceEvent {
        channel: "geral".into(),
        event: PresenceChange::Join,
        user: user.into(),
        clock: 1,
    })))
}

fn history(from: u64, to: u64) -> Vec<ServerFrame> {
    (from..=to)
        .map(|offset| ServerFrame::Message(message(offset)))
        .collect()
}

fn position(epoch: &str, top: u64) -> Option<Position> {
    Some(Position {
        epoch: epoch.into(),
        top,
    })
}

/// A client connection: what the sequencer queued for it, decoded.
struct Client {
    outbox: Outbox,
    inbox: Inbox,
    done: Option<oneshot::Receiver<Result<Joined, JoinError>>>,
}

impl Client {
    fn new(id: u64) -> Self {
        let (outbox, inbox) = Outbox::channel(id, Encoding::Json, 100_000);
        Self {
            outbox,
            inbox,
            done: None,
        }
    }

    fn join(&mut self, since: Option<(u64, &str)>) -> Input {
        let (done, answer) = oneshot::channel();
        self.done = Some(answer);
        Input::Join(JoinRequest {
            outbox: self.outbox.clone(),
            presence: Some((format!("u{}", self.outbox.id()).into(), "u".into())),
            since: since.map(|(offset, epoch)| Since {
                offset,
                epoch: epoch.into(),
            }),
            reply: ReplyContext {
                id: None,
                clock: 0,
                kind: ReplyKind::Subscribe {
                    presence: Vec::new(),
                },
            },
            done,
        })
    }

    fn joined(&mut self) -> Option<Result<Joined, JoinError>> {
        self.done.as_mut()?.try_recv().ok()
    }

    /// Every frame queued since the last call.
    fn frames(&self) -> Vec<Value> {
        let mut chunks = Vec::new();
        self.inbox.take(&mut chunks);
        chunks.iter().map(decode).collect()
    }
}

fn decode(frame: &Bytes) -> Value {
    let header = match frame[1] {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    serde_json::from_slice(&frame[header..]).expect("json frame")
}

/// Offsets of message pushes.
fn offsets(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "message")
        .map(|f| f["offset"].as_u64().unwrap())
        .collect()
}

fn missed(reply: &Value) -> Vec<u64> {
    reply["data"]["missed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

fn direct(offset: u64) -> ServerFrame {
    ServerFrame::Direct(chatcluster_protocol::frame::DirectMessage {
        offset: Some(offset),
        msg_id: uuid::Uuid::from_u128(u128::from(offset)),
        from: "alice".into(),
        to: "bob".into(),
        text: format!("d{offset}"),
        ts: Timestamp(0),
        clock: offset,
    })
}

/// A connection of bob joining his inbox (`login`).
fn login(client: &mut Client, since: Option<(u64, &str)>, kind: ReplyKind) -> Input {
    let (done, answer) = oneshot::channel();
    client.done = Some(answer);
    Input::Join(JoinRequest {
        outbox: client.outbox.clone(),
        presence: None,
        since: since.map(|(offset, epoch)| Since {
            offset,
            epoch: epoch.into(),
        }),
        reply: ReplyContext {
            id: Some(RequestId::Int(1)),
            clock: 0,
            kind,
        },
        done,
    })
}

/// A sequencer and the effects it asked for.
struct Harness {
    sequencer: Sequencer,
    effects: Vec<Effect>,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Self::of(StreamId::channel("geral"))
    }

    fn of(stream: StreamId) -> Self {
        let mut effects = Vec::new();
        let sequencer = Sequencer::new(stream, KEEP, &mut effects);
        assert_eq!(effects, [Effect::Subscribe]);
        effects.clear();
        Self {
            sequencer,
            effects,
            now: Instant::now(),
        }
    }

    /// A sequencer live at `top` with `client` a member since `top`.
    fn live_at(top: u64, client: &mut Client) -> Self {
        let mut harness = Self::new();
        harness.input(client.join(None));
        harness.input(Input::Subscribed(Ok(())));
        let start = harness.fetch();
        assert_eq!(start.range, None);
        assert!(start.start_epoch);
        harness.answer(&start, position(EPOCH, top), Vec::new());
        let reply = client.frames();
        assert_eq!(reply[0]["data"]["offset"], top);
        harness
    }

    fn input(&mut self, input: Input) {
        self.sequencer.handle(input, self.now, &mut self.effects);
    }

    fn fetch(&mut self) -> Fetch {
        let index = self
            .effects
            .iter()
            .position(|e| matches!(e, Effect::Fetch(_)))
            .expect("a fetch was asked for");
        match self.effects.remove(index) {
            Effect::Fetch(fetch) => fetch,
            _ => unreachable!(),
        }
    }

    fn no_fetch(&self) {
        assert!(
            !self.effects.iter().any(|e| matches!(e, Effect::Fetch(_))),
            "unexpected fetch: {:?}",
            self.effects
        );
    }

    fn answer(&mut self, fetch: &Fetch, position: Option<Position>, messages: Vec<ServerFrame>) {
        self.input(Input::Fetched(fetch.id, Ok(Fetched { position, messages })));
    }
}

/// The reported bug: the channel is live on this gateway but its pub/sub lags
/// (delivered 8 while 10 exist); a client that saw 5 recovers. The reply holds
/// 6..=8 and 9, 10 follow as pushes, whatever order the read and the live
/// messages arrive in.
#[test]
fn recovering_joiner_gets_what_arrives_while_its_read_is_in_flight() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(8, &mut member);
    let mut joiner = Client::new(2);
    harness.input(joiner.join(Some((5, EPOCH))));
    let read = harness.fetch();
    assert_eq!(read.range, Some((ReadFrom::After(5), Some(8))));
    harness.input(live(9, EPOCH));
    harness.input(live(10, EPOCH));
    assert!(joiner.frames().is_empty(), "nothing before the reply");
    harness.answer(&read, position(EPOCH, 10), history(6, 8));
    let frames = joiner.frames();
    assert_eq!(missed(&frames[0]), [6, 7, 8]);
    assert_eq!(frames[0]["data"]["recovered"], true);
    assert_eq!(frames[0]["data"]["offset"], 8);
    assert_eq!(offsets(&frames[1..]), [9, 10]);
    harness.input(live(11, EPOCH));
    assert_eq!(offsets(&joiner.frames()), [11]);
    assert_eq!(offsets(&member.frames()), [9, 10, 11]);
    assert_eq!(
        joiner.joined(),
        Some(Ok(Joined {
            epoch: EPOCH.into(),
            offset: 8,
            recovered: true
        }))
    );
}

/// The shared-offset window: a joiner that saw more than this gateway
/// delivered (via another gateway) must not move what an existing member
/// receives.
#[test]
fn a_joiner_ahead_of_the_gateway_does_not_move_other_members() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(10, &mut member);
    let mut joiner = Client::new(2);
    harness.input(joiner.join(Some((12, EPOCH))));
    let check = harness.fetch();
    harness.input(live(11, EPOCH));
    harness.answer(&check, position(EPOCH, 12), Vec::new());
    harness.input(live(12, EPOCH));
    harness.input(live(13, EPOCH));
    assert_eq!(
        offsets(&member.frames()),
        [11, 12, 13],
        "member misses nothing"
    );
    let frames = joiner.frames();
    assert_eq!(frames[0]["data"]["offset"], 12);
    assert_eq!(frames[0]["data"]["recovered"], true);
    assert_eq!(
        offsets(&frames[1..]),
        [13],
        "joiner gets exactly what follows 12"
    );
}

/// The second window: on a live channel, pushes at or below the reply's
/// offset never reach the joiner a second time, even when the topic repeats them.
#[test]
fn a_live_channel_never_duplicates_around_the_reply() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(10, &mut member);
    harness.input(live(11, EPOCH));
    harness.input(live(12, EPOCH));
    let mut joiner = Client::new(2);
    harness.input(joiner.join(Some((9, EPOCH))));
    let read = harness.fetch();
    assert_eq!(read.range, Some((ReadFrom::After(9), Some(12))));
    harness.input(live(12, EPOCH)); // a repeat
    harness.input(live(13, EPOCH));
    harness.answer(&read, position(EPOCH, 13), history(10, 12));
    let frames = joiner.frames();
    assert_eq!(missed(&frames[0]), [10, 11, 12]);
    assert_eq!(offsets(&frames[1..]), [13]);
    // Up to date already: answered at once, no read.
    let mut current = Client::new(3);
    harness.input(current.join(Some((13, EPOCH))));
    harness.no_fetch();
    let frames = current.frames();
    assert_eq!(frames[0]["data"]["recovered"], true);
    assert_eq!(missed(&frames[0]), Vec::<u64>::new());
    harness.input(live(14, EPOCH));
    assert_eq!(offsets(&current.frames()), [14]);
    assert_eq!(offsets(&member.frames()), [11, 12, 13, 14]);
}

#[test]
fn trimmed_history_is_not_recovered_and_continues_after_the_cut() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(100, &mut member);
    let mut joiner = Client::new(2);
    harness.input(joiner.join(Some((5, EPOCH))));
    let read = harness.fetch();
    harness.answer(&read, position(EPOCH, 100), history(50, 100));
    let frames = joiner.frames();
    assert_eq!(frames[0]["data"]["recovered"], false);
    assert_eq!(missed(&frames[0]), Vec::<u64>::new());
    assert_eq!(frames[0]["data"]["offset"], 100);
    harness.input(live(101, EPOCH));
    assert_eq!(offsets(&joiner.frames()), [101]);
}

#[test]
fn another_epoch_or_no_since_is_answered_at_once_without_recovery() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(7, &mut member);
    for (id, since) in [(2, Some((3, "old"))), (3, None)] {
        let mut joiner = Client::new(id);
        harness.input(joiner.join(since));
        harness.no_fetch();
        let frames = joiner.frames();
        assert_eq!(frames[0]["data"]["recovered"], false);
        assert_eq!(frames[0]["data"]["epoch"], EPOCH);
        assert_eq!(frames[0]["data"]["offset"], 7);
    }
}

#[test]
fn a_gap_is_filled_before_later_messages_and_other_input_goes_on() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(3, &mut member);
    harness.input(live(6, EPOCH));
    let gap = harness.fetch();
    assert_eq!(gap.range, Some((ReadFrom::After(3), Some(5))));
    harness.input(live(7, EPOCH));
    harness.input(presence("bob"));
    // A join meanwhile is served with the cut-off as it stands.
    let mut joiner = Client::new(2);
    harness.input(joiner.join(Some((3, EPOCH))));
    assert!(member.frames().is_empty(), "held behind the gap");
    harness.answer(&gap, position(EPOCH, 7), history(4, 5));
    let frames = member.frames();
    assert_eq!(offsets(&frames), [4, 5, 6, 7]);
    assert_eq!(frames.last().unwrap()["type"], "presence", "order kept");
    assert_eq!(harness.sequencer.tally.gap_filled, 2);
    // The joiner's cut was 3: its reply is complete at once, then everything.
    let frames = joiner.frames();
    assert_eq!(frames[0]["data"]["offset"], 3);
    assert_eq!(offsets(&frames[1..]), [4, 5, 6, 7]);
}

#[test]
fn a_gap_history_no_longer_has_is_counted_and_skipped() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(3, &mut member);
    harness.input(live(9, EPOCH));
    let gap = harness.fetch();
    harness.answer(&gap, position(EPOCH, 9), history(7, 8));
    assert_eq!(offsets(&member.frames()), [7, 8, 9]);
    assert_eq!(harness.sequencer.tally.lost, 3);
    harness.no_fetch();
    harness.input(live(10, EPOCH));
    assert_eq!(offsets(&member.frames()), [10]);
}

#[test]
fn a_failed_gap_read_is_retried_from_the_tick_with_messages_held() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(3, &mut member);
    harness.input(live(5, EPOCH));
    let gap = harness.fetch();
    harness.input(Input::Fetched(gap.id, Err("timeout".into())));
    harness.no_fetch();
    let now = harness.now;
    harness
        .sequencer
        .tick(now, std::time::Duration::from_secs(5), &mut harness.effects);
    let retry = harness.fetch();
    assert_eq!(retry.range, Some((ReadFrom::After(3), None)));
    harness.input(live(6, EPOCH));
    assert!(member.frames().is_empty(), "held until the read is back");
    harness.answer(&retry, position(EPOCH, 6), history(4, 6));
    assert_eq!(offsets(&member.frames()), [4, 5, 6]);
}

#[test]
fn resync_reads_everything_after_delivered_and_drops_repeats() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(5, &mut member);
    harness.input(Input::Resync);
    let read = harness.fetch();
    assert_eq!(read.range, Some((ReadFrom::After(5), None)));
    harness.input(live(8, EPOCH));
    harness.input(live(9, EPOCH));
    harness.answer(&read, position(EPOCH, 8), history(6, 8));
    assert_eq!(offsets(&member.frames()), [6, 7, 8, 9]);
}

#[test]
fn a_new_epoch_restarts_every_member_from_it() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(500, &mut member);
    // Redis was wiped; the new epoch continues after PostgreSQL's highest offset, 300.
    harness.input(live(302, "e2"));
    let read = harness.fetch();
    assert_eq!(read.range, Some((ReadFrom::Start, None)));
    harness.answer(&read, position("e2", 302), history(301, 302));
    harness.input(live(303, "e2"));
    assert_eq!(offsets(&member.frames()), [301, 302, 303]);
    let mut joiner = Client::new(2);
    harness.input(joiner.join(Some((302, "e2"))));
    let read = harness.fetch();
    assert_eq!(read.range, Some((ReadFrom::After(302), Some(303))));
    harness.answer(&read, position("e2", 303), history(303, 303));
    let frames = joiner.frames();
    assert_eq!(frames[0]["data"]["recovered"], true);
    assert_eq!(missed(&frames[0]), [303]);
}

#[test]
fn joins_wait_for_the_start_and_early_messages_are_cut_at_the_position() {
    let mut harness = Harness::new();
    let mut first = Client::new(1);
    let mut second = Client::new(2);
    harness.input(first.join(None));
    harness.input(Input::Subscribed(Ok(())));
    harness.input(second.join(Some((18, EPOCH))));
    let start = harness.fetch();
    harness.input(live(20, EPOCH)); // published before the position was read
    harness.input(live(21, EPOCH)); // after
    harness.answer(&start, position(EPOCH, 20), Vec::new());
    // Joins are admitted at the position read, before held messages go out.
    let read = harness.fetch();
    assert_eq!(read.range, Some((ReadFrom::After(18), Some(20))));
    let frames = first.frames();
    assert_eq!(frames[0]["data"]["offset"], 20);
    assert_eq!(offsets(&frames[1..]), [21]);
    harness.answer(&read, position(EPOCH, 21), history(19, 20));
    let frames = second.frames();
    assert_eq!(missed(&frames[0]), [19, 20]);
    assert_eq!(
        offsets(&frames[1..]),
        [21],
        "kept for it while its read was in flight"
    );
}

#[test]
fn a_failed_subscription_fails_the_joins_and_leaves_nothing() {
    let mut harness = Harness::new();
    let mut client = Client::new(1);
    harness.input(client.join(None));
    harness.input(Input::Subscribed(Err("down".into())));
    assert!(matches!(
        client.joined(),
        Some(Err(JoinError {
            code: ErrorCode::Unavailable,
            ..
        }))
    ));
    assert!(harness.sequencer.is_failed());
    assert!(client.frames().is_empty(), "the session answers the error");
}

#[test]
fn the_topic_is_released_after_the_last_leave_and_the_linger() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(1, &mut member);
    let linger = std::time::Duration::from_secs(5);
    harness.input(Input::Leave(1));
    let now = harness.now;
    assert!(!harness.sequencer.tick(now, linger, &mut harness.effects));
    assert!(
        harness
            .sequencer
            .tick(now + linger, linger, &mut harness.effects)
    );
}

#[test]
fn a_joiner_that_lets_too_much_pile_up_is_closed_as_a_slow_reader() {
    let mut member = Client::new(1);
    let mut harness = Harness::live_at(0, &mut member);
    // A join with an offset ahead of the gateway waits for a read.
    let mut slow = Client::new(3);
    harness.input(slow.join(Some((5, EPOCH))));
    let _read = harness.fetch();
    for offset in 1..=(KEEP as u64 + 1) {
        harness.input(live(offset, EPOCH));
    }
    assert!(slow.outbox.is_closed());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// Random interleavings of publishes (some lost on the way), joins with
    /// random `since`, reads answered late and in any order: every joiner ends
    /// with exactly the messages after what it saw, once each, in order.
    #[test]
    fn every_interleaving_delivers_exactly_once(
        steps in proptest::collection::vec(0u8..6, 1..120),
        seed in proptest::prelude::any::<u64>(),
    ) {
        simulate(&steps, seed)?;
    }
}

/// A tiny deterministic generator for the simulation's choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

fn simulate(steps: &[u8], seed: u64) -> Result<(), proptest::test_runner::TestCaseError> {
    let mut rng = Rng(seed);
    let mut harness = Harness::new();
    let mut published = 0u64;
    let mut clients: Vec<(Client, Option<u64>)> = Vec::new();
    let mut pending: Vec<Fetch> = Vec::new();
    let mut subscribed = false;
    let mut next_id = 1;
    let answer = |harness: &mut Harness, fetch: &Fetch, published: u64| {
        let messages = match fetch.range {
            None => Vec::new(),
            Some((from, until)) => {
                let from = match from {
                    ReadFrom::Start => 1,
                    ReadFrom::After(offset) => offset + 1,
                };
                let until = until.unwrap_or(published).min(published);
                if from > until {
                    Vec::new()
                } else {
                    history(from, until)
                }
            }
        };
        harness.answer(fetch, position(EPOCH, published), messages);
    };
    for &step in steps {
        match step {
            0 | 1 => {
                published += 1;
                // Subscribed channels receive the publish, unless it is lost on the way.
                if subscribed && rng.below(8) != 0 {
                    harness.input(live(published, EPOCH));
                }
            }
            2 => {
                let mut client = Client::new(next_id);
                next_id += 1;
                let since = (published > 0 && rng.below(3) != 0).then(|| rng.below(published + 1));
                harness.input(client.join(since.map(|s| (s, EPOCH))));
                clients.push((client, since));
            }
            3 if !subscribed => {
                harness.input(Input::Subscribed(Ok(())));
                subscribed = true;
            }
            _ => {
                while let Some(index) = harness
                    .effects
                    .iter()
                    .position(|e| matches!(e, Effect::Fetch(_)))
                {
                    if let Effect::Fetch(fetch) = harness.effects.remove(index) {
                        pending.push(fetch);
                    }
                }
                if !pending.is_empty() {
                    let fetch = pending.remove(rng.below(pending.len() as u64) as usize);
                    answer(&mut harness, &fetch, published);
                }
            }
        }
    }
    // Quiesce: subscribe, catch up once, answer every read.
    if !subscribed {
        harness.input(Input::Subscribed(Ok(())));
    }
    harness.input(Input::Resync);
    loop {
        while let Some(index) = harness
            .effects
            .iter()
            .position(|e| matches!(e, Effect::Fetch(_)))
        {
            if let Effect::Fetch(fetch) = harness.effects.remove(index) {
                pending.push(fetch);
            }
        }
        if pending.is_empty() {
            break;
        }
        let fetch = pending.remove(0);
        answer(&mut harness, &fetch, published);
    }
    for (client, since) in &mut clients {
        let frames = client.frames();
        proptest::prop_assert!(!frames.is_empty(), "every join is answered");
        let reply = &frames[0]["data"];
        let floor = reply["offset"].as_u64().unwrap();
        let mut got = missed(&frames[0]);
        got.extend(offsets(&frames[1..]));
        // History is complete in this model: every recovery must succeed.
        proptest::prop_assert_eq!(
            reply["recovered"] == true,
            since.is_some(),
            "reply {}",
            reply
        );
        let start = since.unwrap_or(floor);
        let expected: Vec<u64> = (start + 1..=published).collect();
        proptest::prop_assert_eq!(&got, &expected, "client since {:?} reply {}", since, reply);
    }
    Ok(())
}

#[test]
fn an_inbox_login_is_answered_first_then_the_recovered_messages_follow_as_pushes() {
    let mut harness = Harness::of(StreamId::inbox("bob"));
    let mut phone = Client::new(1);
    harness.input(login(
        &mut phone,
        Some((1, EPOCH)),
        ReplyKind::Login { user: "bob".into() },
    ));
    harness.input(Input::Subscribed(Ok(())));
    let start = harness.fetch();
    harness.answer(&start, position(EPOCH, 3), Vec::new());
    let read = harness.fetch();
    assert_eq!(read.range, Some((ReadFrom::After(1), Some(3))));
    harness.answer(&read, position(EPOCH, 3), vec![direct(2), direct(3)]);
    let frames = phone.frames();
    assert_eq!(frames[0]["type"], "ok");
    assert_eq!(
        frames[0]["data"],
        serde_json::json!({"user": "bob", "inbox": {"epoch": EPOCH, "offset": 3, "recovered": true}})
    );
    let pushed: Vec<u64> = frames[1..]
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(pushed, [2, 3]);
    assert!(frames[1..].iter().all(|f| f["type"] == "direct"));
    assert_eq!(
        harness.sequencer.pushed(),
        Some(&(EPOCH.into(), 3)),
        "to remember as seen"
    );
    // A connection logged in by its token gets only the pushes.
    let mut laptop = Client::new(2);
    harness.input(login(&mut laptop, Some((2, EPOCH)), ReplyKind::Silent));
    let read = harness.fetch();
    harness.answer(&read, position(EPOCH, 3), vec![direct(3)]);
    let frames = laptop.frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (frames[0]["type"].as_str(), frames[0]["offset"].as_u64()),
        (Some("direct"), Some(3))
    );
    assert!(laptop.joined().unwrap().is_ok());
}

#[test]
fn an_inbox_without_an_epoch_is_joined_and_its_first_message_starts_one() {
    let mut harness = Harness::of(StreamId::inbox("bob"));
    let mut phone = Client::new(1);
    harness.input(login(
        &mut phone,
        None,
        ReplyKind::Login { user: "bob".into() },
    ));
    harness.input(Input::Subscribed(Ok(())));
    let start = harness.fetch();
    // No epoch could be started (PostgreSQL down): bob logs in all the same.
    harness.answer(&start, None, Vec::new());
    let reply = phone.frames();
    assert_eq!(reply[0]["data"]["inbox"]["offset"], 0);
    assert!(phone.joined().unwrap().is_ok());
    // The first message (of an epoch started after 100) is read from the start.
    harness.input(Input::Live {
        offset: 101,
        epoch: "e9".into(),
        frame: SharedFrame::new(direct(101)),
    });
    let fill = harness.fetch();
    assert_eq!(fill.range, Some((ReadFrom::Start, None)));
    harness.answer(&fill, position("e9", 101), vec![direct(101)]);
    let pushed = phone.frames();
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    assert_eq!(pushed[0]["offset"], 101);
}
