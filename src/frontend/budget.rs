//! How many events one socket may send, a token bucket per socket, and in
//! what order its joins are handled: one at a time.
//!
//! A client sends few events (a `room` per room it opens). A socket that
//! sends more than `burst` at once, or more than `rate` per second for long,
//! gets its events refused; one that keeps on after many refusals is
//! disconnected, so a flood costs the frontend little and other sockets
//! nothing.
//!
//! # What a flooding client sees
//!
//! The answers to its events, in full, then the disconnect packet, then
//! nothing: the burst is answered (`room` joins), then refusals, and the
//! event of the [`REFUSALS_BEFORE_DISCONNECT`]th refusal in a row is
//! refused too, followed by the disconnect. Events after it are not answered.
//!
//! Two things make that hold whatever the timing:
//!
//! - [`Flood::admit`] hands every answered event a share of a lock that the
//!   disconnect takes whole ([`Flood::answered`]): the disconnect packet
//!   leaves after the answer to every event admitted before it, also when a
//!   join is still waiting (for Redis, or on another thread).
//! - After the disconnect the connection stays open for
//!   [`DISCONNECT_LINGER`] ([`linger`]), its further events ignored. A
//!   socket.io client closes it itself on the disconnect packet. Were the
//!   server to close the connection at once, while the flood's later events
//!   still sit unread in its receive buffer, the kernel would reset the
//!   connection (RST), and a reset makes the client's kernel discard what
//!   the client has not read yet: the answers and the disconnect packet.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socketioxide::extract::SocketRef;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// Refusals in a row after which the socket is disconnected.
pub const REFUSALS_BEFORE_DISCONNECT: u32 = 50;

/// How long a disconnected flooder's connection stays open for the client
/// to read the answers and the disconnect packet and close it; then the
/// server closes it.
pub const DISCONNECT_LINGER: Duration = Duration::from_secs(5);

/// What to do with one incoming event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Refuse,
    /// Refuse, then disconnect the socket.
    Disconnect,
    /// The socket was disconnected: no answer.
    Ignore,
}

#[derive(Debug)]
pub struct EventBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    refusals: u32,
    disconnected: bool,
}

impl EventBudget {
    pub fn new(rate: u32, burst: u32) -> Self {
        EventBudget {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
            refusals: 0,
            disconnected: false,
        }
    }

    /// Spends one event at time `now`.
    pub fn spend(&mut self, now: Instant) -> Verdict {
        if self.disconnected {
            return Verdict::Ignore;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refusals = 0;
            Verdict::Allow
        } else {
            self.refusals += 1;
            if self.refusals == REFUSALS_BEFORE_DISCONNECT {
                self.disconnected = true;
                Verdict::Disconnect
            } else {
                Verdict::Refuse
            }
        }
    }
}

/// One socket's budget, shared by its event handlers, and the order of its
/// answers (see the module documentation).
#[derive(Debug)]
pub struct Flood {
    budget: Mutex<EventBudget>,
    answering: Arc<RwLock<()>>,
    /// Held while one join is handled: a socket never has two resumes under
    /// way. Kept here, where each socket's state already is, rather than in
    /// an allocation of its own.
    turns: tokio::sync::Mutex<()>,
}

/// Held while an allowed or refused event is being answered.
#[derive(Debug)]
pub struct Answering {
    _share: OwnedRwLockReadGuard<()>,
}

/// What to do with one incoming event.
#[derive(Debug)]
pub enum Admission {
    /// Handle it; answer before dropping the guard.
    Allow(Answering),
    /// Answer that it is refused before dropping the guard.
    Refuse(Answering),
    /// Wait for [`Flood::answered`], answer that it is refused, disconnect.
    Disconnect,
    /// The socket was disconnected: no answer.
    Ignore,
}

impl Flood {
    pub fn new(rate: u32, burst: u32) -> Self {
        Flood {
            budget: Mutex::new(EventBudget::new(rate, burst)),
            answering: Arc::new(RwLock::new(())),
            turns: tokio::sync::Mutex::new(()),
        }
    }

