//! The open-loop schedule: request `i` of a run at a fixed total rate is due at
//! `i / rate` seconds after the start, on connection `i % connections` (each connection
//! then carries `rate / connections`, evenly interleaved, as wrk2 does). Pure: the pacer
//! thread asks it what is due by now, and latencies are measured from these intended
//! times, never from when a request could finally be written (no coordinated omission).

use std::time::Duration;

const NANOS: u128 = 1_000_000_000;

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Requests per second, over all connections.
    pub rate: u64,
    pub connections: usize,
}

impl Schedule {
    /// When request `i` is due, after the start.
    /// Integer nanoseconds, rounded up, so that `due_by(due(i))` always counts `i`.
    pub fn due(&self, i: u64) -> Duration {
        let ns = (u128::from(i) * NANOS).div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// The connection that carries request `i`.
    pub fn connection(&self, i: u64) -> usize {
        (i % self.connections as u64) as usize
    }

    /// How many requests are due at or before `elapsed` (requests `0..n`).
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        // Request i is due when i * 1e9 <= elapsed_ns * rate; plus one for request 0.
        let n = elapsed.as_nanos() * u128::from(self.rate) / NANOS;
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
        };
        for i in [0u64, 1, 7, 999, 123_456, 30_001, 9_000_017] {
            assert_eq!(odd.due_by(odd.due(i)), i + 1, "request {i} is due at its own time");
            if i > 0 {
                let just_before = odd.due(i) - Duration::from_nanos(1);
                assert_eq!(odd.due_by(just_before), i, "request {i} is not due before it");
            }
        }
    }
}
