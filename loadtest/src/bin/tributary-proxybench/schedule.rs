//! The open-loop schedule: request `i` of a run at a fixed total rate is due at
//! `i / rate` seconds after the start, on connection `i % connections` (each connection
//! then carries `rate / connections`, evenly interleaved, as wrk2 does). Pure: the pacer
//! thread asks it what is due by now, and latencies are measured from these intended
//! times, never from when a request could finally be written (no coordinated omission).
//!
//! With a `tick`, due times are rounded up to the next multiple of it: requests then go
//! out in bursts once per tick, as from a generator whose timers have that resolution
//! (wrk2's are 1 ms). A proxy handles a burst in one wake-up, so its CPU per request
//! falls; the evenly spaced default is the harder, smoother arrival (docs/benchmarks.md).

use std::time::Duration;

const NANOS: u128 = 1_000_000_000;

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Requests per second, over all connections.
    pub rate: u64,
    pub connections: usize,
    /// Send in bursts at multiples of this (zero: each request at its own time).
    pub tick: Duration,
}

impl Schedule {
    /// When request `i` is due, after the start.
    /// Integer nanoseconds, rounded up, so that `due_by(due(i))` always counts `i`.
    pub fn due(&self, i: u64) -> Duration {
        let mut ns = (u128::from(i) * NANOS).div_ceil(u128::from(self.rate));
        let tick = self.tick.as_nanos();
        if tick > 0 {
            ns = ns.div_ceil(tick) * tick;
        }
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// The connection that carries request `i`.
    pub fn connection(&self, i: u64) -> usize {
        (i % self.connections as u64) as usize
    }

    /// How many requests are due at or before `elapsed` (requests `0..n`).
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        // With ticks, what is due by `elapsed` is what was exactly due by the last tick.
        let tick = self.tick.as_nanos();
        let elapsed = match elapsed.as_nanos().checked_div(tick) {
            Some(ticks) => ticks * tick,
            None => elapsed.as_nanos(),
        };
        // Request i is due when i * 1e9 <= elapsed_ns * rate; plus one for request 0.
        let n = elapsed * u128::from(self.rate) / NANOS;
        u64::try_from(n).unwrap_or(u64::MAX - 1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_evenly_spaced_and_dealt_round_robin() {
        let s = Schedule {
            rate: 20_000,
            connections: 64,
            tick: Duration::ZERO,
        };
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_micros(50));
        assert_eq!(s.due(20_000), Duration::from_secs(1));
        // Each connection gets every 64th request: 312.5 req/s, 3.2 ms apart.
        assert_eq!(s.connection(0), 0);
        assert_eq!(s.connection(63), 63);
        assert_eq!(s.connection(64), 0);
        assert_eq!(s.due(64) - s.due(0), Duration::from_micros(3200));
    }

    #[test]
    fn what_is_due_by_a_time_includes_the_request_due_exactly_then() {
        let s = Schedule {
            rate: 1000,
            connections: 4,
            tick: Duration::ZERO,
        };
        // At the start only request 0 is due; at 1 ms requests 0 and 1.
        assert_eq!(s.due_by(Duration::ZERO), 1);
        assert_eq!(s.due_by(Duration::from_micros(999)), 1);
        assert_eq!(s.due_by(Duration::from_millis(1)), 2);
        assert_eq!(s.due_by(Duration::from_millis(1500)), 1501);
        // The rate over a long window is exact.
        let n = s.due_by(Duration::from_secs(10)) - s.due_by(Duration::from_secs(5));
        assert_eq!(n, 5000);
        // A rate that does not divide a second: due times round up, never early.
        let odd = Schedule {
            rate: 30_001,
            connections: 64,
            tick: Duration::ZERO,
        };
        for i in [0u64, 1, 7, 999, 123_456, 30_001, 9_000_017] {
            assert_eq!(
                odd.due_by(odd.due(i)),
                i + 1,
                "request {i} is due at its own time"
            );
            if i > 0 {
                let just_before = odd.due(i) - Duration::from_nanos(1);
                assert_eq!(
                    odd.due_by(just_before),
                    i,
                    "request {i} is not due before it"
                );
            }
        }
    }

    #[test]
    fn with_a_tick_requests_go_out_in_bursts_at_its_multiples() {
        let s = Schedule {
            rate: 20_000,
            connections: 64,
            tick: Duration::from_millis(1),
        };
        // Request 0 at 0; requests 1..=20 (exactly due at 50 us .. 1 ms) all at 1 ms.
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_millis(1));
        assert_eq!(s.due(20), Duration::from_millis(1));
        assert_eq!(s.due(21), Duration::from_millis(2));
        assert_eq!(s.due_by(Duration::from_micros(999)), 1);
        assert_eq!(s.due_by(Duration::from_millis(1)), 21);
        assert_eq!(s.due_by(Duration::from_micros(1999)), 21);
        // The rate is unchanged.
        assert_eq!(
            s.due_by(Duration::from_secs(2)) - s.due_by(Duration::from_secs(1)),
            20_000
        );
        for i in [0u64, 1, 19, 20, 21, 999, 123_457] {
            assert!(s.due_by(s.due(i)) > i, "request {i} is due at its own time");
            if s.due(i) > Duration::ZERO {
                assert!(
                    s.due_by(s.due(i) - Duration::from_nanos(1)) <= i,
                    "not before: {i}"
                );
            }
        }
    }
}
