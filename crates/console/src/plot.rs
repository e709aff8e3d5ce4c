//! Plots drawn on the server as inline SVG: a series of (instant, value)
//! points over a period, with axes, ticks and a title, each point a circle
//! carrying its numbers (`data-t`, `data-v`) and a tooltip. Only
//! presentation attributes, no `style`: the console's Content-Security-Policy
//! allows no inline style. The numbers behind a plot are also shown in a
//! table beside it (its text alternative).

use std::fmt::Write;

pub const WIDTH: u32 = 640;
pub const HEIGHT: u32 = 200;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 28.0;

/// A step of 1, 2 or 5 times a power of ten, with about `target` steps to
/// reach `max`.
pub fn nice_step(max: f64, target: u32) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let raw = max / f64::from(target.max(1));
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(10.0 * magnitude);
    step.max(1.0)
}

/// `v` short: 1200 -> 1.2k, 3000000 -> 3M.
pub fn short_number(v: f64) -> String {
    let (value, unit) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let text = if value.fract() == 0.0 { format!("{value:.0}") } else { format!("{value:.1}") };
    format!("{text}{unit}")
}

/// `HH:MM` of Unix seconds (UTC); `MM-DD` when the period spans days.
fn time_label(t: i64, days: bool) -> String {
    let (day, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    if days {
        let (_, m, d) = tenantmesh_service::clock::civil_from_days(day);
        format!("{m:02}-{d:02}")
    } else {
        format!("{:02}:{:02}", secs / 3600, secs % 3600 / 60)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// A line plot of `points` (Unix seconds, value) over `[from, to)`,
/// titled `title` (escaped). `id` names the plot for its text alternative.
pub fn line(id: &str, title: &str, points: &[(i64, i64)], from: i64, to: i64) -> String {
    let (w, h) = (f64::from(WIDTH), f64::from(HEIGHT));
    let (plot_w, plot_h) = (w - LEFT - RIGHT, h - TOP - BOTTOM);
    let span = (to - from).max(1) as f64;
    let max = points.iter().map(|p| p.1).max().unwrap_or(0).max(0) as f64;
    let step = nice_step(max, 4);
    let top = (max / step).ceil().max(1.0) * step;
    let x = |t: i64| LEFT + (t - from) as f64 / span * plot_w;
    let y = |v: i64| TOP + plot_h - v as f64 / top * plot_h;
    let id = escape(id);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" id="{id}" class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-labelledby="{id}-title" data-points="{}">"#,
        points.len()
    );
    let _ = write!(svg, r#"<title id="{id}-title">{}</title>"#, escape(title));
    let _ = write!(svg, r##"<text x="{LEFT}" y="16" font-size="13" fill="#222">{}</text>"##, escape(title));
    // The y axis: gridlines and labels at each step.
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let yy = TOP + plot_h - v / top * plot_h;
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#555">{}</text>"##,
            w - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            short_number(v)
        );
        v += step;
    }
    // The x axis: five ticks across the period.
    let days = to - from > 2 * 86_400;
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#888"/>"##,
        TOP + plot_h,
        w - RIGHT,
        TOP + plot_h
    );
    for i in 0..=4 {
        let t = from + (to - from) * i / 4;
        let xx = x(t);
        let _ = write!(
            svg,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#888"/><text x="{xx:.1}" y="{:.1}" font-size="11" text-anchor="middle" fill="#555">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 4.0,
            TOP + plot_h + 16.0,
            time_label(t, days)
        );
    }
    if points.is_empty() {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle" fill="#888">no usage in this period</text>"##,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    } else {
        let path: Vec<String> = points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
        let _ =
            write!(svg, r##"<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{}"/>"##, path.join(" "));
        for (t, v) in points {
            let _ = write!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#2563eb" data-t="{t}" data-v="{v}"><title>{}: {v}</title></circle>"##,
                x(*t),
                y(*v),
                time_label(*t, false)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(0.0, 4), 1.0);
        assert_eq!(nice_step(3.0, 4), 1.0);
        assert_eq!(nice_step(7.0, 4), 2.0);
        assert_eq!(nice_step(18.0, 4), 5.0);
        assert_eq!(nice_step(1234.0, 4), 500.0);
        assert_eq!(short_number(1500.0), "1.5k");
        assert_eq!(short_number(3_000_000.0), "3M");
        assert_eq!(short_number(12.0), "12");
    }

    /// A known series renders exactly as the golden file (axes, ticks,
    /// points); regenerate it with TENANTMESH_BLESS=1 after a deliberate change.
    #[test]
    fn a_known_series_matches_the_golden_svg() {
        let from = 1_765_065_600; // 2025-12-07T00:00:00Z
        let points = [(from, 3), (from + 900, 10), (from + 1800, 0), (from + 2700, 7)];
        let svg = line("usage-requests", "requests per 15 min", &points, from, from + 3600);
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/src/golden/requests.svg");
        if std::env::var_os("TENANTMESH_BLESS").is_some() {
            std::fs::write(golden, &svg).unwrap();
        }
        assert_eq!(svg, std::fs::read_to_string(golden).unwrap());
        // What the golden file says, spelled out: the y axis tops out at
        // 10 in steps of 5, the x axis is labelled every quarter hour, and
        // each point is a circle with its numbers.
        for label in [">0</text>", ">5</text>", ">10</text>", ">00:00</text>", ">00:15</text>", ">01:00</text>"] {
            assert!(svg.contains(label), "{label}");
        }
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains(r#"data-t="1765066500" data-v="10""#));
        assert!(!svg.contains("style="), "no inline style under the CSP");
    }

    #[test]
    fn an_empty_period_says_so_and_titles_are_escaped() {
        let svg = line("p", "<script>alert(1)</script>", &[], 0, 86_400 * 3);
        assert!(svg.contains("no usage in this period"));
        assert!(svg.contains("&lt;script&gt;") && !svg.contains("<script>"));
        assert!(svg.contains(">01-01</text>"), "days label the ticks of a long period: {svg}");
    }
}
