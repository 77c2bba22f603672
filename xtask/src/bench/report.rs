//! Tables printed on the terminal and written to BENCHMARKS.md, in one Markdown form.

use std::fmt::Write as _;

#[derive(Debug, Clone, Default)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// A Markdown table padded so it also reads well as plain text.
    pub fn markdown(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::from("|");
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = width - cell.chars().count().min(*width);
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            }
            out.push('\n');
            out
        };
        let mut out = line(&self.headers);
        out.push('|');
        for width in &widths {
            let _ = write!(out, "{}|", "-".repeat(width + 2));
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

/// One measure: what was run (commands, settings) and what came out.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub title: String,
    pub text: Vec<String>,
    pub tables: Vec<(String, Table)>,
}

impl Section {
    pub fn new(title: &str) -> Section {
        Section {
            title: title.to_string(),
            ..Section::default()
        }
    }

    pub fn say(&mut self, text: impl Into<String>) {
        self.text.push(text.into());
    }

    pub fn command(&mut self, command: impl AsRef<str>) {
        self.text
            .push(format!("```\n{}\n```", command.as_ref().trim_end()));
    }

    pub fn table(&mut self, caption: &str, table: Table) {
        self.tables.push((caption.to_string(), table));
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("## {}\n\n", self.title);
        for paragraph in &self.text {
            out.push_str(paragraph);
            out.push_str("\n\n");
        }
        for (caption, table) in &self.tables {
            if !caption.is_empty() {
                let _ = write!(out, "{caption}\n\n");
            }
            out.push_str(&table.markdown());
            out.push('\n');
        }
        out
    }
}

pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

/// 1234567.8 -> "1,234,568".
pub fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "n/a".to_string();
    }
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        out.insert(0, '-');
    }
    out
}

pub fn ratio(value: f64, baseline: f64) -> String {
    if baseline > 0.0 && value.is_finite() {
        format!("{:.3}", value / baseline)
    } else {
        "n/a".to_string()
    }
}

pub fn micros(nanos: Option<u64>) -> String {
    nanos.map_or("n/a".to_string(), |ns| format!("{:.1}", ns as f64 / 1000.0))
}

pub fn megabytes(kilobytes: u64) -> String {
    format!("{:.1}", kilobytes as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn number_formats() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
        assert_eq!(ratio(98.0, 100.0), "0.980");
        assert_eq!(ratio(1.0, 0.0), "n/a");
        assert_eq!(micros(Some(12_340)), "12.3");
        assert_eq!(megabytes(51_200), "50.0");
    }

    #[test]
    fn markdown_table_lines_up() {
        let mut table = Table::new(&["mode", "ops/s"]);
        table.row(vec!["off".into(), "100".into()]);
        table.row(vec!["capture".into(), "95".into()]);
        let text = table.markdown();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.len() == lines[0].len()));
        assert!(lines[1].starts_with("|---"));
    }
}
