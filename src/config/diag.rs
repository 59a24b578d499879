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

#[cfg(test)]
mod tests {
    use super::*;

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
