//! The hybrid logical clock that orders writes across the cluster.
//!
//! A timestamp is hlc-gen's 64-bit packing: milliseconds since 2024-01-01
//! UTC in the high 42 bits, a logical counter in the low 22 bits. It fits a
//! PostgreSQL `bigint` (as a positive value until 2093), so backends compare
//! versions with plain integer comparison, and a backend can make a
//! compatible value from its own clock for writes that bypass the proxy
//! (see [`from_unix_millis`]). The node id travels alongside as the
//! tie-breaker ([`Hlc`]).
//!
//! hlc-gen builds its clock source through `Default`, so a per-node offset
//! (used by tests to skew one node's clock) cannot be handed to it; instead
//! its manual clock is driven from the system clock plus the offset before
//! each reading. Readings race harmlessly: each is "now plus offset" at
//! about the same instant, and the generator keeps its own state monotonic.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hlc_gen::{HlcGenerator, HlcTimestamp};

/// Milliseconds since the Unix epoch of hlc-gen's epoch (2024-01-01 UTC);
/// a test checks it against the crate's own packing.
pub const HLC_EPOCH_UNIX_MS: i64 = 1_704_067_200_000;
/// Bits of the logical counter in a packed timestamp.
pub const LOGICAL_BITS: u32 = 22;

/// A timestamp with the id of the node that made it; ordered by timestamp,
/// then node id (the higher node wins a tie).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc {
    pub timestamp: u64,
    pub node: u16,
}

/// A remote timestamp further ahead of the local clock than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkewTooLarge {
    /// How far the remote physical time was ahead, in milliseconds.
    pub ahead_ms: i64,
    /// The configured limit.
    pub max_ms: i64,
}

impl std::fmt::Display for SkewTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "remote clock is {} ms ahead, more than the allowed {} ms",
            self.ahead_ms, self.max_ms
        )
    }
}

impl std::error::Error for SkewTooLarge {}

/// One node's hybrid logical clock.
pub struct HybridClock {
    node: u16,
    generator: HlcGenerator<hlc_gen::source::ManualClock>,
    offset_ms: AtomicI64,
    max_skew_ms: i64,
}

impl HybridClock {
    /// A clock for `node` that refuses to follow remote clocks more than
    /// `max_skew_ms` ahead of its own physical time (0: no limit).
    pub fn new(node: u16, max_skew_ms: i64) -> HybridClock {
        let clock = HybridClock {
            node,
            // hlc-gen's own drift check is left off: the check here also
            // reports how far ahead a remote clock was.
            generator: HlcGenerator::manual(0),
            offset_ms: AtomicI64::new(0),
            max_skew_ms,
        };
        clock.tick_physical();
        clock
    }

    /// Shift this node's physical clock (tests simulate skewed clocks).
    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::SeqCst);
    }

    /// This node's physical time, offset applied, in Unix milliseconds.
    pub fn physical_ms(&self) -> i64 {
        system_unix_ms() + self.offset_ms.load(Ordering::SeqCst)
    }

    fn tick_physical(&self) {
        self.generator.set_current_timestamp(self.physical_ms());
    }

    /// A new timestamp for a local event (a write transaction): greater than
    /// every timestamp this clock has made or observed.
    pub fn now(&self) -> Hlc {
        self.tick_physical();
        let timestamp = self
            .generator
            .next_timestamp()
            // Only fails past the year 2109 or with 4 million events in one
            // millisecond; fall back to the last value plus one.
            .map_or_else(|| self.generator.timestamp().as_u64() + 1, |ts| ts.as_u64());
        Hlc {
            timestamp,
            node: self.node,
        }
    }

    /// Take note of a timestamp seen in a change from another node, so that
    /// later local events order after it. Returns how far the remote
    /// physical time was ahead of ours (negative: behind). A remote clock
    /// ahead by more than the limit is refused: the local clock does not
    /// move, and the caller logs and counts it.
    pub fn observe(&self, remote: u64) -> Result<i64, SkewTooLarge> {
        self.tick_physical();
        let ahead_ms = unix_millis(remote) - self.physical_ms();
        if self.max_skew_ms > 0 && ahead_ms > self.max_skew_ms {
            return Err(SkewTooLarge {
                ahead_ms,
                max_ms: self.max_skew_ms,
            });
        }
        if let Ok(remote) = HlcTimestamp::try_from(remote) {
            let _ = self.generator.update(&remote);
        }
        Ok(ahead_ms)
    }

    pub fn node(&self) -> u16 {
        self.node
    }
}

