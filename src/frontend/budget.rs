//! How many events one socket may send: a token bucket per socket.
//!
//! A client sends few events (a `room` per room it opens). A socket that
//! sends more than `burst` at once, or more than `rate` per second for long,
//! gets its events refused; one that keeps on after many refusals is
//! disconnected, so a flood costs the frontend little and other sockets
//! nothing.

use std::time::Instant;

/// Refusals in a row after which the socket is disconnected.
const REFUSALS_BEFORE_DISCONNECT: u32 = 50;

/// What to do with one incoming event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Refuse,
    Disconnect,
}

#[derive(Debug)]
pub struct EventBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    refusals: u32,
}

impl EventBudget {
    pub fn new(rate: u32, burst: u32) -> Self {
        EventBudget {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
            refusals: 0,
        }
    }

    /// Spends one event at time `now`.
    pub fn spend(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refusals = 0;
            Verdict::Allow
        } else {
            // Disconnect once; events still in flight after it are refused
            // quietly, not logged and disconnected again.
            self.refusals = self.refusals.saturating_add(1);
            if self.refusals == REFUSALS_BEFORE_DISCONNECT {
                Verdict::Disconnect
            } else {
                Verdict::Refuse
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert_eq!(budget.spend(later), Verdict::Refuse, "disconnected once");
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
}
