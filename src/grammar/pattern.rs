//! Identity patterns, each kind by its own grammar: a SPIFFE pattern matches SPIFFE IDs
//! segment by segment, a DNS pattern matches DNS names label by label, and neither ever
//! matches an identity of the other kind (`*.svc.example` is no SPIFFE ID's suffix).

use std::fmt;

/// Why a pattern (or an identity) is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{0:?} is not a SPIFFE ID pattern: {1}")]
    Spiffe(String, &'static str),
    #[error("{0:?} is not a DNS name pattern: {1}")]
    Dns(String, &'static str),
}

/// One SPIFFE path segment or DNS label of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(String),
    /// `*`: any one segment or label.
    One,
}

impl Part {
    fn matches(&self, s: &str) -> bool {
        match self {
            Part::Lit(l) => l == s,
            Part::One => true,
        }
    }
}

/// A compiled identity pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// `*` alone: every identity, `local` included.
    Any,
    /// `local`: callers on a local listener.
    Local,
    /// `spiffe://DOMAIN/seg/…`: the trust domain (`*` for any), path segments (`*` one),
    /// and a final `**` for one or more further segments.
    Spiffe {
        domain: Part,
        path: Vec<Part>,
        rest: bool,
    },
    /// `name.example`, `*.svc.example` (`*` one label), `**.example` (one or more).
    Dns { labels: Vec<Part>, more: bool },
    /// Never matches (a pattern that did not compile; `check` refuses such files).
    Never,
}

/// An identity as read from a certificate, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity<'a> {
    Local,
    Spiffe {
        domain: &'a str,
        path: Vec<&'a str>,
    },
    Dns(Vec<&'a str>),
    /// Neither grammar: matches no pattern but `*`.
    Other,
}

fn spiffe_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

fn domain_ok(d: &str) -> bool {
    !d.is_empty()
        && d.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.bytes().all(spiffe_char)
}

fn label_ok(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// Reads an identity by its grammar (SPIFFE ID per the SPIFFE spec: a lower-case
/// trust domain, non-empty segments of `[A-Za-z0-9._-]` other than `.` and `..`; DNS:
/// LDH labels, lower-case).
pub fn identity(id: &str) -> Identity<'_> {
    if id == "local" {
        return Identity::Local;
    }
    if let Some(rest) = id.strip_prefix("spiffe://") {
        let mut parts = rest.split('/');
        let domain = parts.next().unwrap_or("");
        let path: Vec<&str> = parts.collect();
        if domain_ok(domain) && path.iter().all(|s| segment_ok(s)) {
            return Identity::Spiffe { domain, path };
        }
        return Identity::Other;
    }
    let labels: Vec<&str> = id.split('.').collect();
    if id.len() <= 253
        && labels.iter().all(|l| label_ok(l))
        && !id.bytes().any(|b| b.is_ascii_uppercase())
    {
        return Identity::Dns(labels);
    }
    Identity::Other
}

/// Whether a string is an identity of either kind (a peer's `identity` must be).
pub fn is_identity(id: &str) -> bool {
    matches!(identity(id), Identity::Spiffe { .. } | Identity::Dns(_))
}

