//! What the operator commands print: aligned tables for people, JSON for
//! scripts (`-o json`).

use serde_json::Value;

/// `-o table` (the default) or `-o json`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// Columns under upper-case headers, each as wide as its widest cell.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text; `empty` (e.g. "no tenants") instead of a lone
    /// header line when there are no rows.
    pub fn render(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{empty}\n");
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.zip(&widths).enumerate() {
                if i + 1 == widths.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(w - cell.chars().count() + 2));
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
            out
        };
        let mut out = line(&mut self.headers.iter().copied());
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }
}

/// Prints `value` as pretty JSON.
pub fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// `name: value` lines, the names aligned: a record for people.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

/// A control character in a value the server sent (a tenant's name, an
/// error) could move the terminal's cursor or retitle it: shown escaped.
pub fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) { s.escape_debug().to_string() } else { s.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(&["TENANT", "TIER"]);
        t.row(vec!["acme-corporation".into(), "standard".into()]);
        t.row(vec!["b".into(), "basic".into()]);
        assert_eq!(
            t.render("no tenants"),
            "TENANT            TIER\nacme-corporation  standard\nb                 basic\n"
        );
        assert_eq!(Table::new(&["TENANT"]).render("no tenants"), "no tenants\n");
    }

    #[test]
    fn fields_align_and_control_characters_are_escaped() {
        assert_eq!(fields(&[("id", "acme".into()), ("status", "ACTIVE".into())]), "id      acme\nstatus  ACTIVE\n");
        assert_eq!(clean("evil\x1b]0;pwned\x07"), "evil\\u{1b}]0;pwned\\u{7}");
        assert_eq!(clean("plain name"), "plain name");
    }
}
