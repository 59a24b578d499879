//! Stage 1, hygiene: a request is read one way or refused before anything looks at it.
//! Its header list is held against the connection's memory budget; dot segments and
//! encoded separators, a method named by another header, a standard method in another
//! case and a host that cannot be read one way are refused (docs/lifecycle.md).

use super::ConnCtx;
use crate::errors::Reject;
use crate::memory::{header_list_size, Held};
use crate::request::{self, Host};
use http::request::Parts;

/// Header lists up to this are charged to their connection only.
const SMALL_HEADERS: u64 = 4096;

/// What hygiene lets through: the request's one host, and its header list held.
pub(super) struct Clean<'p> {
    pub host: Option<Host<'p>>,
    pub headers_held: Held,
}

pub(super) fn check<'p>(parts: &'p Parts, conn: &ConnCtx) -> Result<Clean<'p>, Reject> {
    // a header list of the usual size is charged to the connection only (no shared
    // counter on every request); a larger one to the caller's share and the node's
    // budget too, so that many connections of large lists are bounded by them
    let size = header_list_size(&parts.headers);
    let headers_held = if size > SMALL_HEADERS {
        Held::with(conn.memory.clone(), size)
    } else {
        Held::connection_only(conn.memory.clone(), size)
    }
    .map_err(Reject::Memory)?;
    let host = read(parts)?;
    Ok(Clean { host, headers_held })
}

/// The request's head read one way, or refused: its one host.
#[inline(always)]
pub(super) fn read(parts: &Parts) -> Result<Option<Host<'_>>, Reject> {
    if parts.method == http::Method::CONNECT {
        // a peer node's CONNECT carries a TCP service and never reaches here (src/tcp)
        return Err(Reject::BadRequest(
            "CONNECT carries TCP services between fedport's peer nodes only; reach a TCP service on its own listener",
        ));
    }
    if !request::path_is_normal(parts.uri.path()) {
        return Err(Reject::BadRequest(
            "the path has dot segments or encoded separators; send it normalised (RFC 3986 section 5.2.4)",
        ));
    }
    if request::overrides_method(&parts.headers, parts.uri.query()) {
        return Err(Reject::BadRequest(
            "the request names another method (X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override or _method); send that method itself",
        ));
    }
    if !request::method_is_canonical(parts.method.as_str()) {
        return Err(Reject::BadRequest(
            "the method is a standard method in another case; methods are case-sensitive (RFC 9110 section 9.1): send it in upper case",
        ));
    }
    request::host(&parts.uri, &parts.headers).map_err(|e| Reject::BadRequest(e.message()))
}
