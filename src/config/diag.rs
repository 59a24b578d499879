//! Problems found in a config file, each pinned to `file:line:col` with a hint.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {sev}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

/// Every problem of one config file: errors refuse it, warnings do not.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Report {
    /// Orders errors and warnings by position in the file.
    pub fn sort(&mut self) {
        self.errors.sort_by_key(|d| (d.line, d.col));
        self.warnings.sort_by_key(|d| (d.line, d.col));
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.errors.iter().chain(&self.warnings) {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Report {}

/// Collects diagnostics for one source text, turning byte spans into line and column.
pub struct Sink {
    file: PathBuf,
    line_starts: Vec<usize>,
    pub report: Report,
}

impl Sink {
    pub fn new(file: &Path, text: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self {
            file: file.to_owned(),
            line_starts,
            report: Report::default(),
        }
    }

    /// 1-based line and column (in bytes) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let line = match self.line_starts.binary_search(&offset) {
            Ok(i) => i,
            Err(i) => i - 1,
        };
        (line + 1, offset - self.line_starts[line] + 1)
    }

    fn push(
        &mut self,
        severity: Severity,
        span: Range<usize>,
        message: String,
        hint: Option<&str>,
    ) {
        let (line, col) = self.position(span.start);
        let d = Diagnostic {
            severity,
            file: self.file.clone(),
            line,
            col,
            message,
            hint: hint.map(str::to_owned),
        };
        match severity {
            Severity::Error => self.report.errors.push(d),
            Severity::Warning => self.report.warnings.push(d),
        }
    }

    pub fn error(&mut self, span: Range<usize>, message: impl Into<String>, hint: &str) {
        self.push(Severity::Error, span, message.into(), Some(hint));
    }

    pub fn warn(&mut self, span: Range<usize>, message: impl Into<String>, hint: &str) {
        self.push(Severity::Warning, span, message.into(), Some(hint));
    }

    pub fn has_errors(&self) -> bool {
        !self.report.errors.is_empty()
    }
}

/// The line and column (1-based) of the value a JSON pointer (`/properties/a/type`)
/// names in a JSON text, for pointing at a part of a schema that does not compile.
pub fn json_pointer_position(text: &str, pointer: &str) -> Option<(usize, usize)> {
    let b = text.as_bytes();
    let mut at = skip_ws(b, 0);
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        match b.get(at)? {
            b'{' => {
                at = skip_ws(b, at + 1);
                loop {
                    let end = string_end(b, at)?;
                    let key: String = serde_json::from_str(&text[at..end]).ok()?;
                    at = skip_ws(b, end);
                    if b.get(at) != Some(&b':') {
                        return None;
                    }
                    at = skip_ws(b, at + 1);
                    if key == seg {
                        break;
                    }
                    at = skip_ws(b, value_end(b, at)?);
                    if b.get(at) != Some(&b',') {
                        return None;
                    }
                    at = skip_ws(b, at + 1);
                }
            }
            b'[' => {
                let index: usize = seg.parse().ok()?;
                at = skip_ws(b, at + 1);
                for _ in 0..index {
                    at = skip_ws(b, value_end(b, at)?);
                    if b.get(at) != Some(&b',') {
                        return None;
                    }
                    at = skip_ws(b, at + 1);
                }
            }
            _ => return None,
        }
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, col))
}

fn skip_ws(b: &[u8], mut at: usize) -> usize {
    while b.get(at).is_some_and(|c| c.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// The end (exclusive) of the string starting at `at`.
fn string_end(b: &[u8], at: usize) -> Option<usize> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while let Some(&c) = b.get(i) {
        match c {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end (exclusive) of the value starting at `at`.
fn value_end(b: &[u8], at: usize) -> Option<usize> {
    match b.get(at)? {
        b'"' => string_end(b, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            while let Some(&c) = b.get(i) {
                match c {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let mut i = at;
            while b
                .get(i)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
            {
                i += 1;
            }
            Some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pointers_find_their_value() {
        let t = "{\n  \"type\": \"object\",\n  \"properties\": {\n    \"a/b\": { \"type\": [1, {\"x\": \"}\"}, 5] }\n  }\n}";
        assert_eq!(json_pointer_position(t, ""), Some((1, 1)));
        assert_eq!(json_pointer_position(t, "/type"), Some((2, 11)));
        assert_eq!(
            json_pointer_position(t, "/properties/a~1b/type"),
            Some((4, 22))
        );
        assert_eq!(
            json_pointer_position(t, "/properties/a~1b/type/2"),
            Some((4, 38))
        );
        assert_eq!(json_pointer_position(t, "/properties/nope"), None);
    }

    #[test]
    fn positions_are_one_based() {
        let s = Sink::new(Path::new("f.toml"), "ab\ncd\n\nxyz");
        assert_eq!(s.position(0), (1, 1));
        assert_eq!(s.position(1), (1, 2));
        assert_eq!(s.position(3), (2, 1));
        assert_eq!(s.position(7), (4, 1));
        assert_eq!(s.position(9), (4, 3));
    }
}
