//! The headers a request crosses fedport with: connection-specific ones dropped, and
//! every header that tells a service who its caller is or where it came from set by
//! fedport from what it verified — never a caller's own copy, under any spelling.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Removes connection-specific headers (RFC 9110 §7.6.1), which must not cross a hop
/// and which HTTP/2 forbids.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // one pass over the names, nothing hashed: most requests and answers carry none of
    // these (a name listed in Connection comes with a Connection field)
    let hop_by_hop = |k: &HeaderName| {
        matches!(
            k.as_str(),
            "connection"
                | "transfer-encoding"
                | "upgrade"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "keep-alive"
                | "proxy-connection"
                | "expect"
                | "te"
        )
    };
    if !h.keys().any(hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    // 100-continue is between the caller and fedport (which answers it as it reads the
    // body); a service told to expect would answer, or not read, a body that is coming
    // anyway (Envoy strips it too)
    h.remove(header::EXPECT);
    if h.get_all(header::TE).iter().any(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

/// Whether a header is one only fedport may set: one with which meshes, load
/// balancers and authenticating proxies tell a service who is calling, from where, or
/// how to route it on — services trust them because a proxy in front of them is
/// supposed to have set them. Families go by prefix: fedport's own (`fed-*`),
/// `x-forwarded-*` and `x-original-*`, client certificates forwarded by balancers
/// (`x-client-cert*`, `x-amzn-mtls-*`, `x-arr-*`, `x-ssl-*`), Envoy's (`x-envoy-*`, which
/// an Envoy sidecar obeys, e.g. to retry or time out), linkerd's (`l5d-*`;
/// `l5d-dst-override` reroutes), oauth2-proxy's (`x-auth-request-*`), AWS ALB's and
/// Azure's. `_` counts as `-`:
/// CGI-style servers (WSGI, Rack, PHP) read `X_Forwarded_For` as `X-Forwarded-For`.
pub fn is_claim(name: &HeaderName) -> bool {
    let n = name.as_str();
    // fast path: every claim starts with one of these letters
    if !matches!(
        n.as_bytes().first(),
        Some(b'f' | b'x' | b'l' | b'c' | b't' | b's' | b'r')
    ) {
        return false;
    }
    let dashed;
    let n = if n.contains('_') {
        dashed = n.replace('_', "-");
        dashed.as_str()
    } else {
        n
    };
    matches!(
        n,
        "forwarded"
            | "x-host"
            | "x-rewrite-url"
            | "x-real-ip"
            | "x-client-ip"
            | "x-cluster-client-ip"
            | "client-ip"
            | "true-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
            | "x-proxyuser-ip"
            | "x-client-verify"
            | "x-client-dn"
            | "ssl-client-cert"
            | "ssl-client-verify"
            | "x-remote-user"
            | "remote-user"
            | "x-remote-addr"
            | "x-authenticated-user"
            | "x-authenticated-userid"
            | "x-user"
            | "x-user-id"
            | "x-spiffe-id"
            | "x-istio-attributes"
            | "x-goog-authenticated-user-email"
            | "x-goog-authenticated-user-id"
            | "x-goog-iap-jwt-assertion"
            | "x-endpoint-api-userinfo"
            | "x-apigateway-api-userinfo"
            | "x-webauth-user"
            | "x-consumer-username"
            | "x-consumer-id"
            | "x-consumer-custom-id"
            | "x-credential-identifier"
            | "cf-access-authenticated-user-email"
            | "cf-access-jwt-assertion"
            | "x-jwt-assertion"
    ) || [
        "fed-",
        // x-forwarded-for, -proto, -host, -client-cert, -tls-client-cert (Traefik), …
        "x-forwarded-",
        "x-original-",
        // GCP's x-client-cert-*, and the bare x-client-cert
        "x-client-cert",
        "x-amzn-mtls-",
        // IIS ARR, and ASP.NET Core's certificate forwarding (x-arr-clientcert)
        "x-arr-",
        "x-envoy-",
        "l5d-",
        "x-ssl-",
        "x-auth-request-",
        "x-amzn-oidc-",
        "x-ms-client-principal",
        "x-pomerium-",
    ]
    .iter()
    .any(|p| n.starts_with(p))
}

/// Removes every header only fedport may set (see [`is_claim`]).
pub fn strip_claims(h: &mut HeaderMap) {
    if !h.keys().any(is_claim) {
        return;
    }
    let owned: Vec<HeaderName> = h.keys().filter(|k| is_claim(k)).cloned().collect();
    for k in owned {
        h.remove(k);
    }
}

/// Callers never set fedport's own headers: every inbound `fed-*` header is removed,
/// and `fed_*` too, which CGI-style servers read as the same name.
pub fn strip_fed_headers(h: &mut HeaderMap) {
    let fed = |k: &HeaderName| {
        let b = k.as_str().as_bytes();
        b.len() >= 4 && &b[..3] == b"fed" && matches!(b[3], b'-' | b'_')
    };
    if !h.keys().any(fed) {
        return;
    }
    let owned: Vec<HeaderName> = h.keys().filter(|k| fed(k)).cloned().collect();
    for k in owned {
        h.remove(k);
    }
}

/// What a peer node says of the request's first hop, believed from peers only.
#[derive(Default)]
pub struct Carried {
    pub forwarded_for: Option<HeaderValue>,
    pub forwarded_proto: Option<HeaderValue>,
}

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");

impl Carried {
    /// Takes what a peer carried (before [`strip_claims`] removes it).
    pub fn from_peer(h: &HeaderMap) -> Self {
        let one = |n: &HeaderName| {
            let mut all = h.get_all(n).iter();
            match (all.next(), all.next()) {
                (Some(v), None) => Some(v.clone()),
                _ => None,
            }
        };
        Self {
            forwarded_for: one(&XFF),
            forwarded_proto: one(&XFP),
        }
    }
}

/// The caller's address as `x-forwarded-for` writes it (IPv4-mapped IPv6 as IPv4):
/// worked out once per connection.
pub fn forwarded_for(remote: std::net::IpAddr) -> HeaderValue {
    let ip = match remote {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(std::net::IpAddr::V4)
            .unwrap_or(remote),
        v4 => v4,
    };
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Sets `x-forwarded-for` and `x-forwarded-proto` from what fedport verified: the
/// caller's address (the TCP peer, or what a trusted PROXY header carried), appended to
/// what a peer node carried; the first hop's scheme.
pub fn set_forwarded(h: &mut HeaderMap, carried: Carried, remote: &HeaderValue, tls: bool) {
    let xff = match carried.forwarded_for.as_ref().and_then(|v| v.to_str().ok()) {
        Some(before) => {
            let ip = remote.to_str().unwrap_or("unknown");
            HeaderValue::from_str(&format!("{before}, {ip}")).unwrap_or_else(|_| remote.clone())
        }
        None => remote.clone(),
    };
    h.insert(XFF, xff);
    let proto = carried
        .forwarded_proto
        .unwrap_or(HeaderValue::from_static(if tls { "https" } else { "http" }));
    h.insert(XFP, proto);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quoted strings of `is_claim`'s two lists, read from this file's text.
    fn claim_lists() -> (Vec<&'static str>, Vec<&'static str>) {
        let src = include_str!("headers.rs");
        let body = &src[src.find("pub fn is_claim").unwrap()..];
        let body = &body[..body.find("\n}\n").unwrap()];
        let (names, prefixes) = body.split_at(body.find(") || [").unwrap());
        let quoted = |t: &'static str| -> Vec<&'static str> {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with("//"))
                .filter_map(|l| l.split('"').nth(1))
                .filter(|q| q.len() > 1)
                .collect()
        };
        let names = quoted(&names[names.find("matches!(\n        n,").unwrap()..]);
        (names, quoted(prefixes))
    }

    #[test]
    fn the_docs_list_every_header_that_names_the_caller() {
        let docs = include_str!("../docs/lifecycle.md");
        let sec = &docs[docs.find("## Headers that name the caller").unwrap()..];
        let sec = &sec[..sec.find("\n## ").unwrap_or(sec.len())];
        let (names, prefixes) = claim_lists();
        assert!(
            names.len() > 20 && prefixes.len() > 10,
            "{names:?} {prefixes:?}"
        );
        let cell = |n: &str| format!("`{n}`");
        let in_list = |head: &str, n: &str| {
            let list = &sec[sec.find(head).unwrap()..];
            let list = &list[..list.find("\n\n").unwrap_or(list.len())];
            list.contains(&cell(n))
        };
        for n in &names {
            assert!(in_list("Names:", n), "docs/lifecycle.md does not list {n}");
            assert!(is_claim(&HeaderName::from_static(n)));
        }
        for p in &prefixes {
            assert!(
                in_list("Every name starting with:", p),
                "docs/lifecycle.md does not list {p}"
            );
            assert!(is_claim(
                &HeaderName::from_bytes(format!("{p}x").as_bytes()).unwrap()
            ));
        }
    }

    #[test]
    fn claims_are_known_in_every_spelling() {
        for n in [
            "x-forwarded-for",
            "x_forwarded_for",
            "x-forwarded_for",
            "forwarded",
            "x-real-ip",
            "x-envoy-retry-on",
            "x_envoy_max_retries",
            "l5d-dst-override",
            "x-forwarded-client-cert",
            "fed-peer",
            "fed_caller",
            "x-ssl-client-s-dn",
            "x-forwarded-tls-client-cert",
            "x-client-cert-spiffe",
            "x-amzn-mtls-clientcert",
            "x-arr-clientcert",
            "x-original-host",
            "x-host",
        ] {
            assert!(is_claim(&HeaderName::from_static(n)), "{n}");
        }
        for n in [
            "content-type",
            "x-request-id",
            "traceparent",
            "authorization",
            "x-forwarded",
        ] {
            assert!(!is_claim(&HeaderName::from_static(n)), "{n}");
        }
    }
}
