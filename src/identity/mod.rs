//! Certificates → identity: loads the node's certificate, key and federation CA, builds
//! the TLS 1.3 server and client configurations, and reads a verified peer's identity
//! (SPIFFE URI SAN, else DNS SAN) from its certificate. Which CA may vouch for which
//! identity is `domains`' (one bundle per trust domain).

pub mod bundle;
pub mod domains;
pub mod pki;
pub mod rotate;

use http::HeaderValue;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, String),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key")]
    NoKey(PathBuf),
    #[error("{0}: certificate cannot be parsed: {1}")]
    BadCertificate(PathBuf, String),
    #[error("{0}: certificate expired on {1}")]
    Expired(PathBuf, String),
    #[error("{0}: certificate is not valid before {1}")]
    NotYetValid(PathBuf, String),
    #[error("private key {0} does not match certificate {1}")]
    KeyMismatch(PathBuf, PathBuf),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// The crypto provider fedport uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Paths of the node's TLS material, already resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes =
        std::fs::read(path).map_err(|e| IdentityError::Read(path.to_owned(), e.to_string()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::BadCertificate(path.to_owned(), e.to_string()))?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let bytes =
        std::fs::read(path).map_err(|e| IdentityError::Read(path.to_owned(), e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| IdentityError::NoKey(path.to_owned()))
}

/// Validity window of a certificate, as (not_before, not_after).
pub fn validity(
    der: &CertificateDer<'_>,
    path: &Path,
) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::BadCertificate(path.to_owned(), e.to_string()))?;
    let v = cert.validity();
    let to_sys = |t: &x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((to_sys(&v.not_before), to_sys(&v.not_after)))
}

/// Checks that a certificate file is readable, parsable and valid now.
/// Returns the certificates and the end entity's `not_after`.
pub fn check_cert_file(
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, SystemTime), IdentityError> {
    let certs = load_certs(path)?;
    let (nb, na) = validity(&certs[0], path)?;
    let now = SystemTime::now();
    if na < now {
        return Err(IdentityError::Expired(path.to_owned(), fmt_time(na)));
    }
    if nb > now {
        return Err(IdentityError::NotYetValid(path.to_owned(), fmt_time(nb)));
    }
    Ok((certs, na))
}

fn fmt_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|d| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                d.year(),
                d.month() as u8,
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        })
        .unwrap_or_else(|_| secs.to_string())
}

/// Loads the node's certificate chain and key and proves that they belong together.
pub fn load_certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, IdentityError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let ck = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            IdentityError::KeyMismatch(files.key.clone(), files.cert.clone())
        }
        other => IdentityError::Tls(format!("{}: {other}", files.key.display())),
    })?;
    Ok(Arc::new(ck))
}

/// The CRLs in a PEM file.
pub fn load_crls(
    path: &Path,
) -> Result<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>, IdentityError> {
    let bytes =
        std::fs::read(path).map_err(|e| IdentityError::Read(path.to_owned(), e.to_string()))?;
    let crls: Vec<_> = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::BadCertificate(path.to_owned(), e.to_string()))?;
    if crls.is_empty() {
        return Err(IdentityError::BadCertificate(
            path.to_owned(),
            "no PEM X509 CRL".into(),
        ));
    }
    Ok(crls)
}

use domains::roots;

