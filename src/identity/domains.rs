//! Trust domains: each SPIFFE trust domain is bound to its own CA bundle (and CRL), so
//! that one organisation's CA cannot vouch for another's identities. The node's own
//! domain, the one its certificate's SPIFFE ID names, has `[tls] ca`; each
//! `[[trust_domain]]` brings its own. A certificate is verified against the bundle of
//! the domain its SPIFFE ID names; a DNS-SAN identity against the node's own bundle,
//! unless a trust domain lists the name among those it may vouch for.

use super::bundle::Authorities;
use super::{load_certs, load_crls, provider, IdentityError};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One `[[trust_domain]]` as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// The SPIFFE trust domain, e.g. `b.example`.
    pub name: String,
    /// Its CA certificates: `ca` (PEM) or `bundle` (SPIFFE bundle).
    pub authorities: Authorities,
    pub crl: Option<PathBuf>,
    /// DNS-SAN identities this domain may vouch for: exact names, or `*.suffix`.
    pub dns_names: Vec<String>,
    /// Where its bundle is fetched from, kept in the `bundle` file.
    pub endpoint: Option<BundleEndpoint>,
}

/// `bundle_endpoint = { url, profile, spiffe_id }` of the SPIFFE federation
/// specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpoint {
    pub url: String,
    pub profile: Profile,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// `https_web`: the endpoint's certificate is checked against the system's roots
    /// and the URL's host name.
    Web,
    /// `https_spiffe`: the endpoint presents this SPIFFE ID, verified against the bundle
    /// of its trust domain (for a domain serving its own, the bundle last fetched).
    Spiffe(String),
}

impl Profile {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Web => "https_web",
            Self::Spiffe(_) => "https_spiffe",
        }
    }
}

/// A handshake refused because the certificate does not chain to the bundle of the
/// trust domain its identity names (or names a domain this node has no bundle for).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TrustDomainError(pub String);

/// The trust domain a SPIFFE ID names, lower-case as `identity_of` gives it.
pub fn domain_of(identity: &str) -> Option<&str> {
    let rest = identity.strip_prefix("spiffe://")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The trust domain a node certificate's SPIFFE ID names, if it carries one.
pub fn own_domain(cert: &Path) -> Option<String> {
    let der = load_certs(cert).ok()?.into_iter().next()?;
    let id = super::identity_of(&der)?;
    domain_of(&id).map(str::to_owned)
}

/// Whether `name` is among the DNS names a domain may vouch for.
pub fn vouches_for(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(suffix) => name.strip_suffix(suffix).is_some_and(|head| {
            head.len() > 1 && head.ends_with('.') && !head[..head.len() - 1].contains('.')
        }),
        None => p == name,
    })
}

/// Which bundle vouches for an identity: the node's own (`[tls] ca`), the `i`th
/// `[[trust_domain]]`'s, or none (refused, and why). One rule for callers and for peers
/// this node dials.
#[derive(Debug, PartialEq, Eq)]
pub enum Bundle {
    Own,
    Other(usize),
    Refused(String),
}

pub fn bundle_for(own: Option<&str>, domains: &[DomainSpec], identity: &str) -> Bundle {
    match domain_of(identity) {
        Some(d) => {
            // `b.example.` is another domain than `b.example` to a comparison, and the
            // same to whoever reads it later: no bundle vouches for such a spelling
            if d.is_empty() || d.split('.').any(str::is_empty) {
                return Bundle::Refused(format!("{identity} names a malformed trust domain"));
            }
            if let Some(i) = domains.iter().position(|x| x.name == d) {
                return Bundle::Other(i);
            }
            match own {
                Some(o) if o != d => Bundle::Refused(format!(
                    "{identity} names trust domain {d:?}, for which this node has no bundle"
                )),
                _ => Bundle::Own,
            }
        }
        None => domains
            .iter()
            .position(|x| vouches_for(&x.dns_names, identity))
            .map_or(Bundle::Own, Bundle::Other),
    }
}

/// Whether two DNS-name lists overlap: a name, or a name one wildcard covers.
pub fn dns_overlap<'a>(a: &'a [String], b: &[String]) -> Option<&'a String> {
    a.iter().find(|x| {
        b.contains(x)
            || vouches_for(b, x)
            || b.iter().any(|y| vouches_for(std::slice::from_ref(*x), y))
            || x.strip_prefix("*.")
                .is_some_and(|xs| b.iter().any(|y| y.strip_prefix("*.") == Some(xs)))
    })
}

