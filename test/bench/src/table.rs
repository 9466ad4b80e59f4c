//! Plain-text tables: a title, a header row, aligned columns.

use crate::stats::Spread;

/// A table to print: the first column is left-aligned (labels), the others right-aligned
/// (numbers).
#[derive(Debug, Clone, Default)]
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with a title and column headers.
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Self {
        Self {
            title: title.into(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, extra cells are kept (and widen the table).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Whether every row has exactly a cell per header.
    #[cfg(test)]
    pub fn rows_match_headers(&self) -> bool {
        self.rows.iter().all(|r| r.len() == self.headers.len())
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).chain([self.headers.len()]).max().unwrap_or(0);
        let width = |i: usize| {
            self.rows
                .iter()
                .chain([&self.headers])
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..columns).map(width).collect();
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = w.saturating_sub(cell.chars().count());
                if i > 0 {
                    out.push_str("  ");
                }
                if i == 0 {
                    out.push_str(cell);
                    out.extend(std::iter::repeat_n(' ', pad));
                } else {
                    out.extend(std::iter::repeat_n(' ', pad));
                    out.push_str(cell);
                }
            }
            out.trim_end().to_owned()
        };
        let mut text = String::new();
        if !self.title.is_empty() {
            text.push_str(&self.title);
            text.push('\n');
        }
        let header = line(&self.headers);
        text.push_str(&header);
        text.push('\n');
        text.push_str(&"-".repeat(header.chars().count()));
        text.push('\n');
        for r in &self.rows {
            text.push_str(&line(r));
            text.push('\n');
        }
        text
    }
}

/// `median (min–max)` with `decimals` digits; just the median when all samples agree; `-` when
/// nothing was measured.
pub fn spread_cell(s: Option<Spread>, decimals: usize) -> String {
    match s {
        None => "-".to_owned(),
        Some(s) if s.min == s.max => format!("{:.decimals$}", s.median),
        Some(s) => format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = decimals),
    }
}

/// A number with `decimals` digits, or `-`.
pub fn num_cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_labels_left_numbers_right() {
        let mut t = Table::new("title", &["case", "total ms", "lost"]);
        t.row(vec!["128m-idle".into(), "745 (702–801)".into(), "0".into()]);
        t.row(vec!["512m-dirty-local".into(), "1210".into(), "12".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "title");
        assert_eq!(lines[1], "case                   total ms  lost");
        assert_eq!(lines[2], "-".repeat(lines[1].chars().count()));
        assert_eq!(lines[3], "128m-idle         745 (702–801)     0");
        assert_eq!(lines[4], "512m-dirty-local           1210    12");
        // Every row ends in the same column (the en dash counts as one character).
        assert!(lines[1..].iter().all(|l| l.chars().count() == lines[1].chars().count()), "{text}");
    }

    #[test]
    fn short_and_long_rows_and_no_trailing_spaces() {
        let mut t = Table::new("", &["a", "b"]);
        t.row(vec!["x".into()]);
        t.row(vec!["y".into(), "1".into(), "extra".into()]);
        let text = t.render();
        assert!(!text.starts_with('\n'), "no title line");
        assert!(text.lines().all(|l| !l.ends_with(' ')), "{text:?}");
        assert!(text.lines().any(|l| l.ends_with("extra")), "{text}");
    }

    #[test]
    fn cells() {
        let s = Spread { median: 3.26, min: 3.0, max: 4.5, n: 3 };
        assert_eq!(spread_cell(Some(s), 1), "3.3 (3.0–4.5)");
        assert_eq!(spread_cell(Some(Spread { median: 2.0, min: 2.0, max: 2.0, n: 3 }), 0), "2");
        assert_eq!(spread_cell(None, 2), "-");
        assert_eq!(num_cell(Some(0.456), 2), "0.46");
        assert_eq!(num_cell(None, 2), "-");
    }
}
