//! Percentiles of the `latency` meter: its counts per bucket (upper bound
//! in microseconds, the last `u64::MAX`) and the quantile read from them,
//! as the bound of the bucket it falls in.

/// The `q` quantile (0..=1) of requests counted in latency `buckets`
/// (upper bound in microseconds, count), as the bound of the bucket it
/// falls in: `<= 2.5 ms`, `> 1 s` for the last; `-` without requests.
pub fn quantile(buckets: &[(u64, i64)], q: f64) -> String {
    let mut sorted = buckets.to_vec();
    sorted.sort_unstable();
    let total: i64 = sorted.iter().map(|(_, n)| n).sum();
    if total <= 0 {
        return "-".into();
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    let mut previous = 0;
    for (bound, n) in sorted {
        seen += n;
        if seen >= rank {
            return if bound == u64::MAX { format!("> {}", micros(previous)) } else { format!("<= {}", micros(bound)) };
        }
        previous = bound;
    }
    "-".into()
}

/// Microseconds for people: `250 us`, `2.5 ms`, `1 s`.
fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} us"),
        1_000..1_000_000 => format!("{} ms", us as f64 / 1000.0),
        _ => format!("{} s", us as f64 / 1_000_000.0),
    }
}

/// The GetUsage request for `tenant`'s requests by latency bucket over
/// `[from, to)` (one row per bucket and day).
pub fn usage_request(tenant: &str, from: i64, to: i64) -> GetUsageRequest {
    GetUsageRequest {
        tenant_id: tenant.to_owned(),
        meter: LATENCY.to_owned(),
        from,
        to,
        window: Window::Day as i32,
        group_by: vec![LATENCY_DIMENSION.to_owned()],
    }
}

/// The buckets of the rows answering [`usage_request`].
pub fn of_rows(rows: &[UsageRow]) -> Vec<(u64, i64)> {
    buckets(rows.iter().map(|r| (r.dimensions.get(LATENCY_DIMENSION).map_or("", String::as_str), r.value)))
}

/// Latency buckets from GetUsage rows' `le_us` dimension, summed per bound.
pub fn buckets<'a>(rows: impl IntoIterator<Item = (&'a str, i64)>) -> Vec<(u64, i64)> {
    let mut sums: std::collections::BTreeMap<u64, i64> = std::collections::BTreeMap::new();
    for (le, n) in rows {
        let bound = if le == "inf" { Some(u64::MAX) } else { le.parse().ok() };
        if let Some(b) = bound {
            *sums.entry(b).or_default() += n;
        }
    }
    sums.into_iter().collect()
}

use tenantmesh_proto::metering::v1::{GetUsageRequest, UsageRow, Window};

use crate::schema::{LATENCY, LATENCY_DIMENSION};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_read_from_the_buckets() {
        let b = buckets([("250", 90), ("2500", 9), ("inf", 1), ("junk", 5)]);
        assert_eq!(b, [(250, 90), (2500, 9), (u64::MAX, 1)]);
        assert_eq!(quantile(&b, 0.5), "<= 250 us");
        assert_eq!(quantile(&b, 0.99), "<= 2.5 ms");
        assert_eq!(quantile(&b, 1.0), "> 2.5 ms");
        assert_eq!(quantile(&[], 0.99), "-");
        assert_eq!(quantile(&[(1_000_000, 1)], 0.99), "<= 1 s");
    }
}
