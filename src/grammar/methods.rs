//! What a rule (or a service's `idempotent` list) says of methods, compiled once:
//! `pkg.Service/Method` exactly, `pkg.Service/*` any method of that gRPC service, and
//! `VERB /path` — that verb, case-sensitive (`*`: any), on that path and the paths
//! below it at a `/` boundary, with `*` standing for one whole segment. `/v1/items` is
//! never `/v1/items-admin`, and `POST /v1/search` never `POST /v1/search-and-delete`.

use crate::request::{segments, Segment};
use std::fmt;

/// What a request asks of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call<'a> {
    /// `pkg.Service/Method`
    Grpc(&'a str),
    /// verb and path
    Http(&'a str, &'a str),
}

impl fmt::Display for Call<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Grpc(m) => f.write_str(m),
            Call::Http(v, p) => write!(f, "{v} {p}"),
        }
    }
}

/// One segment of a rule's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Lit(String),
    /// `*`: any one segment.
    One,
}

/// One compiled method entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodRule {
    /// `pkg.Service/Method`, or with `method: None`, `pkg.Service/*`.
    Grpc {
        service: String,
        method: Option<String>,
    },
    /// `VERB /path` (`verb: None`: `*`), the path and everything below it.
    Http {
        verb: Option<String>,
        path: Vec<Seg>,
    },
}

/// Why a method entry does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a method: {why}")]
pub struct MethodError {
    pub text: String,
    pub why: &'static str,
}

fn token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl MethodRule {
    pub fn parse(text: &str) -> Result<Self, MethodError> {
        let err = |why| MethodError {
            text: text.to_owned(),
            why,
        };
        if text.trim().is_empty() {
            return Err(err("it is empty"));
        }
        if let Some((verb, path)) = text.split_once(' ') {
            let verb = match verb {
                "*" => None,
                v if token(v) => Some(v.to_owned()),
                _ => return Err(err("the verb is a token such as GET, or * for any")),
            };
            if !path.starts_with('/') {
                return Err(err("the path starts with '/'"));
            }
            if path.contains(' ') || path.contains('?') || path.contains('#') {
                return Err(err("the path is one path, with no query"));
            }
            let mut segs = Vec::new();
            for Segment { name, params } in segments(path) {
                if params {
                    return Err(err("a rule's path has no ;params"));
                }
                match &*name {
                    "*" => segs.push(Seg::One),
                    "**" => {
                        return Err(err(
                            "a path already covers what is below it: write /a/b, not /a/b/**",
                        ))
                    }
                    n if n.contains('*') => {
                        return Err(err("a wildcard is a whole segment: /v1/*/items"))
                    }
                    "." | ".." => return Err(err("a rule's path has no dot segments")),
                    n => segs.push(Seg::Lit(n.to_owned())),
                }
            }
            return Ok(MethodRule::Http { verb, path: segs });
        }
        let (svc, m) = text
            .split_once('/')
            .ok_or_else(|| err("write pkg.Service/Method, pkg.Service/* or VERB /path"))?;
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        };
        if !name_ok(svc) {
            return Err(err(
                "the gRPC service is a dotted name such as orders.v1.Orders",
            ));
        }
        let method = match m {
            "*" => None,
            m if name_ok(m) && !m.contains('.') => Some(m.to_owned()),
            _ => return Err(err("the gRPC method is a name, or * for any")),
        };
        Ok(MethodRule::Grpc {
            service: svc.to_owned(),
            method,
        })
    }

    pub fn allows(&self, call: Call<'_>) -> bool {
        match (self, call) {
            (MethodRule::Grpc { service, method }, Call::Grpc(m)) => {
                m.split_once('/').is_some_and(|(s, name)| {
                    s == service && method.as_deref().is_none_or(|want| want == name)
                })
            }
            (MethodRule::Http { verb, path }, Call::Http(v, p)) => {
                if verb.as_deref().is_some_and(|want| want != v) {
                    return false;
                }
                let mut segs = segments(p);
                path.iter().all(|want| match segs.next() {
                    // a segment with ;params is read differently by different servers:
                    // it is not the segment the rule names
                    Some(s) if s.params => false,
                    Some(s) => match want {
                        Seg::One => true,
                        Seg::Lit(l) => *l == *s.name,
                    },
                    None => false,
                })
            }
            _ => false,
        }
    }

    /// Whether the verb names a standard method in another case (`get`): such a
    /// request is refused, so the entry matches nothing.
    pub fn verb_is_miscased(&self) -> bool {
        matches!(self, MethodRule::Http { verb: Some(v), .. } if !crate::request::method_is_canonical(v))
    }
}