/// TLS 1.3 (and, if allowed, TLS 1.2 with ring's suites, all AEAD with ECDHE), client
/// certificate required and verified against the bundle of its identity's trust domain.
pub fn server_config(
    files: &TlsFiles,
    alpn: &[&[u8]],
    allow_tls12: bool,
    crl: Option<&Path>,
    trust_domains: &[domains::DomainSpec],
) -> Result<Arc<ServerConfig>, IdentityError> {
    // each identity's certificate must chain to the bundle of the trust domain it names
    let verifier = Arc::new(domains::DomainVerifier::load(
        domains::own_domain(&files.cert),
        &files.ca,
        crl,
        trust_domains,
    )?);
    let versions: &[&rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let provider = provider();
    let ck = load_certified_key(files)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(ck)));
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Client side of the federation: verifies servers against the federation CA and
/// presents the node's own certificate.
pub fn client_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, IdentityError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs, key)
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Client side of a connection to a peer node: the peer's certificate must chain to the
/// federation CA and carry exactly the peer's configured `identity` (not merely a name
/// matching the address dialled); the node presents its own certificate.
pub fn peer_client_config(
    files: &TlsFiles,
    identity: &str,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, IdentityError> {
    PeerTls::load(files, None, &[])?.config(identity, alpn)
}

/// What every connection to a peer shares: this node's certificate and key, and the
/// federation CA. Loaded once per configuration, not once per peer: with a registry of
/// a thousand members, per-peer copies cost seconds of file parsing and ~90 KiB each.
#[derive(Debug, Clone)]
pub struct PeerTls {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    /// With `[tls] crl`: the federation CA's checks, revocation included, that a
    /// peer's certificate must pass as a caller's does.
    revocation: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    /// One TLS session cache for every peer (each config would otherwise allocate its
    /// own 256 entries up front).
    sessions: Arc<rustls::client::ClientSessionMemoryCache>,
    /// The node's own trust domain, and every other domain's bundle and CRL checks: a
    /// peer's certificate must chain to the bundle of the domain its identity names.
    own: Option<String>,
    specs: Vec<domains::DomainSpec>,
    others: Vec<Result<PeerDomain, String>>,
}

#[derive(Debug, Clone)]
struct PeerDomain {
    roots: Arc<RootCertStore>,
    revocation: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

/// A bundle's server-side checks with its CRL, for peers this node dials.
fn revocation(
    roots: &Arc<RootCertStore>,
    crl: Option<&Path>,
) -> Result<Option<Arc<rustls::client::WebPkiServerVerifier>>, IdentityError> {
    let Some(path) = crl else { return Ok(None) };
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(load_crls(path)?)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map(Some)
        .map_err(|e| IdentityError::Tls(e.to_string()))
}

#[derive(Debug)]
struct OwnCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl PeerTls {
    pub fn load(
        files: &TlsFiles,
        crl: Option<&Path>,
        trust_domains: &[domains::DomainSpec],
    ) -> Result<Self, IdentityError> {
        let roots = roots(&files.ca)?;
        let revocation = revocation(&roots, crl)?;
        // a domain whose files do not load is refused (its peers are not dialled), as
        // its callers are, and holds up nothing else
        let others = trust_domains
            .iter()
            .map(|d| {
                let loaded = domains::authority_roots(&d.authorities).and_then(|roots| {
                    Ok(PeerDomain {
                        revocation: self::revocation(&roots, d.crl.as_deref())?,
                        roots,
                    })
                });
                loaded.map_err(|e| format!("trust domain {:?}'s bundle does not load: {e}", d.name))
            })
            .collect();
        Ok(Self {
            key: load_certified_key(files)?,
            roots,
            revocation,
            sessions: Arc::new(rustls::client::ClientSessionMemoryCache::new(1024)),
            own: domains::own_domain(&files.cert),
            specs: trust_domains.to_vec(),
            others,
        })
    }

    /// TLS 1.3 to one peer, which must present `identity`.
    pub fn config(
        &self,
        identity: &str,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        // the bundle of the domain the peer's identity names (the rule callers are
        // verified by); none: the peer is refused at every handshake, and logged
        let refuse = |why: &str| {
            tracing::error!(
                peer_identity = identity,
                why,
                "no bundle vouches for this peer: it is not dialled"
            );
            (Arc::new(RootCertStore::empty()), None)
        };
        let (roots, revocation) =
            match domains::bundle_for(self.own.as_deref(), &self.specs, identity) {
                domains::Bundle::Own => (self.roots.clone(), self.revocation.clone()),
                domains::Bundle::Other(i) => match &self.others[i] {
                    Ok(d) => (d.roots.clone(), d.revocation.clone()),
                    Err(why) => refuse(why),
                },
                domains::Bundle::Refused(why) => refuse(&why),
            };
        let verifier = Arc::new(PeerVerifier {
            roots,
            revocation,
            identity: identity.to_owned(),
            algs: provider().signature_verification_algorithms,
        });
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(OwnCert(self.key.clone())));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg.resumption = rustls::client::Resumption::store(self.sessions.clone());
        Ok(Arc::new(cfg))
    }
}

/// Verifies a peer node: chain to the federation CA (rustls' own path building), then
/// the identity the certificate carries against the one configured for the peer.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    revocation: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    identity: String,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match &self.revocation {
            // chain and CRL; the name dialled is not what a peer is checked by (its
            // identity is, below), so only a name mismatch is let pass
            Some(v) => {
                match v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                    Ok(_)
                    | Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. },
                    )) => {}
                    Err(e) => return Err(e),
                }
            }
            None => {
                let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    &self.roots,
                    intermediates,
                    now,
                    self.algs.all,
                )?;
            }
        }
        match identity_of(end_entity) {
            Some(id) if id == self.identity => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            other => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(IdentityError::Tls(
                    format!(
                        "peer certificate carries identity {:?}, expected {:?}",
                        other.unwrap_or_default(),
                        self.identity
                    ),
                )))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The identity a verified certificate carries: its `spiffe://` URI SAN (scheme in
/// any case, written lower-case), else its first DNS SAN that is a host name
/// (lower-case, without a trailing dot). `None` — no identity, refused — when it has
/// neither, when it has more than one SPIFFE ID (SPIFFE allows exactly one; which would
/// be meant?), when its SPIFFE ID is outside the SPIFFE grammar, or when the name is
/// `local`, which stands for the local listener's callers in rules.
/// The DNS names a certificate's SAN lists, lower-case, as written (wildcards too).
pub fn dns_sans(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

pub fn identity_of(der: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let mut spiffe = names.iter().filter_map(|n| match n {
        GeneralName::URI(u)
            if u.get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")) =>
        {
            Some(format!("spiffe://{}", &u[9..]))
        }
        _ => None,
    });
    let id = match (spiffe.next(), spiffe.next()) {
        (Some(_), Some(_)) => return None,
        // a SPIFFE ID outside the SPIFFE grammar (upper case in the trust domain, empty
        // or dot segments, a query) is no identity: patterns could not read it as meant
        (Some(one), None) => one,
        // a DNS name that is not a host name (a wildcard, a URI spelled as a DNS SAN)
        // is skipped: `spiffe://…` in a DNS SAN must never pass for a SPIFFE ID
        (None, _) => names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => {
                let d = d.strip_suffix('.').unwrap_or(d).to_ascii_lowercase();
                crate::grammar::pattern::is_identity(&d)
                    .then_some(d)
                    .filter(|d| !d.starts_with("spiffe://"))
            }
            _ => None,
        })?,
    };
    crate::grammar::pattern::is_identity(&id).then_some(id)
}

