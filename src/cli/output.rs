//! How client commands print: tables and human units for people (colour only on a terminal
//! and never with `NO_COLOR`), JSON for programs. Everything goes through [`Output`], which
//! turns a closed stdout into a quiet, successful end.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::error::CliError;
use crate::proto;

/// Where and how a command prints.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    colour: bool,
}

/// Set once a command has printed its JSON document (see [`Output::document_printed`]).
static DOCUMENT_PRINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The few colours the CLI uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Red,
    Green,
    Yellow,
    Dim,
    Bold,
}

impl Colour {
    fn code(self) -> &'static str {
        match self {
            Colour::Red => "31",
            Colour::Green => "32",
            Colour::Yellow => "33",
            Colour::Dim => "2",
            Colour::Bold => "1",
        }
    }
}

/// Whether to colour a stream: only a terminal, and never with `NO_COLOR` set.
pub fn colour_enabled(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none()
}

/// `text` in `colour`, if `on`.
pub fn paint(on: bool, colour: Colour, text: &str) -> String {
    if on {
        format!("\x1b[{}m{text}\x1b[0m", colour.code())
    } else {
        text.to_string()
    }
}

/// Whether stderr may carry colour and `\r` progress frames.
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Whether the reader of stdout has gone (`solo events --follow | head -1` once `head` has
/// its line): the write end of a pipe with no reader polls as an error. A terminal or a file
/// never does. Asked while a follow is idle, as `tail -f` does, so that it need not wait for
/// something to print to find out.
pub fn stdout_gone() -> bool {
    let mut stdout = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd and a zero timeout: poll only reads and writes that struct.
    #[allow(unsafe_code)]
    let ready = unsafe { libc::poll(&mut stdout, 1, 0) };
    ready > 0 && stdout.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// `error: …` on stderr, the prefix in red on a terminal.
pub fn print_error(message: &str) {
    let colour = colour_enabled(stderr_is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    eprintln!("{} {}", paint(colour, Colour::Red, "error:"), printable(message));
}

/// A note on stderr (reconnects and the like), so stdout stays clean for programs.
pub fn note(message: &str) {
    let colour = colour_enabled(stderr_is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    eprintln!(
        "{}",
        paint(colour, Colour::Dim, &format!("solo: {}", printable(message)))
    );
}

/// Text that a service or a client wrote (log lines, trap messages, errors quoting them), made
/// safe for a terminal: control characters other than tab and newline, and the bidirectional
/// overrides, are escaped (`\u{1b}`), so a tenant's output cannot move the cursor, retitle the
/// terminal or disguise itself as the node's own words when an admin reads it.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    escaped(text, true)
}

/// [`printable`] text for one field of a table or a one-line list (a label's value): tabs and
/// newlines are escaped too (`\t`, `\n`), so a value cannot start a row of its own and pass
/// for a field the node printed.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    escaped(text, false)
}

fn escaped(text: &str, keep_lines: bool) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && !(keep_lines && matches!(c, '\t' | '\n')))
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            || (!keep_lines && matches!(c, '\u{2028}' | '\u{2029}'))
    };
    if !text.contains(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\t' if !keep_lines => escaped.push_str("\\t"),
            '\n' if !keep_lines => escaped.push_str("\\n"),
            c if unsafe_char(c) => escaped.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => escaped.push(c),
        }
    }
    std::borrow::Cow::Owned(escaped)
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output {
            json,
            colour: colour_enabled(std::io::stdout().is_terminal(), std::env::var_os("NO_COLOR").as_deref()),
        }
    }

    pub fn paint(&self, colour: Colour, text: &str) -> String {
        paint(self.colour, colour, text)
    }

    /// One line of text.
    pub fn line(&self, text: &str) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").and_then(|()| out.flush()).map_err(stdout_error)
    }

    /// Bytes exactly as given (a call's response).
    pub fn bytes(&self, bytes: &[u8]) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush()).map_err(stdout_error)
    }

    /// One JSON document, pretty-printed.
    pub fn document(&self, value: &Value) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value).map_err(|e| CliError::failure(e.to_string()))?;
        DOCUMENT_PRINTED.store(true, std::sync::atomic::Ordering::Relaxed);
        self.line(&text)
    }

    /// Whether this process has printed its one JSON document: a failure after it (a deploy
    /// that did not start, with `--wait`) is told in that document, not in a second one.
    pub fn document_printed() -> bool {
        DOCUMENT_PRINTED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// One JSON line of a stream.
    pub fn json_line(&self, value: &Value) -> Result<(), CliError> {
        self.line(&value.to_string())
    }

    /// Whether stdout gets colour.
    pub fn colour(&self) -> bool {
        self.colour
    }

    /// The status word, coloured by how healthy it is.
    pub fn status(&self, status: &str) -> String {
        self.paint(status_colour(status), status)
    }
}

/// The colour of a service status: green running, red crashed or failed, yellow in between.
pub fn status_colour(status: &str) -> Colour {
    match status {
        "running" => Colour::Green,
        "crashed" | "failed" => Colour::Red,
        "starting" | "stopping" => Colour::Yellow,
        _ => Colour::Dim,
    }
}

fn stdout_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::stdout_closed()
    } else {
        CliError::failure(format!("cannot write to stdout: {e}"))
    }
}

/// A table with aligned columns; widths come from the plain text, colour is added after.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

/// A cell: its text and an optional colour.
#[derive(Debug, Clone)]
pub struct Cell {
    text: String,
    colour: Option<Colour>,
}

