//! The one wall clock of every service: time since the Unix epoch in the
//! units stored records keep. (Rate limiters measure elapsed time on the
//! monotonic clock instead, see [`crate::limits`].)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch (zero if the system clock is set before it).
pub fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    since_epoch().as_secs() as i64
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    since_epoch().as_millis() as i64
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    since_epoch().as_micros() as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_units_agree() {
        let (s, ms, us) = (super::now_secs(), super::now_ms(), super::now_us());
        assert!(s > 1_700_000_000, "after 2023");
        assert!((ms / 1000 - s).abs() <= 1 && (us / 1000 - ms).abs() <= 1000);
    }
}
