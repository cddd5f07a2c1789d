//! Plain-text output: aligned tables, `Key: value` blocks, times and ages, and the escaping
//! of everything printed that came from elsewhere.
//!
//! Names, user lists and messages come from the mesh: hubs check names, but a compromised hub
//! (or old data) need not, and a name holding terminal controls could retitle the terminal,
//! clear it, move the cursor or, with Unicode bidi controls, show text in another order than it
//! is. Every table cell and field value is shown through [`clean`], and everything the client
//! writes through [`clean_text`] (see `write_out`), so no control reaches the terminal.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Characters that drive a terminal or reorder text, newline and tab aside: C0 controls, DEL,
/// C1 controls, Unicode bidi controls, and the Unicode line and paragraph separators.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
                | '\u{2028}' | '\u{2029}'
        )
}

/// `s` with every character of [`is_unsafe`] written as a visible escape (`\x1b`,
/// `\u{202e}`), `keep` aside.
fn escape(s: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(|c| is_unsafe(c) && !keep(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !is_unsafe(c) || keep(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// One line of text from elsewhere (a name, a message) as it may be shown in a cell or after a
/// label: every control escaped, newlines and tabs included.
pub fn clean(s: &str) -> Cow<'_, str> {
    escape(s, |_| false)
}

/// Text about to be written to the terminal: every control escaped but newline and tab.
pub fn clean_text(s: &str) -> Cow<'_, str> {
    escape(s, |c| c == '\n' || c == '\t')
}

/// JSON text with every character of [`is_unsafe`] (which can only occur inside its strings)
/// written as a JSON escape (`\u001b`): the same value, and nothing for a terminal to act on.
pub fn json_text(json: &str) -> Cow<'_, str> {
    if !json.chars().any(|c| is_unsafe(c) && c != '\n') {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if is_unsafe(c) && c != '\n' {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{:04x}", u);
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An aligned table with an upper-case header, kubectl style.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; its cells are shown through [`clean`].
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.iter().map(|c| clean(c).into_owned()).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        self.render_indented("")
    }

    pub fn render_indented(&self, indent: &str) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for r in std::iter::once(&header).chain(self.rows.iter()) {
            let mut line = String::from(indent);
            for (i, w) in widths.iter().enumerate() {
                let cell = r.get(i).map(String::as_str).unwrap_or("");
                line.push_str(cell);
                if i + 1 < cols {
                    let pad = w.saturating_sub(cell.chars().count()) + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `Key:   value` lines with the values aligned.
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn new() -> Fields {
        Fields(Vec::new())
    }

    /// Adds a line; key and value are shown through [`clean`].
    pub fn add(&mut self, key: &str, value: impl Into<String>) {
        let value: String = value.into();
        self.0
            .push((clean(key).into_owned(), clean(&value).into_owned()));
    }

    pub fn render(&self) -> String {
        let w = self.0.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in &self.0 {
            let key = format!("{k}:");
            out.push_str(format!("{key:<w$}  {v}").trim_end());
            out.push('\n');
        }
        out
    }
}

pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long ago a millisecond timestamp was: `4s`, `3m`, `2h`, `5d` (one word, for tables).
pub fn age(ms: u64) -> String {
    if ms == 0 {
        return "-".to_string();
    }
    let s = now_ms().saturating_sub(ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A round-trip time given in milliseconds, for people: `0.213 ms`, `4.52 ms`, `12.5 ms`,
/// `250 ms` (three significant digits or more); `-` if unknown.
pub fn rtt(ms: Option<f64>) -> String {
    match ms {
        None => "-".to_string(),
        Some(ms) if ms < 1.0 => format!("{ms:.3} ms"),
        Some(ms) if ms < 10.0 => format!("{ms:.2} ms"),
        Some(ms) if ms < 100.0 => format!("{ms:.1} ms"),
        Some(ms) => format!("{ms:.0} ms"),
    }
}

/// A millisecond timestamp as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn time(ms: u64) -> String {
    ztm_net::utc(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_times() {
        for (ms, text) in [
            (None, "-"),
            (Some(0.0871), "0.087 ms"),
            (Some(4.518), "4.52 ms"),
            (Some(12.54), "12.5 ms"),
            (Some(250.4), "250 ms"),
        ] {
            assert_eq!(rtt(ms), text, "{ms:?}");
        }
    }

    #[test]
    fn aligned() {
        let mut t = Table::new(&["NAME", "ONLINE", "X"]);
        t.row(vec!["alpha".into(), "yes".into(), "".into()]);
        t.row(vec!["b".into(), "no".into(), "*".into()]);
        assert_eq!(
            t.render(),
            "NAME    ONLINE   X\nalpha   yes\nb       no       *\n"
        );
    }

    #[test]
    fn controls_from_the_mesh_are_shown_escaped() {
        let evil = "pc\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nx\u{9b}31m\u{7f}\u{202e}gpj.exe\u{2066}\ty";
        let shown =
            "pc\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x0ax\\x9b31m\\x7f\\u{202e}gpj.exe\\u{2066}\\x09y";
        assert_eq!(clean(evil), shown);
        let mut t = Table::new(&["NAME", "USER"]);
        t.row(vec![evil.into(), "bob".into()]);
        let out = t.render();
        assert_eq!(out.lines().nth(1), Some(format!("{shown}   bob").as_str()));
        assert_eq!(out.lines().count(), 2);
        assert!(!out.chars().any(|c| is_unsafe(c) && c != '\n'), "{out:?}");
        let mut f = Fields::new();
        f.add("Name", evil);
        assert_eq!(f.render(), format!("Name:  {shown}\n"));
        // Plain names, and text in other scripts, are left alone.
        for fine in ["office-pc", "b\u{fc}ro", "\u{65e5}\u{672c}", "a b"] {
            assert!(matches!(clean(fine), Cow::Borrowed(_)), "{fine}");
        }
        // Whole outputs keep their lines and tabs.
        assert_eq!(clean_text("a\tb\nc\u{1b}[2J\n"), "a\tb\nc\\x1b[2J\n");
    }

    #[test]
    fn json_keeps_values_and_drops_controls() {
        let value = serde_json::json!({"name": "pc\u{1b}[2J\u{9b}\u{7f}\u{202e}\u{2028}x", "n": 1});
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        let safe = json_text(&pretty);
        assert!(!safe.chars().any(|c| is_unsafe(c) && c != '\n'), "{safe:?}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&safe).unwrap(),
            value
        );
        assert_eq!(safe.lines().count(), pretty.lines().count());
        assert!(matches!(json_text("[1, \"a\"]"), Cow::Borrowed(_)));
    }

    #[test]
    fn times() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_709_251_199_000), "2024-02-29 23:59:59");
        assert_eq!(age(0), "-");
    }
}