pub(super) fn roots(ca: &Path) -> Result<Arc<RootCertStore>, IdentityError> {
    store(ca, load_certs(ca)?)
}

/// The roots of a domain's authorities, wherever they come from.
pub(super) fn authority_roots(a: &Authorities) -> Result<Arc<RootCertStore>, IdentityError> {
    store(a.path(), a.load()?)
}

fn store(
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<Arc<RootCertStore>, IdentityError> {
    let mut store = RootCertStore::empty();
    for c in certs {
        store
            .add(c)
            .map_err(|e| IdentityError::BadCertificate(path.to_owned(), e.to_string()))?;
    }
    Ok(Arc::new(store))
}

/// A client verifier for one bundle (and its CRL).
fn verifier(
    roots: Arc<RootCertStore>,
    crl: Option<&Path>,
) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if let Some(path) = crl {
        // a leaf whose issuer has no CRL here is not refused for that: with two CAs in
        // the bundle (a rotation) or leaves from an intermediate, a CRL of one issuer
        // must not lock out every certificate of the other
        builder = builder
            .with_crls(load_crls(path)?)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    builder
        .build()
        .map_err(|e| IdentityError::Tls(e.to_string()))
}

/// The CA names a certificate request may carry, all bundles together.
const MAX_HINT_BYTES: usize = 48 << 10;

/// One domain's loaded verifier, or why its files do not load (then its identities
/// are refused: a bundle or CRL that no longer loads must not leave an older one, which
/// may still admit what was since revoked, vouching for them).
type Domain = Result<Arc<dyn ClientCertVerifier>, String>;

/// Verifies a caller's certificate against the bundle of the trust domain its identity
/// names.
pub struct DomainVerifier {
    /// The node's own domain (`None` when its certificate carries no SPIFFE ID: then
    /// `[tls] ca` vouches for every domain no `[[trust_domain]]` names, as before trust
    /// domains existed).
    own: Option<String>,
    /// `[tls] ca` (and `[tls] crl`).
    own_verifier: Arc<dyn ClientCertVerifier>,
    specs: Vec<DomainSpec>,
    others: Vec<Domain>,
    hints: Vec<DistinguishedName>,
}

impl std::fmt::Debug for DomainVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainVerifier")
            .field("own", &self.own)
            .field(
                "others",
                &self.specs.iter().map(|d| &d.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DomainVerifier {
    /// Loads every bundle. The node's own must load; another domain whose files do not
    /// load is refused (logged at error level, its identities failing the handshake as
    /// `trust_domain`), and holds up neither the others nor a reload.
    pub fn load(
        own: Option<String>,
        ca: &Path,
        crl: Option<&Path>,
        domains: &[DomainSpec],
    ) -> Result<Self, IdentityError> {
        let own_verifier = verifier(roots(ca)?, crl)?;
        let mut hints = own_verifier.root_hint_subjects().to_vec();
        let mut others = Vec::new();
        for d in domains {
            let domain = authority_roots(&d.authorities)
                .and_then(|r| verifier(r, d.crl.as_deref()))
                .map_err(|e| {
                tracing::error!(trust_domain = %d.name, error = %e, "trust domain's files do not load: its identities are refused until they do");
                format!("trust domain {:?}'s bundle does not load: {e}", d.name)
            });
            if let Ok(v) = &domain {
                hints.extend(v.root_hint_subjects().iter().cloned());
            }
            others.push(domain);
        }
        // TLS bounds a certificate request's list of CA names at 64 KiB: past a safe
        // share of it, none is sent (a client then offers its certificate unhinted)
        let bytes: usize = hints.iter().map(|h| h.as_ref().len() + 2).sum();
        if bytes > MAX_HINT_BYTES {
            tracing::warn!(bytes, "the trust domains' CA names are too long to send in a certificate request: none is sent");
            hints.clear();
        }
        Ok(Self {
            own,
            own_verifier,
            specs: domains.to_vec(),
            others,
            hints,
        })
    }

    /// The verifier for a certificate's identity, or why there is none.
    fn for_identity(&self, id: Option<&str>) -> Result<&Arc<dyn ClientCertVerifier>, String> {
        let Some(id) = id else {
            // no identity: verified as before, refused after the handshake
            return Ok(&self.own_verifier);
        };
        match bundle_for(self.own.as_deref(), &self.specs, id) {
            Bundle::Own => Ok(&self.own_verifier),
            Bundle::Other(i) => self.others[i].as_ref().map_err(Clone::clone),
            Bundle::Refused(why) => Err(why),
        }
    }

    /// Whether a certificate that its identity's bundle refused was issued by the CA of
    /// another bundle here: compared by name, not verified again (a stranger's chain
    /// must cost one verification, not one per domain).
    fn issued_by_another(
        &self,
        end_entity: &CertificateDer<'_>,
        chosen: &Arc<dyn ClientCertVerifier>,
    ) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(end_entity) else {
            return false;
        };
        let issuer = cert.tbs_certificate.issuer.as_raw();
        let own = (!Arc::ptr_eq(chosen, &self.own_verifier))
            .then(|| self.own_verifier.root_hint_subjects())
            .into_iter()
            .flatten();
        let others = self
            .others
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .filter(|v| !Arc::ptr_eq(v, chosen))
            .flat_map(|v| v.root_hint_subjects());
        own.chain(others).any(|dn| dn.as_ref() == issuer)
    }
}

fn refused(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(TrustDomainError(why)),
    )))
}

