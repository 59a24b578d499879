//! One reading of a request's head, shared by routing, authorization, validation and
//! forwarding, so that no two of them can read a spelling differently: the method as a
//! case-sensitive token, the path's segments as servers route them, the content type as
//! RFC 9110 parses it, and the one authority the request is for.

use http::header::{self, HeaderMap};
use std::borrow::Cow;

/// One segment of a path as servers route it: percent-escapes decoded, `;params`
/// split off (Tomcat and Spring drop them; Go and nginx keep them as part of the name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    pub name: Cow<'a, str>,
    /// The segment carried `;params`.
    pub params: bool,
}

/// The path's segments, empty ones (`//`, a trailing `/`) skipped as servers merge
/// them. Escapes that do not decode to UTF-8 are left as they are.
pub fn segments(path: &str) -> impl Iterator<Item = Segment<'_>> {
    path.split('/').filter(|s| !s.is_empty()).map(|s| {
        let (name, params) = match s.split_once(';') {
            Some((n, _)) => (n, true),
            None => (s, false),
        };
        let name = if name.contains('%') {
            percent_encoding::percent_decode_str(name)
                .decode_utf8()
                .unwrap_or(Cow::Borrowed(name))
        } else {
            Cow::Borrowed(name)
        };
        Segment { name, params }
    })
}

/// Whether a request path is free of what servers resolve differently from a prefix
/// check: dot segments (`/a/../b`, also percent-encoded or with `;params` as Tomcat
/// reads them), encoded slashes, backslashes or semicolons, a literal backslash, an
/// encoded NUL; and escapes that do not decode once to UTF-8 — `%u002e` (IIS, old
/// Jetty), an escaped `%` (`%252e`, for servers that decode twice), overlong UTF-8
/// (`%c0%ae`), a `%` not followed by two hex digits. Clients normalise paths before
/// sending (RFC 3986 5.2.4); one that did not would let `GET /public/../admin` pass a
/// rule for `/public`, so it is refused instead.
pub fn path_is_normal(path: &str) -> bool {
    if !path.bytes().any(|b| matches!(b, b'.' | b'%' | b'\\')) {
        return true;
    }
    if path.contains('\\') {
        return false;
    }
    let b = path.as_bytes();
    let mut i = 0;
    while let Some(at) = b[i..].iter().position(|c| *c == b'%') {
        let at = i + at;
        let hex = |c: Option<&u8>| c.is_some_and(u8::is_ascii_hexdigit);
        if !(hex(b.get(at + 1)) && hex(b.get(at + 2))) {
            return false;
        }
        i = at + 3;
    }
    let lower = path.to_ascii_lowercase();
    if ["%2f", "%5c", "%00", "%25", "%3b"]
        .iter()
        .any(|e| lower.contains(e))
    {
        return false;
    }
    if percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .is_err()
    {
        return false;
    }
    !lower.split('/').any(|seg| {
        let seg = seg.split(';').next().unwrap_or("");
        let dots = seg.replace("%2e", ".");
        dots == "." || dots == ".."
    })
}

/// Headers and parameters with which frameworks let a request stand for another
/// method (Express `method-override`, ASP.NET Core, Symfony, Laravel, Jersey): fedport
/// authorizes, and judges idempotent, by the request's own method, so a request that
/// names another is refused rather than let a `POST` grant become a `DELETE`.
pub fn overrides_method(headers: &HeaderMap, query: Option<&str>) -> bool {
    const NAMES: [&str; 3] = [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
    ];
    headers.keys().any(|k| {
        let n = k.as_str();
        NAMES.iter().any(|m| {
            n.len() == m.len()
                && n.bytes()
                    .zip(m.bytes())
                    .all(|(a, b)| a == b || (a == b'_' && b == b'-'))
        })
    }) || query.is_some_and(|q| {
        q.split('&').any(|kv| {
            let k = kv.split('=').next().unwrap_or("");
            percent_encoding::percent_decode_str(k)
                .decode_utf8_lossy()
                .eq_ignore_ascii_case("_method")
        })
    })
}

