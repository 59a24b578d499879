//! Stage 2, route: which service a request is for (a dedicated listener's, else by
//! `fed-service`, gRPC path or host), read as that service reads it: its content type,
//! whether it is a gRPC call of the service, which schema method or JSON Schema route it
//! matches. A host naming another service is refused (misdirected).

use super::outcome::Routed;
use super::{ConnCtx, Worker};
use crate::config::{JsonRoute, MethodSchema, ProtoSchema, Protocol, Service};
use crate::errors::Reject;
use crate::grammar::Call;
use crate::request::{ContentType, ContentTypeField, Host};
use http::request::Parts;

/// A request routed to its service.
pub(super) struct Route<'w, 'c> {
    pub idx: usize,
    pub service: &'w Service,
    /// Its one content type (absent, many or unreadable included).
    pub ct: ContentType<'c>,
    /// The service checks formats: a content type it could misread is refused.
    pub checks_formats: bool,
    /// A gRPC call: the caller claims it and its one content type says so.
    pub grpc: bool,
    /// The method of the service's protobuf schema, for a gRPC call of it.
    pub schema: Option<(&'w ProtoSchema, &'w MethodSchema)>,
    /// The JSON Schema route it matches.
    pub json: Option<&'w JsonRoute>,
}

/// The route, and the call the rules are asked about (it borrows the request's method
/// and path, which the stages after admission may not hold).
pub(super) fn route<'w, 'c, 'p>(
    w: &'w Worker,
    conn: &ConnCtx,
    parts: &'p Parts,
    host: Option<Host<'_>>,
    ct_field: &'c ContentTypeField,
    routed: &mut Routed,
) -> Result<(Route<'w, 'c>, Call<'p>), Reject> {
    route_in(
        &w.table,
        &w.config,
        conn.dedicated.as_deref(),
        parts,
        host,
        ct_field,
        routed,
    )
}

/// [`route`] by a configuration's routing table, for a listener dedicated to a
/// service or not: what `plan --replay` judges recorded requests by, too.
#[inline(always)]
pub(super) fn route_in<'w, 'c, 'p>(
    table: &crate::route::Table,
    config: &'w crate::config::Config,
    dedicated: Option<&str>,
    parts: &'p Parts,
    host: Option<Host<'_>>,
    ct_field: &'c ContentTypeField,
    routed: &mut Routed,
) -> Result<(Route<'w, 'c>, Call<'p>), Reject> {
    let claims_grpc = ct_field.claims_grpc();
    let idx = match dedicated {
        Some(name) => table
            .by_name(name)
            .ok_or_else(|| Reject::UnknownService(name.to_owned()))?,
        None => table.route(parts.uri.path(), &parts.headers, host.as_ref(), claims_grpc)?,
    };
    let service = &config.services[idx];
    // a TCP service's bytes are spliced on its own listeners: no HTTP request is one of
    // its calls (nor may one make its endpoints look down)
    if service.protocol == crate::config::Protocol::Tcp {
        return Err(Reject::UnknownService(format!(
            "{} (a TCP service, reached on its own listeners)",
            service.name
        )));
    }
    routed.service = Some(idx);
    // which of two content types would the service read? and what is not a media type
    // is none: refused by a service that checks formats, before anything else
    let ct = ct_field.parse();
    let checks_formats = !service.formats.is_empty()
        || service.protocol == Protocol::Grpc
        || service.proto.is_some()
        || !service.json.is_empty();
    if checks_formats && ct.is_ambiguous() {
        return Err(Reject::Format(service.name.clone(), ct.essence()));
    }
    let grpc = claims_grpc && ct.is_grpc();
    // a host naming another service than the one the request is for: the service would
    // be told one name and fedport have checked another
    if let Some(h) = &host {
        if table.by_name(h.first_label()).is_some_and(|o| o != idx) {
            return Err(Reject::Misdirected {
                service: service.name.clone(),
                host: h.0.to_string(),
            });
        }
    }
    let schema = match (&service.proto, grpc) {
        (Some(p), true) => {
            let m = parts.uri.path().trim_start_matches('/');
            let schema = p.methods.get(m).ok_or_else(|| {
                Reject::UnknownService(format!("gRPC method {m} (not in the service's schema)"))
            })?;
            routed.method = Some(schema.name.clone());
            Some((p, &**schema))
        }
        _ => None,
    };
    // looked up whatever the content type says: a body for a JSON Schema route is
    // validated as JSON even when it claims to be gRPC
    let json = {
        let (m, p) = (parts.method.as_str(), parts.uri.path());
        service.json.iter().find(|r| r.matches(m, p))
    };
    if let Some(r) = json {
        routed.method = Some(r.route.clone());
    }
    // a call is read as its service's protocol reads it: a gRPC content type makes a
    // gRPC call of a gRPC service only, never of an HTTP service's route
    let call = match crate::route::grpc_path(parts.uri.path()) {
        Some(_) if grpc && service.protocol == Protocol::Grpc => Call::Grpc(&parts.uri.path()[1..]),
        _ => Call::Http(parts.method.as_str(), parts.uri.path()),
    };
    let route = Route {
        idx,
        service,
        ct,
        checks_formats,
        grpc,
        schema,
        json,
    };
    Ok((route, call))
}
