//! The one vocabulary of why fedport refused, cut or ended something ([`Reason`]):
//! every `reason` label of a metric, every JSON `reason`, every `fed-refused` value,
//! whether at a connection, before an answer or after the answer began. And the
//! complete gRPC status code ([`GrpcCode`]) with what an answer may carry ([`GrpcStatus`]).

use std::fmt;

macro_rules! reasons {
    ($( $(#[$doc:meta])* $kind:ident $v:ident = $s:literal, )*) => {
        /// Why fedport refused a connection or a request, or ended one it had begun.
        /// The strings are a public contract: metric label values, the JSON error body's
        /// `reason`, the `fed-refused` header a peer reads.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $( $(#[$doc])* $v, )*
        }

        impl Reason {
            /// Every reason, in the order above.
            pub const ALL: &'static [Reason] = &[$(Reason::$v),*];

            /// Its label value.
            pub const fn as_str(self) -> &'static str {
                match self { $(Reason::$v => $s,)* }
            }

            /// Where in a connection's life it is given.
            pub const fn kind(self) -> Kind {
                match self { $(Reason::$v => Kind::$kind,)* }
            }

            /// The reason a label value names, if any.
            pub fn parse(s: &[u8]) -> Option<Reason> {
                match s {
                    $( x if x == $s.as_bytes() => Some(Reason::$v), )*
                    _ => None,
                }
            }
        }
    };
}

/// Where a [`Reason`] is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A connection is closed or cut: nobody can be answered in a protocol.
    Connection,
    /// A TLS handshake failed (`fedport_tls_handshake_failures_total`).
    Handshake,
    /// A request is refused before any answer began: answered in its protocol.
    Request,
    /// An answer that had begun is ended: gRPC trailers or a reset.
    Late,
}

reasons! {
    /// The source address is not in the listener's `allow`.
    Connection Address = "address",
    /// A PROXY header from an address not trusted to send one.
    Connection ProxyUntrusted = "proxy_untrusted",
    Connection ProxyTimeout = "proxy_timeout",
    Connection ProxyMalformed = "proxy_malformed",
    Connection ProxyIo = "proxy_io",
    /// The TLS handshake failed (the handshake reason says why).
    Connection Tls = "tls",
    /// The listener's `max_connections` are open.
    Connection MaxConnections = "max_connections",
    /// A header block (or the preface) took longer than `header_timeout`.
    Connection SlowHeaders = "slow_headers",
    /// A connection with no request in flight for `idle_timeout`.
    Connection IdleTimeout = "idle_timeout",
    Connection H2OversizedHeaders = "h2_oversized_headers",
    Connection H2SettingsFlood = "h2_settings_flood",
    Connection H2ContinuationFlood = "h2_continuation_flood",
    Connection H2EmptyFrames = "h2_empty_frames",
    Connection H2PingFlood = "h2_ping_flood",
    Connection H2WindowUpdateFlood = "h2_window_update_flood",
    Connection H2PriorityFlood = "h2_priority_flood",
    Connection H2UnknownFrameFlood = "h2_unknown_frame_flood",
    Connection H2Abuse = "h2_abuse",
    /// Resets of started streams over what could be in flight (rapid reset, MadeYouReset).
    Connection H2RapidReset = "h2_rapid_reset",
    Connection H2ProtocolError = "h2_protocol_error",
    Connection H2FlowControlError = "h2_flow_control_error",
    Connection H2FrameSizeError = "h2_frame_size_error",
    Connection H2CompressionError = "h2_compression_error",
    Connection H2EnhanceYourCalm = "h2_enhance_your_calm",
    Connection H2OtherError = "h2_other_error",

    Handshake HandshakeTimeout = "timeout",
    /// A verified certificate that names no identity fedport reads.
    Handshake NoIdentity = "no_identity",
    Handshake HandshakeIo = "io",
    Handshake NoClientCert = "no_client_cert",
    Handshake UnknownCa = "unknown_ca",
    Handshake Expired = "expired",
    Handshake NotYetValid = "not_yet_valid",
    Handshake Revoked = "revoked",
    /// The certificate does not chain to the bundle of the trust domain its identity
    /// names, or names a domain this node has no bundle for.
    Handshake TrustDomain = "trust_domain",
    Handshake BadCertificate = "bad_certificate",
    Handshake Incompatible = "incompatible",
    Handshake Alpn = "alpn",
    Handshake BadMessage = "bad_message",
    Handshake HandshakeOther = "other",

    Request UnknownService = "unknown_service",
    Request BadRequest = "bad_request",
    Request NoHealthyTarget = "no_healthy_target",
    Request UpstreamError = "upstream_error",
    Request Deadline = "deadline",
    Request Draining = "draining",
    Request Format = "format",
    Request Size = "size",
    Request Encoding = "encoding",
    Request Loop = "loop",
    Request RateLimited = "rate_limited",
    Request Overloaded = "overloaded",
    Request Schema = "schema",
    Request Denied = "denied",
    Request Misdirected = "misdirected",
    /// No body bytes moved either way for `stream_idle_timeout` (also after the answer began).
    Request StreamIdle = "stream_idle_timeout",
    /// Holding it would pass a memory budget (also after the answer began).
    Request Memory = "memory",

    /// The service's answer ended before its declared length.
    Late Truncated = "truncated",
    /// The service reset its answer.
    Late UpstreamReset = "upstream_reset",
    /// An answer's message did not match its schema (`validate_responses`).
    Late ResponseSchema = "response_schema",
}