    /// Spends one event of the socket's budget.
    pub fn admit(&self) -> Admission {
        let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let verdict = budget.spend(Instant::now());
        // Taken under the budget's lock, so in the order of the verdicts. The
        // lock is taken whole only after the one Disconnect verdict, after
        // which every verdict is Ignore: a share is always available here.
        let share = || {
            let share = self.answering.clone().try_read_owned().ok()?;
            Some(Answering { _share: share })
        };
        match verdict {
            Verdict::Allow => share().map_or(Admission::Ignore, Admission::Allow),
            Verdict::Refuse => share().map_or(Admission::Ignore, Admission::Refuse),
            Verdict::Disconnect => Admission::Disconnect,
            Verdict::Ignore => Admission::Ignore,
        }
    }

    /// Waits for the socket's joins before this one to be handled.
    pub async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turns.lock().await
    }

    /// Resolves once every event admitted before the disconnect is answered.
    pub async fn answered(&self) -> OwnedRwLockWriteGuard<()> {
        self.answering.clone().write_owned().await
    }
}

/// Keeps a disconnected flooder's connection open for [`DISCONNECT_LINGER`],
/// then closes it (if the client has not). Runs in the socket's disconnect
/// handler: socketioxide removes the socket from its namespace only after
/// that handler, so meanwhile its further events reach its handlers, which
/// ignore them, instead of making socketioxide close the connection at once.
pub async fn linger(socket: &SocketRef) {
    tokio::time::sleep(DISCONNECT_LINGER).await;
    socket.close_transport();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_then_a_flood_disconnects() {
        let start = Instant::now();
        let mut budget = EventBudget::new(10, 20);
        for _ in 0..20 {
            assert_eq!(budget.spend(start), Verdict::Allow);
        }
        assert_eq!(budget.spend(start), Verdict::Refuse);
        // 100 ms later one token (10/s) is back.
        let later = start + Duration::from_millis(100);
        assert_eq!(budget.spend(later), Verdict::Allow);
        assert_eq!(budget.spend(later), Verdict::Refuse);
        for _ in 0..REFUSALS_BEFORE_DISCONNECT - 2 {
            assert_eq!(budget.spend(later), Verdict::Refuse);
        }
        assert_eq!(budget.spend(later), Verdict::Disconnect);
        assert_eq!(budget.spend(later), Verdict::Ignore, "disconnected once");
        // Even once the bucket is full again: the socket is gone.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!(budget.spend(much_later), Verdict::Ignore);
    }

    #[test]
    fn tokens_never_exceed_the_burst() {
        let start = Instant::now();
        let mut budget = EventBudget::new(10, 5);
        let much_later = start + Duration::from_secs(3600);
        for _ in 0..5 {
            assert_eq!(budget.spend(much_later), Verdict::Allow);
        }
        assert_eq!(budget.spend(much_later), Verdict::Refuse);
    }

    #[tokio::test]
    async fn the_disconnect_waits_for_every_earlier_answer() {
        let flood = Arc::new(Flood::new(10, 1));
        let Admission::Allow(join) = flood.admit() else {
            panic!("the burst passes");
        };
        let mut refusals = Vec::new();
        for _ in 0..REFUSALS_BEFORE_DISCONNECT - 1 {
            match flood.admit() {
                Admission::Refuse(answering) => refusals.push(answering),
                other => panic!("refused: {other:?}"),
            }
        }
        assert!(matches!(flood.admit(), Admission::Disconnect));
        assert!(matches!(flood.admit(), Admission::Ignore));
        let waiting = tokio::spawn({
            let flood = flood.clone();
            async move { drop(flood.answered().await) }
        });
        drop(refusals);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a join is still being answered");
        drop(join);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the disconnect proceeds once every answer is out")
            .unwrap();
    }
}
