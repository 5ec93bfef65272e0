//! The debouncer: when to regenerate after a burst of changes.
//!
//! Trailing edge: fire `quiet` after the last change, but never later than `cap`
//! after the first one, and never later than `quiet` after an endpoint removal (a
//! removed endpoint must stop receiving traffic promptly, whatever else is arriving).
//! A burst whose end is known (a full resync's last part when no other resync is
//! open: [`Debouncer::complete`]) fires at once: the quiet period exists to find the
//! end of a burst, and waiting for it then only delays the push.
//! Pure: the caller passes the time, so it is tested without a clock.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebounceConfig {
    pub quiet: Duration,
    pub cap: Duration,
}

impl Default for DebounceConfig {
    fn default() -> Self {
        Self {
            quiet: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Debouncer {
    first: Option<Instant>,
    last: Option<Instant>,
    first_removal: Option<Instant>,
    /// The burst is known to be complete: fire then, without waiting for quiet.
    complete: Option<Instant>,
}

impl Debouncer {
    /// Records a change at `now`; `removal` if it withdrew endpoints or services.
    pub fn record(&mut self, now: Instant, removal: bool) {
        self.first.get_or_insert(now);
        self.last = Some(now);
        if removal {
            self.first_removal.get_or_insert(now);
        }
    }

    /// The pending changes end a burst (e.g. a full resync's last part): fire at `now`
    /// instead of after the quiet period. Nothing pending: nothing to fire.
    pub fn complete(&mut self, now: Instant) {
        if self.first.is_some() {
            self.complete.get_or_insert(now);
        }
    }

    /// When to fire, if anything is pending.
    pub fn deadline(&self, cfg: &DebounceConfig) -> Option<Instant> {
        let first = self.first?;
        let last = self.last.unwrap_or(first);
        let mut at = (last + cfg.quiet).min(first + cfg.cap);
        if let Some(r) = self.first_removal {
            at = at.min(r + cfg.quiet);
        }
        if let Some(c) = self.complete {
            at = at.min(c);
        }
        Some(at)
    }

    /// How long the pending changes have waited at `now`, and resets.
    pub fn fire(&mut self, now: Instant) -> Duration {
        let waited = self.first.map(|f| now - f).unwrap_or_default();
        *self = Self::default();
        waited
    }

    pub fn is_pending(&self) -> bool {
        self.first.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn trailing_edge_after_quiet_period() {
        let cfg = DebounceConfig::default();
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        assert_eq!(d.deadline(&cfg), None);
        d.record(t0, false);
        assert_eq!(d.deadline(&cfg), Some(t0 + 100 * MS));
        tokio::time::advance(60 * MS).await;
        d.record(Instant::now(), false);
        assert_eq!(
            d.deadline(&cfg),
            Some(t0 + 160 * MS),
            "each change restarts the quiet period"
        );
        assert_eq!(d.fire(t0 + 160 * MS), 160 * MS);
        assert!(!d.is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn hard_cap_bounds_a_continuous_stream() {
        let cfg = DebounceConfig::default();
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        for _ in 0..30 {
            d.record(Instant::now(), false);
            tokio::time::advance(50 * MS).await;
        }
        assert_eq!(
            d.deadline(&cfg),
            Some(t0 + 1000 * MS),
            "never later than the cap after the first change"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_burst_fires_at_once() {
        let cfg = DebounceConfig::default();
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        d.complete(t0);
        assert_eq!(d.deadline(&cfg), None, "nothing pending, nothing to fire");
        d.record(t0, false);
        tokio::time::advance(30 * MS).await;
        d.record(Instant::now(), false);
        d.complete(Instant::now());
        assert_eq!(
            d.deadline(&cfg),
            Some(t0 + 30 * MS),
            "the end of the burst, not quiet after it"
        );
        d.fire(t0 + 30 * MS);
        d.record(t0 + 40 * MS, false);
        assert_eq!(
            d.deadline(&cfg),
            Some(t0 + 140 * MS),
            "a fire forgets the completion"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn removals_are_not_held_past_the_quiet_period() {
        let cfg = DebounceConfig::default();
        let mut d = Debouncer::default();
        let t0 = Instant::now();
        d.record(t0, true);
        for _ in 0..5 {
            tokio::time::advance(40 * MS).await;
            d.record(Instant::now(), false);
        }
        assert_eq!(
            d.deadline(&cfg),
            Some(t0 + 100 * MS),
            "a removal fires within quiet of itself"
        );
    }
}
