//! Reporting skipped lease keys: every skip is counted, but each key is logged at most once per
//! `WARN_EVERY`, with an excerpt of its name only. Whoever writes etcd chooses how many keys
//! there are, how long they are and how often they change; the log must not follow.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::view::Skip;
use crate::metrics::Metrics;

const WARN_EVERY: Duration = Duration::from_secs(600);
/// Keys remembered at most; beyond that the oldest are forgotten (and may be logged again).
const MAX_TRACKED: usize = 4096;

pub struct SkipLog {
    metrics: Arc<Metrics>,
    last: HashMap<String, Instant>,
    every: Duration,
}

impl SkipLog {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_interval(metrics, WARN_EVERY)
    }

    fn with_interval(metrics: Arc<Metrics>, every: Duration) -> Self {
        SkipLog {
            metrics,
            last: HashMap::new(),
            every,
        }
    }

    /// Counts the skip of `key` (a `view::key_id`) and logs it unless it was logged lately.
    /// Returns whether it was logged.
    pub fn report(&mut self, key: &str, skip: &Skip) -> bool {
        let m = &self.metrics;
        Metrics::inc(match skip {
            Skip::NotASubnet | Skip::Invalid(_) => &m.invalid_leases_skipped,
            Skip::Oversized(_) => &m.oversized_leases_dropped,
            Skip::Shadowed { .. } => &m.lease_alias_conflicts,
            Skip::DuplicateMac { .. } | Skip::MacTaken(_) => &m.duplicate_vtep_macs,
        });
        let now = Instant::now();
        if self
            .last
            .get(key)
            .is_some_and(|t| now.duration_since(*t) < self.every)
        {
            tracing::debug!(key, "skipping lease (logged before): {}", skip.reason());
            return false;
        }
        if self.last.len() >= MAX_TRACKED {
            let every = self.every;
            self.last.retain(|_, t| now.duration_since(*t) < every);
            if self.last.len() >= MAX_TRACKED {
                self.last.clear();
            }
        }
        self.last.insert(key.to_string(), now);
        tracing::warn!(key, "skipping lease: {}", skip.reason());
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;

    #[test]
    fn each_key_is_logged_once_per_interval_and_always_counted() {
        let m = Arc::new(Metrics::default());
        // A long interval: a test thread descheduled for a while still sees it running.
        let mut log = SkipLog::with_interval(m.clone(), Duration::from_secs(600));
        let bad = Skip::Invalid("garbage".into());
        assert!(log.report("10.244.1.0-24", &bad));
        assert!(!log.report("10.244.1.0-24", &bad));
        assert!(log.report("10.244.2.0-24", &bad), "another key is its own");
        assert!(!log.report("10.244.1.0-24", &Skip::Oversized(1 << 20)));
        assert_eq!(m.invalid_leases_skipped.load(Relaxed), 3);
        assert_eq!(m.oversized_leases_dropped.load(Relaxed), 1);
        // A short one, waited out: logged again.
        let mut log = SkipLog::with_interval(m.clone(), Duration::from_millis(200));
        assert!(log.report("10.244.1.0-24", &bad));
        std::thread::sleep(Duration::from_millis(250));
        assert!(log.report("10.244.1.0-24", &bad));
        assert_eq!(m.invalid_leases_skipped.load(Relaxed), 5);
        let shadow = Skip::Shadowed { by: "x".into() };
        log.report("10.244.3.0-24&a", &shadow);
        assert_eq!(m.lease_alias_conflicts.load(Relaxed), 1);
    }

    #[test]
    fn memory_is_bounded_under_a_flood_of_keys() {
        let mut log = SkipLog::new(Arc::new(Metrics::default()));
        for i in 0..3 * MAX_TRACKED {
            log.report(&format!("junk-{i}"), &Skip::NotASubnet);
        }
        assert!(log.last.len() <= MAX_TRACKED);
    }
}