/// The earliest `notAfter` (Unix seconds) among the certificates of a PEM file.
pub fn earliest_expiry(path: &Path) -> Option<i64> {
    load_certs(path)
        .ok()?
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
}

/// The identity as the `fed-peer` header value; `None` if it is not a valid header value.
pub fn identity_header(der: &CertificateDer<'_>) -> Option<HeaderValue> {
    identity_of(der).and_then(|s| HeaderValue::from_str(&s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    fn uri(u: &str) -> SanType {
        SanType::URI(u.try_into().unwrap())
    }

    fn dns(d: &str) -> SanType {
        SanType::DnsName(d.try_into().unwrap())
    }

    #[test]
    fn one_identity_or_none() {
        let id = |sans| identity_of(&cert(sans));
        assert_eq!(
            id(vec![dns("n.example"), uri("spiffe://fed/node/a")]).as_deref(),
            Some("spiffe://fed/node/a"),
            "the SPIFFE ID wins over a DNS name"
        );
        assert_eq!(
            id(vec![uri("SPIFFE://fed/node/a")]).as_deref(),
            Some("spiffe://fed/node/a")
        );
        assert_eq!(
            id(vec![
                uri("spiffe://fed/node/a"),
                uri("spiffe://fed/tenant/x")
            ]),
            None,
            "two SPIFFE IDs: which would be meant?"
        );
        assert_eq!(
            id(vec![dns("local")]),
            None,
            "local is the local listener's"
        );
        assert_eq!(id(vec![dns("LOCAL.")]), None);
        assert_eq!(
            id(vec![dns("Node.Example.")]).as_deref(),
            Some("node.example")
        );
        assert_eq!(id(vec![uri("https://x")]), None);
        // each kind by its own grammar
        assert_eq!(
            id(vec![dns("spiffe://fed/node/b")]),
            None,
            "a URI in a DNS SAN"
        );
        assert_eq!(
            id(vec![dns("*.fed.example"), dns("b.fed.example")]).as_deref(),
            Some("b.fed.example"),
            "a wildcard is no identity; the next DNS name is"
        );
        assert_eq!(id(vec![uri("spiffe://Fed/node/a")]), None);
        assert_eq!(id(vec![uri("spiffe://fed/node/../admin")]), None);
        assert_eq!(id(vec![uri("spiffe://fed//admin")]), None);
    }
}