impl ClientCertVerifier for DomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = super::identity_of(end_entity);
        let v = self.for_identity(id.as_deref()).map_err(refused)?;
        match v.verify_client_cert(end_entity, intermediates, now) {
            Ok(ok) => Ok(ok),
            // signed by a CA of another domain: say so (a certificate one organisation
            // issued in another's name), not merely "unknown issuer"
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
            )) if id.is_some() && self.issued_by_another(end_entity, v) => Err(refused(format!(
                "{} is signed by another trust domain's CA than the one its identity names",
                id.unwrap_or_default()
            ))),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.own_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.own_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.own_verifier.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_vouches_only_for_the_names_it_lists() {
        let p = vec!["db.b.example".to_owned(), "*.svc.b.example".to_owned()];
        assert!(vouches_for(&p, "db.b.example"));
        assert!(vouches_for(&p, "api.svc.b.example"));
        assert!(!vouches_for(&p, "svc.b.example"));
        assert!(!vouches_for(&p, "a.api.svc.b.example"));
        assert!(!vouches_for(&p, "evilsvc.b.example"));
        assert!(!vouches_for(&p, "db.b.example.evil"));
    }

    #[test]
    fn callers_and_peers_find_their_bundle_by_one_rule() {
        let b = DomainSpec {
            name: "b.example".into(),
            authorities: Authorities::Pem("b.pem".into()),
            crl: None,
            dns_names: vec!["db.b.example".into()],
            endpoint: None,
        };
        let d = std::slice::from_ref(&b);
        let own = Some("fed.test");
        assert_eq!(bundle_for(own, d, "spiffe://fed.test/x"), Bundle::Own);
        assert_eq!(bundle_for(own, d, "spiffe://b.example/x"), Bundle::Other(0));
        // a DNS identity a domain vouches for is that domain's, a peer's as a caller's
        assert_eq!(bundle_for(own, d, "db.b.example"), Bundle::Other(0));
        assert_eq!(bundle_for(own, d, "api.fed.test"), Bundle::Own);
        for refused in [
            "spiffe://c.example/x",
            "spiffe://b.example./x",
            "spiffe://b..example/x",
        ] {
            assert!(
                matches!(bundle_for(own, d, refused), Bundle::Refused(_)),
                "{refused}"
            );
        }
        // a node with no SPIFFE ID of its own: [tls] ca for the domains none names
        assert_eq!(bundle_for(None, d, "spiffe://c.example/x"), Bundle::Own);
        assert!(matches!(
            bundle_for(None, d, "spiffe://c.example./x"),
            Bundle::Refused(_)
        ));
    }

    #[test]
    fn dns_names_overlap_through_wildcards() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(dns_overlap(&v(&["a.svc.x"]), &v(&["*.svc.x"])).is_some());
        assert!(dns_overlap(&v(&["*.svc.x"]), &v(&["a.svc.x"])).is_some());
        assert!(dns_overlap(&v(&["*.svc.x"]), &v(&["*.svc.x"])).is_some());
        assert!(dns_overlap(&v(&["*.svc.x"]), &v(&["*.other.x", "svc.x"])).is_none());
    }

    #[test]
    fn the_domain_is_the_spiffe_ids_authority() {
        assert_eq!(domain_of("spiffe://b.example/node/x"), Some("b.example"));
        assert_eq!(domain_of("spiffe://b.example"), Some("b.example"));
        assert_eq!(domain_of("db.b.example"), None);
    }
}