impl From<String> for Cell {
    fn from(text: String) -> Cell {
        Cell { text, colour: None }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Cell {
        Cell::from(text.to_string())
    }
}

impl Cell {
    pub fn coloured(text: impl Into<String>, colour: Colour) -> Cell {
        Cell {
            text: text.into(),
            colour: Some(colour),
        }
    }
}

impl Table {
    pub fn new(headers: Vec<&'static str>) -> Table {
        Table {
            headers,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    /// The lines of the table, columns separated by three spaces, no trailing blanks.
    pub fn render(&self, colour: bool) -> Vec<String> {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.text.chars().count());
            }
        }
        let header: Vec<Cell> = self.headers.iter().map(|h| Cell::coloured(*h, Colour::Bold)).collect();
        std::iter::once(&header)
            .chain(&self.rows)
            .map(|row| {
                let mut line = String::new();
                for (i, cell) in row.iter().enumerate().take(columns) {
                    let text = match cell.colour {
                        Some(c) => paint(colour, c, &cell.text),
                        None => cell.text.clone(),
                    };
                    line.push_str(&text);
                    if i + 1 < row.len().min(columns) {
                        let pad = widths[i] - cell.text.chars().count() + 3;
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
                line
            })
            .collect()
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `64 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 10.0 || value.fract() < 0.05 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration in its largest whole unit: `850ms`, `3s`, `5m`, `2h`, `4d`.
pub fn human_duration_ms(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}s", ms / 1_000),
        60_000..3_600_000 => format!("{}m", ms / 60_000),
        3_600_000..86_400_000 => format!("{}h", ms / 3_600_000),
        _ => format!("{}d", ms / 86_400_000),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// How long ago `then_ms` was, as an age column shows it: `3s`, `5m`, `2h`, `4d`.
pub fn human_age(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return "-".to_string();
    }
    let ms = now_ms.saturating_sub(then_ms);
    if ms < 1_000 {
        "0s".to_string()
    } else {
        human_duration_ms(ms)
    }
}

/// A log line as JSON: `{log_id, seq, timestamp_ms, level, message, version}`, the log's id in
/// hex as REST gives it, so a program tells a new log numbered from 1 from lines seen before.
pub fn log_line_json(line: &proto::LogLine) -> Value {
    json!({
        "log_id": format!("{:x}", line.log_id),
        "seq": line.seq,
        "timestamp_ms": line.timestamp_ms,
        "level": line.level,
        "message": line.message,
        "version": line.version,
    })
}

/// A log line for a person: `time  LEVEL  message`.
pub fn describe_log_line(output: &Output, line: &proto::LogLine) -> String {
    let level = line.level.to_uppercase();
    let level = match line.level.as_str() {
        "error" => output.paint(Colour::Red, &format!("{level:<5}")),
        "warn" => output.paint(Colour::Yellow, &format!("{level:<5}")),
        "debug" | "trace" => output.paint(Colour::Dim, &format!("{level:<5}")),
        _ => format!("{level:<5}"),
    };
    format!(
        "{}  {level}  {}",
        output.paint(Colour::Dim, &crate::event::format_timestamp_ms(line.timestamp_ms)),
        printable(&line.message)
    )
}

/// Labels as `k=v,k2=v2`, sorted; `-` for none.
pub fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".to_string();
    }
    // Tenants write labels (their values may hold any character).
    let pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{}={}", one_line(k), one_line(v)))
        .collect();
    pairs.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_like_a_person_would_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes((3 << 30) + (1 << 29)), "3.5 GiB");
        assert_eq!(human_duration_ms(850), "850ms");
        assert_eq!(human_age(1_000, 4_000), "3s");
        assert_eq!(human_age(0, 4_000), "-");
        assert_eq!(human_age(1, 5 * 60_000 + 1), "5m");
        assert_eq!(human_age(1, 2 * 3_600_000 + 1), "2h");
        assert_eq!(human_age(1, 4 * 86_400_000 + 1), "4d");
    }

    #[test]
    fn text_from_a_service_reaches_a_terminal_with_its_control_characters_escaped() {
        assert_eq!(printable("plain, ünïcode\tand\nlines"), "plain, ünïcode\tand\nlines");
        assert_eq!(
            printable("\u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\r\0"),
            "\\u{1b}[2J\\u{1b}]0;pwned\\u{7}\\u{9b}31m\\u{d}\\u{0}"
        );
        assert_eq!(printable("abc\u{202e}def"), "abc\\u{202e}def");
        assert!(matches!(printable("clean"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(
            one_line("k=v\nSTATUS\tstopped\u{1b}\u{2028}"),
            "k=v\\nSTATUS\\tstopped\\u{1b}\\u{2028}",
            "a field keeps to its line"
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_enabled(true, None));
        assert!(!colour_enabled(false, None));
        assert!(!colour_enabled(true, Some(std::ffi::OsStr::new("1"))));
        assert!(!colour_enabled(true, Some(std::ffi::OsStr::new(""))));
        assert_eq!(paint(false, Colour::Red, "x"), "x");
        assert_eq!(paint(true, Colour::Red, "x"), "\x1b[31mx\x1b[0m");
    }

    #[test]
    fn tables_align_on_plain_text_even_with_colour() {
        let mut table = Table::new(vec!["ID", "STATUS", "AGE"]);
        table.row(vec![
            "echo".into(),
            Cell::coloured("running", Colour::Green),
            "3s".into(),
        ]);
        table.row(vec!["a-longer-id".into(), "stopped".into(), "4d".into()]);
        let plain = table.render(false);
        assert_eq!(plain[0], "ID            STATUS    AGE");
        assert_eq!(plain[1], "echo          running   3s");
        assert_eq!(plain[2], "a-longer-id   stopped   4d");
        let coloured = table.render(true);
        assert!(coloured[1].contains("\x1b[32mrunning\x1b[0m   3s"), "{:?}", coloured[1]);
    }
}