impl Pattern {
    /// Compiles a pattern; peer names must be resolved to identities first.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        match text {
            "*" => return Ok(Pattern::Any),
            "local" => return Ok(Pattern::Local),
            _ => {}
        }
        if let Some(rest) = text
            .get(..9)
            .filter(|s| s.eq_ignore_ascii_case("spiffe://"))
        {
            let _ = rest;
            let err = |why| PatternError::Spiffe(text.to_owned(), why);
            let mut parts = text[9..].split('/');
            let d = parts.next().unwrap_or("");
            let domain = match d {
                "*" => Part::One,
                d if domain_ok(&d.to_ascii_lowercase()) => Part::Lit(d.to_ascii_lowercase()),
                _ => return Err(err("the trust domain is letters, digits, '.', '-' and '_'")),
            };
            let segs: Vec<&str> = parts.collect();
            let mut path = Vec::new();
            let mut rest = false;
            for (i, s) in segs.iter().enumerate() {
                match *s {
                    "**" if i + 1 == segs.len() => rest = true,
                    "**" => return Err(err("`**` may only be the last segment")),
                    "*" => path.push(Part::One),
                    s if s.contains('*') => {
                        return Err(err("a wildcard is a whole segment: `*` or a final `**`"))
                    }
                    s if segment_ok(s) => path.push(Part::Lit(s.to_owned())),
                    _ => return Err(err(
                        "segments are non-empty, of letters, digits, '.', '-' and '_', and not . or ..",
                    )),
                }
            }
            return Ok(Pattern::Spiffe { domain, path, rest });
        }
        let err = |why| PatternError::Dns(text.to_owned(), why);
        if text.contains('/') || text.contains(':') {
            return Err(err(
                "a DNS name has no '/' or ':'; SPIFFE IDs start spiffe://",
            ));
        }
        let lower = text.to_ascii_lowercase();
        let all: Vec<&str> = lower.split('.').collect();
        let mut labels = Vec::new();
        let mut more = false;
        for (i, l) in all.iter().enumerate() {
            match *l {
                "**" if i == 0 && all.len() > 1 => more = true,
                "**" => return Err(err("`**` may only be the first label")),
                "*" => labels.push(Part::One),
                l if l.contains('*') => {
                    return Err(err("a wildcard is a whole label: `*` or a leading `**`"))
                }
                l if label_ok(l) => labels.push(Part::Lit(l.to_owned())),
                _ => return Err(err("labels are letters, digits and '-', separated by '.'")),
            }
        }
        Ok(Pattern::Dns { labels, more })
    }

    /// Like [`Pattern::parse`], but a bad pattern matches nothing.
    pub fn new(text: &str) -> Self {
        Self::parse(text).unwrap_or(Pattern::Never)
    }

    pub fn matches(&self, id: &str) -> bool {
        self.matches_identity(&identity(id))
    }

    pub fn matches_identity(&self, id: &Identity<'_>) -> bool {
        match (self, id) {
            (Pattern::Any, _) => true,
            (Pattern::Local, Identity::Local) => true,
            (
                Pattern::Spiffe { domain, path, rest },
                Identity::Spiffe {
                    domain: d,
                    path: segs,
                },
            ) => {
                domain.matches(d)
                    && if *rest {
                        segs.len() > path.len()
                    } else {
                        segs.len() == path.len()
                    }
                    && path.iter().zip(segs).all(|(p, s)| p.matches(s))
            }
            (Pattern::Dns { labels, more }, Identity::Dns(ls)) => {
                // compared from the right: the zone first
                let fits = if *more {
                    ls.len() > labels.len()
                } else {
                    ls.len() == labels.len()
                };
                fits && labels
                    .iter()
                    .rev()
                    .zip(ls.iter().rev())
                    .all(|(p, l)| p.matches(l))
            }
            _ => false,
        }
    }

    /// Whether the pattern names every trust domain (`spiffe://*/…`): worth a warning,
    /// since another organisation's CA could then speak for the rule.
    pub fn any_trust_domain(&self) -> bool {
        matches!(
            self,
            Pattern::Spiffe {
                domain: Part::One,
                ..
            }
        )
    }
}

