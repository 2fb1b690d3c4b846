//! A wait that grows while nothing happens: a poll that finds nothing
//! doubles it, up to a longest wait; anything found brings it back to the
//! shortest. What an idle node does between events (see
//! docs/benchmarks.md, "An idle cluster").

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    shortest: Duration,
    longest: Duration,
    now: Duration,
}

impl Backoff {
    /// Starting at `shortest`; `longest` below `shortest` counts as it.
    pub fn new(shortest: Duration, longest: Duration) -> Backoff {
        Backoff {
            shortest,
            longest: longest.max(shortest),
            now: shortest,
        }
    }

    /// How long to wait now.
    pub fn wait(&self) -> Duration {
        self.now
    }

    /// Nothing happened: wait twice as long next time.
    pub fn idle(&mut self) {
        self.now = (self.now * 2).min(self.longest);
    }

    /// Something happened: wait the shortest time next.
    pub fn active(&mut self) {
        self.now = self.shortest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_while_idle_up_to_the_longest_and_resets_on_activity() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let mut waits = Vec::new();
        for _ in 0..6 {
            waits.push(b.wait());
            b.idle();
        }
        assert_eq!(
            waits,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        b.active();
        assert_eq!(b.wait(), ms(100));
        // A longest below the shortest: no growth.
        let mut flat = Backoff::new(ms(500), ms(100));
        flat.idle();
        assert_eq!(flat.wait(), ms(500));
    }
}
