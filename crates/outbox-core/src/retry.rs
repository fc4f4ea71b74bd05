//! Retry policy: exponential backoff with jitter, then dead.

use std::time::Duration;

use rand::Rng;

use crate::sink::SinkError;

/// When to try a failed message again, and when to give up.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts before a message goes dead (the first delivery counts).
    pub max_attempts: i32,
    /// Delay after the first failure; doubles with each further failure.
    pub base_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// Sets [`RetryPolicy::max_attempts`].
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets [`RetryPolicy::base_delay`].
    pub fn base_delay(mut self, base_delay: Duration) -> Self {
        self.base_delay = base_delay;
        self
    }

    /// Sets [`RetryPolicy::max_delay`].
    pub fn max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// The backoff after `attempts` failed attempts: "equal jitter", half fixed and half random,
    /// so retries of many messages that failed together spread out but never come back early.
    pub fn backoff(&self, attempts: i32) -> Duration {
        let exp = attempts.saturating_sub(1).clamp(0, 30) as u32;
        let full = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let half = full / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }

    /// `Some(delay)` to retry, `None` for dead.
    pub fn decide(&self, attempts: i32, error: &SinkError) -> Option<Duration> {
        match error {
            SinkError::Permanent(_) => None,
            _ if attempts >= self.max_attempts => None,
            SinkError::Transient { retry_after, .. } => {
                let backoff = self.backoff(attempts);
                Some(retry_after.map_or(backoff, |r| r.min(self.max_delay).max(backoff)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_bounds_and_caps() {
        let p = policy();
        for attempt in 1..=6 {
            let full =
                (Duration::from_millis(100) * (1 << (attempt - 1))).min(Duration::from_secs(1));
            for _ in 0..50 {
                let d = p.backoff(attempt);
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn permanent_errors_and_exhausted_attempts_are_dead() {
        let p = policy();
        assert_eq!(p.decide(1, &SinkError::permanent("bad")), None);
        assert!(p.decide(3, &SinkError::transient("down")).is_some());
        assert_eq!(p.decide(4, &SinkError::transient("down")), None);
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let p = policy();
        let e = SinkError::Transient {
            message: "429".into(),
            retry_after: Some(Duration::from_millis(900)),
        };
        assert_eq!(p.decide(1, &e), Some(Duration::from_millis(900)));
        let e = SinkError::Transient {
            message: "429".into(),
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert_eq!(p.decide(1, &e), Some(Duration::from_secs(1)));
    }

    #[test]
    fn builder_methods_set_what_they_name_and_leave_the_rest() {
        let p = RetryPolicy::default()
            .max_attempts(3)
            .base_delay(Duration::from_millis(50));
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.base_delay, Duration::from_millis(50));
        assert_eq!(p.max_delay, RetryPolicy::default().max_delay);
        assert_eq!(
            RetryPolicy::default().max_delay(Duration::from_secs(5)),
            RetryPolicy {
                max_delay: Duration::from_secs(5),
                ..RetryPolicy::default()
            }
        );
    }
}
