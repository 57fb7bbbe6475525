//! Bounded waits: poll a condition until it holds or a deadline passes. Tests never assert on
//! how long something took, only that it happens before a generous deadline.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(100);

/// Poll `cond` until it returns true; an error if it is still false after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    wait_for(timeout, || cond().then_some(())).map(|_| ())
}

/// Poll `f` until it returns `Some`; an error if it still returns `None` after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("condition still not met after {timeout:?}");
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_condition_holds() {
        let mut n = 0;
        wait_until(Duration::from_secs(10), || {
            n += 1;
            n >= 3
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(wait_for(Duration::from_secs(1), || Some(7)).unwrap(), 7);
    }

    #[test]
    fn times_out_with_an_error() {
        let err = wait_until(Duration::from_millis(250), || false).unwrap_err();
        assert!(err.to_string().contains("not met"), "{err}");
    }
}
