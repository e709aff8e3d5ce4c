//! Instants for people: UTC RFC 3339 in tables, and what an operator may
//! type for one (`2026-12-07T09:30:00Z`, an offset, `@<unix seconds>`, or
//! `10m ago`).

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `secs` (Unix seconds) as `2026-12-07T09:30:00Z`; 0 (never set) as `-`.
pub fn format(secs: i64) -> String {
    if secs == 0 {
        return "-".to_owned();
    }
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
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
    rfc3339(s).ok_or_else(bad)
}

fn rfc3339(s: &str) -> Option<(i64, i32)> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let (y, mo, d, h, mi, sec) = (num(0, 4)?, num(5, 7)?, num(8, 10)?, num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if b[16] != b':' || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0i32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<9}", &frac[..digits.min(9)]);
        nanos = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = rest[1..].split_once(':')?;
            if oh.len() != 2 || om.len() != 2 {
                return None;
            }
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60)
        }
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some((secs, nanos))
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