impl fmt::Display for Pattern {
    /// What the pattern matches, in words (for `describe` and `plan`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |p: &Part| match p {
            Part::Lit(l) => l.clone(),
            Part::One => "*".into(),
        };
        match self {
            Pattern::Any => f.write_str("* (every identity)"),
            Pattern::Local => f.write_str("local (local listeners)"),
            Pattern::Never => f.write_str("(nothing)"),
            Pattern::Spiffe { domain, path, rest } => {
                write!(f, "spiffe://{}", part(domain))?;
                for p in path {
                    write!(f, "/{}", part(p))?;
                }
                if *rest {
                    f.write_str("/**")?;
                }
                let wild = matches!(domain, Part::One) || *rest || path.contains(&Part::One);
                if wild {
                    f.write_str(" (SPIFFE IDs; * one segment")?;
                    if *rest {
                        f.write_str(", ** one or more")?;
                    }
                    f.write_str(")")?;
                }
                Ok(())
            }
            Pattern::Dns { labels, more } => {
                let mut all: Vec<String> = labels.iter().map(part).collect();
                if *more {
                    all.insert(0, "**".into());
                }
                f.write_str(&all.join("."))?;
                if *more || labels.contains(&Part::One) {
                    f.write_str(" (DNS names; * one label")?;
                    if *more {
                        f.write_str(", ** one or more")?;
                    }
                    f.write_str(")")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_matches_by_its_own_grammar() {
        let cases: &[(&str, &str, bool)] = &[
            (
                "spiffe://fed.example/node/*",
                "spiffe://fed.example/node/a",
                true,
            ),
            (
                "spiffe://fed.example/node/*",
                "spiffe://fed.example/node/a/b",
                false,
            ),
            (
                "spiffe://fed.example/node/*",
                "spiffe://fed.example/node",
                false,
            ),
            (
                "spiffe://fed.example/admin/**",
                "spiffe://fed.example/admin/x/y",
                true,
            ),
            (
                "spiffe://fed.example/admin/**",
                "spiffe://fed.example/admin",
                false,
            ),
            ("spiffe://FED.example/x", "spiffe://fed.example/x", true),
            ("spiffe://fed.example/X", "spiffe://fed.example/x", false),
            ("spiffe://*/node/a", "spiffe://other.example/node/a", true),
            ("*.svc.fed.example", "a.svc.fed.example", true),
            ("*.svc.fed.example", "a.b.svc.fed.example", false),
            ("**.svc.fed.example", "a.b.svc.fed.example", true),
            ("**.svc.fed.example", "svc.fed.example", false),
            ("A.Svc.Fed.Example", "a.svc.fed.example", true),
            // a DNS pattern never matches a SPIFFE ID, nor the reverse
            (
                "*.svc.fed.example",
                "spiffe://evil.example/a.svc.fed.example",
                false,
            ),
            ("**.fed.example", "spiffe://x.fed.example/a", false),
            ("spiffe://fed.example/*", "fed.example", false),
            // an identity outside both grammars matches only `*`
            ("spiffe://fed.example/*", "spiffe://fed.example/..", false),
            ("spiffe://fed.example/*/x", "spiffe://fed.example//x", false),
            ("*", "spiffe://fed.example/..", true),
            ("local", "local", true),
            ("*", "local", true),
            ("*.example", "local", false),
        ];
        for (p, id, want) in cases {
            assert_eq!(Pattern::parse(p).unwrap().matches(id), *want, "{p} ~ {id}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for p in [
            "spiffe://fed.example/node-*",
            "spiffe://fed.example/**/x",
            "spiffe://fed example/x",
            "spiffe://fed.example//x",
            "*.svc/x",
            "svc.**",
            "a*.example",
            "a..example",
        ] {
            assert!(Pattern::parse(p).is_err(), "{p}");
        }
    }

    #[test]
    fn identities_are_read_by_kind() {
        assert!(matches!(
            identity("spiffe://fed.test/node/a"),
            Identity::Spiffe { .. }
        ));
        assert!(matches!(identity("a.fed.test"), Identity::Dns(_)));
        assert_eq!(identity("spiffe://Fed.test/a"), Identity::Other);
        assert_eq!(identity("*.fed.test"), Identity::Other);
        assert_eq!(identity("A.fed.test"), Identity::Other);
        assert!(!is_identity("local"));
    }
}
