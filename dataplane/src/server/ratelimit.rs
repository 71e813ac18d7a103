//! Token buckets per key: requests per cluster, failed authentications per
//! source address.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// Keys tracked before buckets that have refilled are forgotten, so many
/// distinct sources cannot grow the map without bound.
const MAX_KEYS: usize = 65_536;

pub(crate) struct RateLimiter<K> {
    /// Tokens per second; 0 disables the limiter.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Refills `key`'s bucket and returns its tokens.
    fn refill(&self, buckets: &mut HashMap<K, (f64, Instant)>, key: &K, now: Instant) -> f64 {
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, last)| {
                *tokens + now.duration_since(*last).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_KEYS {
                // Every tracked key is limited right now: forget them rather
                // than grow without bound.
                buckets.clear();
            }
        }
        let (tokens, last) = buckets.entry(key.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        *tokens
    }

    /// Takes a token if there is one.
    pub(crate) fn allow(&self, key: &K) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if self.refill(&mut buckets, key, now) >= 1.0 {
            if let Some((tokens, _)) = buckets.get_mut(key) {
                *tokens -= 1.0;
            }
            true
        } else {
            false
        }
    }

    /// Whether `key` has no token left (takes none).
    pub(crate) fn exhausted(&self, key: &K) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut buckets, key, Instant::now()) < 1.0
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refuses_per_key() {
        let limiter = RateLimiter::new(5.0, 5.0);
        let allowed = (0..20).filter(|_| limiter.allow(&"a")).count();
        assert_eq!(allowed, 5);
        assert!(limiter.exhausted(&"a"));
        assert!(limiter.allow(&"b"), "keys have separate buckets");
        assert!(!limiter.exhausted(&"c"));
        assert!(RateLimiter::new(0.0, 1.0).allow(&"a"));
        assert!(!RateLimiter::<&str>::new(0.0, 1.0).exhausted(&"a"));
    }

    #[test]
    fn memory_stays_bounded_under_many_sources() {
        let limiter = RateLimiter::new(1.0, 1.0);
        for i in 0..(MAX_KEYS as u32 + 10_000) {
            limiter.allow(&i);
        }
        assert!(limiter.tracked() <= MAX_KEYS);
    }
}
