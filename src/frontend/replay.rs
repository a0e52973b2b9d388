//! What replaying history to resuming sockets may cost.
//!
//! A resuming join (`{room, since}`) makes the frontend read the room's
//! history from Redis: up to the whole history, 1,000 messages of up to
//! 16 KB, for a request of a few bytes. Three bounds keep that from costing
//! the servers more than it costs the client:
//!
//! - **Pages, read as the socket takes them.** History is read
//!   [`PAGE`] messages at a time, and the next page only once the socket's
//!   queue has room again: a client that stops reading stops the replay (and
//!   is let go after `frontend.backlog_timeout_ms`).
//! - **Few pages at once.** At most [`PAGES_AT_ONCE`] pages are being read
//!   from Redis at a time on one frontend ([`ReplayLimits::page`]): Redis is
//!   never asked for more replay data than the frontend can hold, so its
//!   reply buffers stay small whatever the number of resuming sockets.
//! - **A budget per client address** ([`AddressBudgets`]): messages replayed
//!   to one address, `frontend.replay_per_second` on average and
//!   `frontend.replay_burst` at once. A resume is refused while the
//!   address's budget is spent, and the client joins again shortly. IPv6
//!   addresses count per /64, the block one subscriber usually has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{Semaphore, SemaphorePermit};

/// Messages read from Redis at once for a resuming socket.
pub const PAGE: usize = 64;

/// Pages read from Redis at the same time, on one frontend.
pub const PAGES_AT_ONCE: usize = 8;

/// Addresses with a budget kept; beyond, those whose budget is whole again
/// are forgotten (and, if that is not enough, all).
const MAX_ADDRESSES: usize = 100_000;

/// The frontend's bounds on replaying history.
pub struct ReplayLimits {
    pages: Semaphore,
    budgets: AddressBudgets,
}

impl ReplayLimits {
    pub fn new(per_second: u32, burst: u32) -> Self {
        ReplayLimits {
            pages: Semaphore::new(PAGES_AT_ONCE),
            budgets: AddressBudgets::new(per_second, burst),
        }
    }

    /// Waits for the right to read one page from Redis; held until the
    /// page is queued to its socket.
    pub async fn page(&self) -> SemaphorePermit<'_> {
        self.pages
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    pub fn budgets(&self) -> &AddressBudgets {
        &self.budgets
    }
}

/// A token bucket of replayed messages per client address.
pub struct AddressBudgets {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    messages: f64,
    at: Instant,
}

impl AddressBudgets {
    pub fn new(per_second: u32, burst: u32) -> Self {
        AddressBudgets {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            buckets: Mutex::default(),
        }
    }

    /// Whether `address` may start a replay at `now`: some of its budget is left.
    pub fn admits(&self, address: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        match buckets.get_mut(&block(address)) {
            Some(bucket) => self.refill(bucket, now) >= 1.0,
            None => true,
        }
    }

    /// Spends `messages` of `address`'s budget at `now`. A replay under way
    /// is not cut short: the budget may go below zero, and the address
    /// waits that much longer for its next one.
    pub fn spend(&self, address: IpAddr, messages: usize, now: Instant) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_ADDRESSES {
            self.forget_whole(&mut buckets, now);
        }
        let burst = self.burst;
        let bucket = buckets.entry(block(address)).or_insert(Bucket {
            messages: burst,
            at: now,
        });
        self.refill(bucket, now);
        bucket.messages -= messages as f64;
    }

    /// Tops `bucket` up for the time since it was last used; returns what it holds.
    fn refill(&self, bucket: &mut Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.messages = (bucket.messages + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        bucket.messages
    }

    /// Forgets the addresses whose budget is whole again (they are as new),
    /// and all of them if that frees nothing.
    fn forget_whole(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        buckets.retain(|_, bucket| self.refill(bucket, now) < self.burst);
        if buckets.len() >= MAX_ADDRESSES {
            buckets.clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

/// The block an address counts in: itself for IPv4, its /64 for IPv6.
fn block(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_spends_its_burst_then_waits_for_the_rate() {
        let budgets = AddressBudgets::new(100, 1000);
        let start = Instant::now();
        let client = ip("203.0.113.7");
        assert!(budgets.admits(client, start));
        budgets.spend(client, 1000, start);
        assert!(!budgets.admits(client, start), "the burst is spent");
        assert!(budgets.admits(ip("203.0.113.8"), start), "others are not");
        assert!(budgets.admits(client, start + Duration::from_millis(10)));
        // A replay under way runs on into debt, which takes its time back.
        budgets.spend(client, 500, start + Duration::from_millis(10));
        assert!(!budgets.admits(client, start + Duration::from_secs(4)));
        assert!(budgets.admits(client, start + Duration::from_millis(5100)));
    }

    #[test]
    fn ipv6_addresses_count_per_64() {
        let budgets = AddressBudgets::new(1, 10);
        let now = Instant::now();
        budgets.spend(ip("2001:db8:1:2::1"), 10, now);
        assert!(!budgets.admits(ip("2001:db8:1:2:ffff::9"), now), "same /64");
        assert!(budgets.admits(ip("2001:db8:1:3::1"), now), "another /64");
        budgets.spend(ip("::ffff:192.0.2.1"), 10, now);
        assert!(
            !budgets.admits(ip("192.0.2.1"), now),
            "an IPv4-mapped address is the IPv4 one"
        );
    }

    #[test]
    fn the_table_of_addresses_stays_bounded() {
        let budgets = AddressBudgets::new(1000, 10);
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        for i in 0..MAX_ADDRESSES as u32 {
            budgets.spend(IpAddr::from(i.to_be_bytes()), 1, now);
        }
        assert_eq!(budgets.len(), MAX_ADDRESSES);
        // A second later all those budgets are whole again: forgotten.
        budgets.spend(ip("198.51.100.1"), 5, later);
        assert_eq!(budgets.len(), 1);
        // Full of budgets none of which is whole: all are forgotten.
        for i in 1..MAX_ADDRESSES as u32 {
            budgets.spend(IpAddr::from(i.to_be_bytes()), 1, later);
        }
        assert_eq!(budgets.len(), MAX_ADDRESSES);
        budgets.spend(ip("198.51.100.2"), 1, later);
        assert_eq!(budgets.len(), 1);
    }
}
