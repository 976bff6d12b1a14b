//! Direct-message routes: which local connections receive a user's topic.
//!
//! A user's topic is subscribed when the user's first connection on this
//! gateway logs in (the login is answered once Redis confirmed it) and
//! released after the last one leaves and the linger passed.

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::outbox::{ConnId, Outbox, Pushed, SharedFrame};

/// Answer to a connection coming online: `Err` carries a message for logs.
pub type Online = oneshot::Sender<Result<(), String>>;

#[derive(Debug)]
enum Phase {
    /// Waiting for the topic subscription; these logins wait with it.
    Subscribing(Vec<Online>),
    Live,
}

/// The local connections of one user.
#[derive(Debug)]
pub struct UserRoute {
    connections: Vec<Outbox>,
    phase: Phase,
    idle_since: Option<Instant>,
}

/// What the dispatcher must do for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteEffect {
    /// Nothing.
    None,
    /// Subscribe the user's topic.
    Subscribe,
    /// Release the user's topic; the route is finished.
    Unsubscribe,
}

impl UserRoute {
    /// A route for a user's first connection here: its topic must be subscribed.
    pub fn new(outbox: Outbox, online: Online) -> Self {
        Self {
            connections: vec![outbox],
            phase: Phase::Subscribing(vec![online]),
            idle_since: None,
        }
    }

    /// Another connection of the user.
    pub fn add(&mut self, outbox: Outbox, online: Online) {
        self.idle_since = None;
        self.connections.push(outbox);
        match &mut self.phase {
            Phase::Subscribing(waiting) => waiting.push(online),
            Phase::Live => {
                let _ = online.send(Ok(()));
            }
        }
    }

    /// A connection left.
    pub fn remove(&mut self, conn: ConnId, now: Instant) {
        self.connections.retain(|c| c.id() != conn);
        if self.connections.is_empty() {
            self.idle_since = Some(now);
        }
    }

    /// The topic subscription's outcome. Returns false when the route failed
    /// and must be dropped.
    pub fn subscribed(&mut self, result: Result<(), String>) -> bool {
        let ok = result.is_ok();
        if let Phase::Subscribing(waiting) = std::mem::replace(&mut self.phase, Phase::Live) {
            for online in waiting {
                let _ = online.send(result.clone());
            }
        }
        if !ok {
            self.connections.clear();
        }
        ok
    }

    /// Queues a direct message to every connection; returns frames queued and
    /// slow readers found.
    pub fn deliver(&self, frame: &Arc<SharedFrame>) -> (u64, u64) {
        let (mut queued, mut slow) = (0, 0);
        for outbox in &self.connections {
            match outbox.push_shared(frame) {
                Pushed::Queued => queued += 1,
                Pushed::Overflowed => slow += 1,
                Pushed::Closed => {}
            }
        }
        (queued, slow)
    }

    /// Whether no connection has been here for `linger`.
    pub fn expired(&mut self, now: Instant, linger: std::time::Duration) -> bool {
        self.connections.is_empty()
            && now.duration_since(*self.idle_since.get_or_insert(now)) >= linger
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chatcluster_protocol::codec::Encoding;

    #[test]
    fn logins_wait_for_the_subscription_then_pass_at_once() {
        let (first, _) = Outbox::channel(1, Encoding::Json, 8);
        let (second, _) = Outbox::channel(2, Encoding::Json, 8);
        let (third, _) = Outbox::channel(3, Encoding::Json, 8);
        let (a, mut a_done) = oneshot::channel();
        let (b, mut b_done) = oneshot::channel();
        let (c, mut c_done) = oneshot::channel();
        let mut route = UserRoute::new(first, a);
        route.add(second, b);
        assert!(a_done.try_recv().is_err(), "not before Redis confirmed");
        assert!(route.subscribed(Ok(())));
        assert_eq!(a_done.try_recv(), Ok(Ok(())));
        assert_eq!(b_done.try_recv(), Ok(Ok(())));
        route.add(third, c);
        assert_eq!(c_done.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn a_failed_subscription_fails_every_waiting_login() {
        let (first, _) = Outbox::channel(1, Encoding::Json, 8);
        let (a, mut a_done) = oneshot::channel();
        let mut route = UserRoute::new(first, a);
        assert!(!route.subscribed(Err("down".into())));
        assert_eq!(a_done.try_recv(), Ok(Err("down".into())));
    }

    #[test]
    fn expires_after_the_linger_once_empty() {
        let (first, _) = Outbox::channel(1, Encoding::Json, 8);
        let (a, _a_done) = oneshot::channel();
        let mut route = UserRoute::new(first, a);
        let now = Instant::now();
        let linger = std::time::Duration::from_secs(5);
        assert!(!route.expired(now + linger, linger), "a connection is here");
        route.remove(1, now);
        assert!(!route.expired(now, linger));
        assert!(route.expired(now + linger, linger));
    }
}