fn system_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The physical part of a packed timestamp, in Unix milliseconds.
pub fn unix_millis(timestamp: u64) -> i64 {
    (timestamp >> LOGICAL_BITS) as i64 + HLC_EPOCH_UNIX_MS
}

/// A packed timestamp for a Unix time in milliseconds, logical counter 0:
/// what a backend computes from its own clock for a direct write.
pub fn from_unix_millis(unix_ms: i64) -> u64 {
    ((unix_ms - HLC_EPOCH_UNIX_MS).max(0) as u64) << LOGICAL_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_strictly_increasing_even_within_one_millisecond() {
        let clock = HybridClock::new(1, 0);
        let mut last = clock.now();
        for _ in 0..100_000 {
            let next = clock.now();
            assert!(next > last, "{next:?} <= {last:?}");
            last = next;
        }
    }

    #[test]
    fn packing_matches_the_physical_clock() {
        let clock = HybridClock::new(3, 0);
        let before = system_unix_ms();
        let hlc = clock.now();
        let after = system_unix_ms();
        let ms = unix_millis(hlc.timestamp);
        assert!((before..=after).contains(&ms), "{before} {ms} {after}");
        assert_eq!(hlc.node, 3);
        assert!(hlc.timestamp < i64::MAX as u64, "fits a bigint");
        assert_eq!(unix_millis(from_unix_millis(before)), before);
    }

    #[test]
    fn a_write_after_observing_a_future_clock_orders_after_it() {
        // Node 2's clock is 5 s behind node 1's. After node 2 sees node 1's
        // write, its next write still orders after it.
        let node1 = HybridClock::new(1, 10_000);
        let node2 = HybridClock::new(2, 10_000);
        node2.set_offset_ms(-5_000);
        let remote = node1.now();
        let ahead = node2.observe(remote.timestamp).unwrap();
        assert!((4_900..=5_100).contains(&ahead), "{ahead}");
        let local = node2.now();
        assert!(local > remote, "{local:?} <= {remote:?}");
        // Without having observed it, node 2's clock would have lost.
        let fresh = HybridClock::new(2, 10_000);
        fresh.set_offset_ms(-5_000);
        assert!(fresh.now() < remote);
    }

    #[test]
    fn a_clock_too_far_ahead_is_refused_and_does_not_move_the_local_clock() {
        let local = HybridClock::new(1, 1_000);
        let far = from_unix_millis(system_unix_ms() + 60_000);
        let err = local.observe(far).unwrap_err();
        assert!(err.ahead_ms >= 59_000 && err.max_ms == 1_000, "{err:?}");
        let next = local.now();
        assert!(unix_millis(next.timestamp) < system_unix_ms() + 1_000);
    }

    #[test]
    fn our_packing_is_hlc_gen_packing() {
        let unix_ms = 1_764_000_000_123;
        let theirs = HlcTimestamp::from_parts(unix_ms, 5).unwrap().as_u64();
        assert_eq!(from_unix_millis(unix_ms) | 5, theirs);
        assert_eq!(unix_millis(theirs), unix_ms);
    }

    #[test]
    fn ties_are_broken_by_node_id() {
        let a = Hlc {
            timestamp: 42,
            node: 1,
        };
        let b = Hlc {
            timestamp: 42,
            node: 2,
        };
        assert!(b > a);
        assert!(
            Hlc {
                timestamp: 43,
                node: 1
            } > b
        );
    }
}
