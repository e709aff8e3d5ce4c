//! Instants for people: UTC RFC 3339 in tables, and what an operator may
//! type for one (`2026-12-07T09:30:00Z`, an offset, `@<unix seconds>`, or
//! `10m ago`).

use tenantmesh_service::clock::{parse_rfc3339, rfc3339};

/// `secs` (Unix seconds) as `2026-12-07T09:30:00Z`; 0 (never set) as `-`.
pub fn format(secs: i64) -> String {
    if secs == 0 { "-".to_owned() } else { rfc3339(secs) }
}

/// A duration for people: `850ms`, `4.2s`, `3m05s`, `2h10m`.
pub fn elapsed(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", d.as_secs_f64()),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// A length of time: `<n>` then `s`, `m`, `h` or `d`.
fn span(s: &str) -> Option<i64> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = n.parse().ok()?;
    let unit = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// An instant as (Unix seconds, nanoseconds), `now` being Unix seconds:
/// RFC 3339 (`2026-12-07T09:30:00Z`, `2026-12-07T10:30:00.5+01:00`),
/// `@1765100000`, or a time ago (`10m ago`, `2h-ago`).
pub fn parse(input: &str, now: i64) -> Result<(i64, i32), String> {
    let s = input.trim();
    let bad = || {
        format!(
            "{input:?} is not an instant: give RFC 3339 (2026-12-07T09:30:00Z), @<unix seconds>, or a time ago (10m ago)"
        )
    };
    if let Some(unix) = s.strip_prefix('@') {
        return unix.parse().map(|secs| (secs, 0)).map_err(|_| bad());
    }
    if let Some(ago) = s.strip_suffix("ago") {
        let ago = ago.trim_end_matches([' ', '-']);
        return span(ago).map(|secs| (now - secs, 0)).ok_or_else(bad);
    }
    parse_rfc3339(s).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        for secs in [1, 86_399, 951_782_400, 1_765_100_000, 4_102_444_800] {
            assert_eq!(parse(&format(secs), 0).unwrap(), (secs, 0), "{}", format(secs));
        }
        assert_eq!(format(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format(0), "-");
    }

    #[test]
    fn accepts_offsets_fractions_unix_and_ago() {
        let now = 1_765_100_000;
        assert_eq!(parse("2000-02-29T01:00:00.25+01:00", now).unwrap(), (951_782_400, 250_000_000));
        assert_eq!(parse("@42", now).unwrap(), (42, 0));
        assert_eq!(parse("10m ago", now).unwrap(), (now - 600, 0));
        assert_eq!(parse("2h-ago", now).unwrap(), (now - 7200, 0));
        for bad in ["yesterday", "2026-13-01T00:00:00Z", "2026-12-07", "10x ago", "@x", "2026-12-07T09:30:00+1"] {
            let e = parse(bad, now).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
    }

    #[test]
    fn durations_read_as_people_say_them() {
        use std::time::Duration;
        assert_eq!(elapsed(Duration::from_millis(850)), "850ms");
        assert_eq!(elapsed(Duration::from_millis(4_200)), "4.2s");
        assert_eq!(elapsed(Duration::from_secs(185)), "3m05s");
        assert_eq!(elapsed(Duration::from_secs(7_800)), "2h10m");
    }
}