/// The content codings the request says its body is in (RFC 9110 8.4), other than
/// `identity`, in every field and in the `_` spelling CGI-style servers read as the
/// same header; `None` when the body is as sent.
pub fn content_encoding(headers: &HeaderMap) -> Option<String> {
    let codings: Vec<String> = headers
        .iter()
        .filter(|(k, _)| {
            let n = k.as_str();
            n == "content-encoding" || n == "content_encoding"
        })
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v.as_bytes())
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty() && c != "identity")
                .collect::<Vec<_>>()
        })
        .collect();
    (!codings.is_empty()).then(|| codings.join(", "))
}

/// The methods RFC 9110 (and RFC 5789, PATCH) defines, in their one spelling.
pub const STANDARD_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A method is a case-sensitive token (RFC 9110 9.1): `post` is not `POST`. Servers
/// differ on whether they read it as `POST` anyway, so a method that is a standard one
/// in another case is refused rather than let through as something no rule names.
pub fn method_is_canonical(method: &str) -> bool {
    !method.bytes().any(|b| b.is_ascii_lowercase())
        || !STANDARD_METHODS
            .iter()
            .any(|m| m.eq_ignore_ascii_case(method))
}

/// A media type as RFC 9110 8.3.1 writes it: `type "/" subtype *( OWS ";" OWS
/// [ token "=" ( token / quoted-string ) ] )`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaType<'a> {
    /// `type/subtype` as sent; compare it case-insensitively.
    pub essence: &'a str,
}

impl MediaType<'_> {
    pub fn is(&self, essence: &str) -> bool {
        self.essence.eq_ignore_ascii_case(essence)
    }

    /// `application/json`, or a `+json` type (`application/problem+json`).
    pub fn is_json(&self) -> bool {
        let e = self.essence.as_bytes();
        self.is("application/json")
            || (e.len() > 5 && e[e.len() - 5..].eq_ignore_ascii_case(b"+json"))
    }

    /// `application/grpc` or `application/grpc+FORMAT`.
    pub fn is_grpc(&self) -> bool {
        let e = self.essence.as_bytes();
        e.len() >= 16
            && e[..16].eq_ignore_ascii_case(b"application/grpc")
            && (e.len() == 16 || (e[16] == b'+' && e.len() > 17))
    }
}

/// A request's `content-type` fields, read once: the first, whether there were more,
/// whether any says gRPC. Parsed from here as often as needed, without looking the
/// header up again.
#[derive(Debug, Clone, Default)]
pub struct ContentTypeField {
    first: Option<http::HeaderValue>,
    many: bool,
    any_grpc: bool,
}

impl ContentTypeField {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut f = Self::default();
        for v in headers.get_all(header::CONTENT_TYPE) {
            f.any_grpc |= v
                .to_str()
                .ok()
                .and_then(parse_media_type)
                .is_some_and(|m| m.is_grpc());
            if f.first.is_some() {
                f.many = true;
            } else {
                f.first = Some(v.clone());
            }
        }
        f
    }

    /// Some field says gRPC: the caller speaks it and is answered in it, even when the
    /// request is refused for having more than one.
    pub fn claims_grpc(&self) -> bool {
        self.any_grpc
    }

    pub fn parse(&self) -> ContentType<'_> {
        match (&self.first, self.many) {
            (None, _) => ContentType::Absent,
            (Some(_), true) => ContentType::Many,
            (Some(v), false) => match v.to_str().ok().and_then(parse_media_type) {
                Some(m) => ContentType::One(m),
                None => ContentType::Invalid,
            },
        }
    }
}

/// What a request says its body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType<'a> {
    Absent,
    One(MediaType<'a>),
    /// Not a media type (a list, stray characters, a bad parameter).
    Invalid,
    /// More than one `content-type` field: which would a service read?
    Many,
}

