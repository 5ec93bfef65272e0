//! A connection's deadline timer, kept registered from one request to the next.
//!
//! Tokio's timer driver is woken (an `eventfd` write, then an extra `epoll_wait`
//! return) whenever a timer is registered earlier than the driver's next wake-up. A
//! `tokio::time::timeout` per request registers, and removes, one timer per request:
//! with a route timeout shorter than the head timeout that meant one such wake-up for
//! about every other request (measured on the fast path at 20k req/s: ~10k `eventfd`
//! writes a second, one for every two requests, each with the `epoll_wait` it causes).
//! A [`Deadline`] is registered once per connection and moved only when the deadline it
//! must honour has moved by more than a sixteenth of the timeout (at most a second):
//! until then it may fire that much early, and then waits out the rest, so a deadline
//! is never reached early and at most a little late in wake-ups, never in effect.

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The most a registered timer may run ahead of the deadline it stands for.
const MAX_SLACK: Duration = Duration::from_secs(1);

/// One connection's timer for one kind of deadline (see the module).
#[derive(Debug)]
pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
}

impl Default for Deadline {
    fn default() -> Self {
        Deadline::new()
    }
}

impl Deadline {
    pub fn new() -> Deadline {
        // Not registered with the driver until first polled.
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
        }
    }

    /// Completes at `at`, never before; `timeout` is how far ahead of now `at` was
    /// set, which sizes the slack.
    pub async fn until(&mut self, at: Instant, timeout: Duration) {
        let slack = (timeout / 16).min(MAX_SLACK);
        let registered = self.sleep.deadline();
        if registered > at || registered + slack < at {
            self.sleep.as_mut().reset(at);
        }
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= at {
                return;
            }
            // Fired within the slack, ahead of this deadline: wait out the rest.
            self.sleep.as_mut().reset(at);
        }
    }

    /// Completes `timeout` from now.
    pub async fn after(&mut self, timeout: Duration) {
        self.until(Instant::now() + timeout, timeout).await
    }

    /// When the timer registered with the driver fires.
    #[cfg(test)]
    pub(crate) fn registered(&self) -> Instant {
        self.sleep.deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_is_never_reached_early_even_when_its_timer_is_reused() {
        let mut d = Deadline::new();
        let start = Instant::now();
        d.after(Duration::from_secs(30)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(30));

        // Re-armed 0.5 s later for 30 s: the timer (registered for the earlier
        // deadline) is kept and fires 0.5 s early, and the wait goes on to the new one.
        let mut d = Deadline::new();
        let first = Instant::now();
        tokio::select! {
            () = d.after(Duration::from_secs(30)) => panic!("fired early"),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let kept = d.sleep.deadline();
        assert_eq!(kept, first + Duration::from_secs(30));
        let second = Instant::now();
        d.after(Duration::from_secs(30)).await;
        assert_eq!(Instant::now() - second, Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_is_moved_when_the_deadline_moves_beyond_the_slack_or_earlier() {
        let mut d = Deadline::new();
        tokio::select! {
            () = d.after(Duration::from_secs(30)) => panic!("fired early"),
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        // 2 s later: beyond the slack (1 s), so the timer is moved.
        let now = Instant::now();
        tokio::select! {
            () = d.after(Duration::from_secs(30)) => panic!("fired early"),
            () = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
        assert_eq!(d.sleep.deadline(), now + Duration::from_secs(30));
        // A shorter timeout is an earlier deadline: moved at once.
        let now = Instant::now();
        let start = now;
        d.after(Duration::from_secs(5)).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(5));
    }
}