impl Reason {
    /// A refusal of a message's content: counted per method as well
    /// (`fedport_messages_rejected_total`).
    pub const fn of_message(self) -> bool {
        matches!(
            self,
            Reason::Format | Reason::Encoding | Reason::Size | Reason::Schema
        )
    }

    /// A peer that refused a request for this reason did not give it to any service,
    /// and another node may take it: it may go on elsewhere whatever its method.
    pub const fn elsewhere_may_serve(self) -> bool {
        matches!(
            self,
            Reason::NoHealthyTarget | Reason::Draining | Reason::Loop
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for Reason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// A gRPC status code (`google.rpc.Code`), all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

const CODES: [(GrpcCode, &str, &str); 17] = [
    (GrpcCode::Ok, "0", "OK"),
    (GrpcCode::Cancelled, "1", "CANCELLED"),
    (GrpcCode::Unknown, "2", "UNKNOWN"),
    (GrpcCode::InvalidArgument, "3", "INVALID_ARGUMENT"),
    (GrpcCode::DeadlineExceeded, "4", "DEADLINE_EXCEEDED"),
    (GrpcCode::NotFound, "5", "NOT_FOUND"),
    (GrpcCode::AlreadyExists, "6", "ALREADY_EXISTS"),
    (GrpcCode::PermissionDenied, "7", "PERMISSION_DENIED"),
    (GrpcCode::ResourceExhausted, "8", "RESOURCE_EXHAUSTED"),
    (GrpcCode::FailedPrecondition, "9", "FAILED_PRECONDITION"),
    (GrpcCode::Aborted, "10", "ABORTED"),
    (GrpcCode::OutOfRange, "11", "OUT_OF_RANGE"),
    (GrpcCode::Unimplemented, "12", "UNIMPLEMENTED"),
    (GrpcCode::Internal, "13", "INTERNAL"),
    (GrpcCode::Unavailable, "14", "UNAVAILABLE"),
    (GrpcCode::DataLoss, "15", "DATA_LOSS"),
    (GrpcCode::Unauthenticated, "16", "UNAUTHENTICATED"),
];

impl GrpcCode {
    /// The number as the `grpc-status` header carries it.
    pub const fn as_str(self) -> &'static str {
        CODES[self as usize].1
    }

    /// The code's name (`UNAVAILABLE`).
    pub const fn name(self) -> &'static str {
        CODES[self as usize].2
    }

    /// The code a `grpc-status` value names, read strictly: a canonical number 0–16
    /// (no sign, no leading zero, no space).
    pub fn parse(s: &[u8]) -> Option<GrpcCode> {
        CODES.iter().find(|c| c.1.as_bytes() == s).map(|c| c.0)
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `grpc-status` an answer carries, as far as it has been seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcStatus {
    /// None yet (or none at all: the call ended without one).
    Absent,
    Code(GrpcCode),
    /// A value that is no code (`00`, `17`, `abc`).
    Invalid,
}

impl GrpcStatus {
    /// What a `grpc-status` header value says.
    pub fn of(value: &[u8]) -> GrpcStatus {
        match GrpcCode::parse(value) {
            Some(c) => GrpcStatus::Code(c),
            None if value.is_empty() => GrpcStatus::Absent,
            None => GrpcStatus::Invalid,
        }
    }

    /// The bounded label value: the code's name, `NONE` or `INVALID`.
    pub fn label(self) -> &'static str {
        match self {
            GrpcStatus::Code(c) => c.name(),
            GrpcStatus::Absent => "NONE",
            GrpcStatus::Invalid => "INVALID",
        }
    }

    /// The number as it is logged (empty when absent, `?` when invalid).
    pub fn number(self) -> &'static str {
        match self {
            GrpcStatus::Code(c) => c.as_str(),
            GrpcStatus::Absent => "",
            GrpcStatus::Invalid => "?",
        }
    }

    /// A small key that differs for every label.
    pub fn key(self) -> u32 {
        match self {
            GrpcStatus::Code(c) => c as u32,
            GrpcStatus::Absent => 17,
            GrpcStatus::Invalid => 18,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_label_and_reads_back() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{r:?} twice");
            assert_eq!(Reason::parse(r.as_str().as_bytes()), Some(*r));
        }
        assert_eq!(Reason::parse(b"Denied"), None);
    }

    #[test]
    fn every_reason_is_in_the_monitoring_docs_table() {
        let docs = include_str!("../docs/monitoring.md");
        let table = &docs[docs.find("## Reasons").expect("a Reasons section")..];
        for r in Reason::ALL {
            let kind = format!("{:?}", r.kind()).to_lowercase();
            let row = format!("| `{}` | {kind} |", r.as_str());
            assert!(table.contains(&row), "docs/monitoring.md has no row {row}");
        }
    }

    #[test]
    fn every_reason_is_in_the_readmes_refusal_table() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## What a caller sees when refused")
            .expect("a refusal section");
        let table = &readme[start..];
        let table = &table[..table.find("\n\n## ").unwrap_or(table.len())];
        for r in Reason::ALL {
            let cell = format!("`{}`", r.as_str());
            let in_first_column = table
                .lines()
                .filter(|l| l.starts_with("| `"))
                .any(|l| l.split(" | ").next().is_some_and(|c| c.contains(&cell)));
            assert!(
                in_first_column,
                "README.md's refusal table has no row for {cell}"
            );
        }
    }

    #[test]
    fn grpc_codes_are_read_strictly() {
        for (i, c) in CODES.iter().enumerate() {
            assert_eq!(c.0 as usize, i);
            assert_eq!(GrpcCode::parse(c.1.as_bytes()), Some(c.0));
        }
        assert_eq!(
            GrpcStatus::of(b"16"),
            GrpcStatus::Code(GrpcCode::Unauthenticated)
        );
        for odd in ["00", "+0", "-1", "017", "17", "abc", " 0", "0 "] {
            assert_eq!(GrpcStatus::of(odd.as_bytes()), GrpcStatus::Invalid, "{odd}");
        }
        assert_eq!(GrpcStatus::of(b"").label(), "NONE");
    }
}
