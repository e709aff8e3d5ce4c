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