impl ContentType<'_> {
    /// The request is a gRPC call: its one content type is `application/grpc…`.
    pub fn is_grpc(&self) -> bool {
        matches!(self, ContentType::One(m) if m.is_grpc())
    }

    /// Whether the request must be refused by a service that checks formats: more
    /// than one content type, or one that is not a media type.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, ContentType::Many | ContentType::Invalid)
    }

    /// The media type, lower-cased, for messages and metrics; `""` when absent.
    pub fn essence(&self) -> String {
        match self {
            ContentType::Absent => String::new(),
            ContentType::One(m) => m.essence.to_ascii_lowercase(),
            ContentType::Invalid => "(not a media type)".into(),
            ContentType::Many => "(more than one content-type)".into(),
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

fn ows(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// Parses a `content-type` value; `None` when it is not one media type.
pub fn parse_media_type(v: &str) -> Option<MediaType<'_>> {
    let v = ows(v);
    let end = v.find([';', ' ', '\t']).unwrap_or(v.len());
    let essence = &v[..end];
    let (t, s) = essence.split_once('/')?;
    if !token(t) || !token(s) {
        return None;
    }
    let mut rest = ows(&v[end..]);
    while !rest.is_empty() {
        rest = ows(rest.strip_prefix(';')?);
        if rest.is_empty() || rest.starts_with(';') {
            continue;
        }
        let eq = rest.find('=')?;
        if !token(&rest[..eq]) {
            return None;
        }
        let after = &rest[eq + 1..];
        let used = if let Some(q) = after.strip_prefix('"') {
            // quoted-string: qdtext or quoted-pair, up to the closing quote
            let b = q.as_bytes();
            let mut i = 0;
            loop {
                match b.get(i)? {
                    b'"' => break 2 + i,
                    b'\\' => i += 2,
                    c if *c == b'\t' || (0x20..0x7f).contains(c) || *c >= 0x80 => i += 1,
                    _ => return None,
                }
            }
        } else {
            let n = after.find([';', ' ', '\t']).unwrap_or(after.len());
            if !token(&after[..n]) {
                return None;
            }
            n
        };
        rest = ows(&after[used..]);
        if !rest.is_empty() && !rest.starts_with(';') {
            return None;
        }
    }
    Some(MediaType { essence })
}

/// The host a request is for, from `:authority` (HTTP/2, or an absolute-form target)
/// or `Host`, lower-cased, without a port or a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host<'a>(pub Cow<'a, str>);

impl Host<'_> {
    /// The first label: the service a host name stands for.
    pub fn first_label(&self) -> &str {
        self.0.split('.').next().unwrap_or(&self.0)
    }
}

/// Why a request's authority cannot be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("more than one Host header")]
    ManyHosts,
    #[error(":authority and Host name different hosts")]
    Disagree,
    #[error("the authority is not host[:port]")]
    Malformed,
}

/// The one authority of a request. An absolute-form target or `:authority` wins over
/// `Host` (RFC 9112 3.2.2), but a `Host` naming another host beside `:authority` makes
/// the request malformed (RFC 9113 8.3.1): a service could read either.
pub fn host<'a>(
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
) -> Result<Option<Host<'a>>, AuthorityError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let h = hosts.next();
    if hosts.next().is_some() {
        return Err(AuthorityError::ManyHosts);
    }
    let from_host = match h {
        Some(v) => Some(parse_host(
            v.to_str().map_err(|_| AuthorityError::Malformed)?,
        )?),
        None => None,
    };
    match uri.authority() {
        Some(a) => {
            let from_uri = parse_host(a.as_str())?;
            if from_host.as_ref().is_some_and(|h| *h != from_uri) {
                return Err(AuthorityError::Disagree);
            }
            Ok(Some(from_uri))
        }
        None => Ok(from_host),
    }
}

impl AuthorityError {
    /// The refusal's message.
    pub fn message(self) -> &'static str {
        match self {
            AuthorityError::ManyHosts => "more than one Host header: which would the service read?",
            AuthorityError::Disagree => {
                ":authority and Host name different hosts (RFC 9113 section 8.3.1)"
            }
            AuthorityError::Malformed => "the :authority or Host is not host[:port]",
        }
    }
}