impl fmt::Display for MethodRule {
    /// The entry and what it means (for `describe` and `plan`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MethodRule::Grpc {
                service,
                method: Some(m),
            } => write!(f, "{service}/{m}"),
            MethodRule::Grpc {
                service,
                method: None,
            } => write!(f, "{service}/* (every method)"),
            MethodRule::Http { verb, path } => {
                f.write_str(verb.as_deref().unwrap_or("*"))?;
                f.write_str(" /")?;
                let p: Vec<&str> = path
                    .iter()
                    .map(|s| match s {
                        Seg::Lit(l) => l.as_str(),
                        Seg::One => "*",
                    })
                    .collect();
                f.write_str(&p.join("/"))?;
                if path.is_empty() {
                    f.write_str(" (every path)")
                } else {
                    f.write_str(" (and every path below it)")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(rule: &str, call: &str) -> bool {
        let c = match call.split_once(' ') {
            Some((v, p)) => Call::Http(v, p),
            None => Call::Grpc(call),
        };
        MethodRule::parse(rule).unwrap().allows(c)
    }

    #[test]
    fn paths_match_at_segment_boundaries() {
        for (rule, call, want) in [
            ("GET /v1/items", "GET /v1/items", true),
            ("GET /v1/items", "GET /v1/items/", true),
            ("GET /v1/items", "GET /v1/items/7", true),
            ("GET /v1/items", "GET //v1//items", true),
            ("GET /v1/items", "GET /v1/%69tems", true),
            ("GET /v1/items", "GET /v1/items-admin", false),
            ("GET /v1/items", "GET /v1/itemsadmin/x", false),
            ("GET /v1/items", "GET /v1/item", false),
            ("GET /v1/items", "GET /v1/items;x=1", false),
            ("GET /v1/items", "get /v1/items", false),
            ("GET /v1/items", "POST /v1/items", false),
            ("* /v1/public/", "PUT /v1/public/x", true),
            ("* /v1/public/", "PUT /v1/publicity", false),
            ("GET /v1/*/detail", "GET /v1/7/detail", true),
            ("GET /v1/*/detail", "GET /v1/7/details", false),
            ("GET /v1/*/detail", "GET /v1/detail", false),
            ("GET /", "GET /anything/at/all", true),
            ("POST /v1/search", "POST /v1/search-and-delete", false),
        ] {
            assert_eq!(allows(rule, call), want, "{rule} ~ {call}");
        }
    }

    #[test]
    fn grpc_entries_are_exact_or_a_whole_service() {
        assert!(allows("a.B/Get", "a.B/Get"));
        assert!(!allows("a.B/Get", "a.B/GetAll"));
        assert!(!allows("a.B/Get", "a.BC/Get"));
        assert!(allows("a.B/*", "a.B/Delete"));
        assert!(!allows("a.B/*", "a.Bx/Delete"));
        assert!(!allows("a.B/*", "GET /a.B/Delete"));
        assert!(!allows("GET /a.B", "a.B/Get"));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for m in [
            "GET v1",
            "GET /v1/item*",
            "GET /v1/**",
            "GET /v1;x/a",
            "G(T /x",
            "a.B/Get/x",
            "a.B/Ge*",
            "/Get",
            "nothing",
        ] {
            assert!(MethodRule::parse(m).is_err(), "{m}");
        }
        assert!(MethodRule::parse("get /x").unwrap().verb_is_miscased());
        assert!(!MethodRule::parse("PROPFIND /x").unwrap().verb_is_miscased());
    }
}