fn parse_host(a: &str) -> Result<Host<'_>, AuthorityError> {
    let bad = AuthorityError::Malformed;
    if a.is_empty() || a.contains('@') {
        return Err(bad);
    }
    let (host, port, v6) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or(bad)?;
        if h.parse::<std::net::Ipv6Addr>().is_err() || !(after.is_empty() || after.starts_with(':'))
        {
            return Err(bad);
        }
        (h, after.strip_prefix(':'), true)
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p), false),
            None => (a, None, false),
        }
    };
    if let Some(p) = port {
        if !p.is_empty() && p.parse::<u16>().is_err() {
            return Err(bad);
        }
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_') || (v6 && b == b':')
        });
    if !ok {
        return Err(bad);
    }
    Ok(Host(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_parse_as_rfc_9110_writes_them() {
        for (v, essence) in [
            ("application/json", "application/json"),
            ("Application/JSON", "Application/JSON"),
            ("application/json; charset=utf-8", "application/json"),
            ("application/json ;charset=utf-8", "application/json"),
            ("application/json;charset=\"utf-8\"", "application/json"),
            ("application/json;a=\"x;y\\\"z\";b=c", "application/json"),
            ("application/json;", "application/json"),
            ("  application/grpc+proto  ", "application/grpc+proto"),
        ] {
            assert_eq!(parse_media_type(v).map(|m| m.essence), Some(essence), "{v}");
        }
        for v in [
            "",
            "application",
            "application/",
            "/json",
            "application/json, text/plain",
            "application /json",
            "application/ json",
            "application/json; charset",
            "application/json; charset=",
            "application/json; charset=\"utf-8",
            "application/json; a=b c",
            "appli(cation/json",
        ] {
            assert_eq!(parse_media_type(v), None, "{v}");
        }
    }

    #[test]
    fn grpc_is_its_media_type_in_any_case() {
        for (v, grpc) in [
            ("application/grpc", true),
            ("Application/GRPC", true),
            ("application/grpc+proto", true),
            ("APPLICATION/GRPC+PROTO; charset=x", true),
            ("application/grpc-web", false),
            ("application/grpcx", false),
            ("application/grpc+", false),
            ("application/grp", false),
        ] {
            assert_eq!(
                parse_media_type(v).is_some_and(|m| m.is_grpc()),
                grpc,
                "{v}"
            );
        }
    }

    #[test]
    fn segments_are_read_as_servers_route_them() {
        let names = |p| segments(p).map(|s| s.name.into_owned()).collect::<Vec<_>>();
        assert_eq!(names("//v1//orders/"), ["v1", "orders"]);
        assert_eq!(names("/v1/%6Frders;x=1"), ["v1", "orders"]);
        assert!(segments("/v1/orders;x=1").nth(1).unwrap().params);
        assert_eq!(names("/"), Vec::<String>::new());
    }

    #[test]
    fn methods_are_case_sensitive_tokens() {
        assert!(method_is_canonical("POST"));
        assert!(method_is_canonical("PROPFIND"));
        assert!(method_is_canonical("custom"));
        assert!(!method_is_canonical("post"));
        assert!(!method_is_canonical("Get"));
    }

    #[test]
    fn one_authority_or_none() {
        let req = |uri: &str, hosts: &[&str]| {
            let mut b = http::Request::builder().uri(uri);
            for h in hosts {
                b = b.header("host", *h);
            }
            let r = b.body(()).unwrap();
            host(r.uri(), r.headers()).map(|h| h.map(|h| Host(Cow::Owned(h.0.into_owned()))))
        };
        let h = |s: &'static str| Ok(Some(Host(s.into())));
        assert_eq!(req("/x", &["Orders.Fed.Test.:443"]), h("orders.fed.test"));
        assert_eq!(req("https://orders:7443/x", &[]), h("orders"));
        assert_eq!(req("https://orders:7443/x", &["orders"]), h("orders"));
        assert_eq!(req("[::1]:80", &[]).map(|_| ()), Ok(()));
        assert_eq!(req("/x", &[]), Ok(None));
        assert_eq!(req("/x", &["a", "b"]), Err(AuthorityError::ManyHosts));
        assert_eq!(
            req("https://orders/x", &["inventory"]),
            Err(AuthorityError::Disagree)
        );
        assert_eq!(req("/x", &["user@orders"]), Err(AuthorityError::Malformed));
        assert_eq!(req("/x", &["orders:x"]), Err(AuthorityError::Malformed));
        assert_eq!(req("/x", &["ord ers"]), Err(AuthorityError::Malformed));
        assert_eq!(Host("orders.fed.test".into()).first_label(), "orders");
    }
}
