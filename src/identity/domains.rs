//! Trust domains: each SPIFFE trust domain is bound to its own CA bundle (and CRL), so
//! that one organisation's CA cannot vouch for another's identities. The node's own
//! domain, the one its certificate's SPIFFE ID names, has `[tls] ca`; each
//! `[[trust_domain]]` brings its own. A certificate is verified against the bundle of
//! the domain its SPIFFE ID names; a DNS-SAN identity against the node's own bundle,
//! unless a trust domain lists the name among those it may vouch for.

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
    /// Its CA bundle (PEM).
    pub ca: PathBuf,
    pub crl: Option<PathBuf>,
    /// DNS-SAN identities this domain may vouch for: exact names, or `*.suffix`.
    pub dns_names: Vec<String>,
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
fn vouches_for(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(suffix) => name.strip_suffix(suffix).is_some_and(|head| {
            head.len() > 1 && head.ends_with('.') && !head[..head.len() - 1].contains('.')
        }),
        None => p == name,
    })
}

pub(super) fn roots(ca: &Path) -> Result<Arc<RootCertStore>, IdentityError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
        store
            .add(c)
            .map_err(|e| IdentityError::BadCertificate(ca.to_owned(), e.to_string()))?;
    }
    Ok(Arc::new(store))
}

/// A client verifier for one bundle (and its CRL).
fn verifier(ca: &Path, crl: Option<&Path>) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider());
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

/// One domain's loaded verifier.
struct Domain {
    name: String,
    verifier: Arc<dyn ClientCertVerifier>,
    dns_names: Vec<String>,
    /// What it was loaded from: a rotation keeps it only for the same domain and files.
    spec: DomainSpec,
}

/// Verifies a caller's certificate against the bundle of the trust domain its identity
/// names.
pub struct DomainVerifier {
    /// The node's own domain (`None` when its certificate carries no SPIFFE ID: then
    /// `[tls] ca` vouches for every domain no `[[trust_domain]]` names, as before trust
    /// domains existed).
    own: Option<String>,
    /// `[tls] ca` (and `[tls] crl`).
    own_verifier: Arc<dyn ClientCertVerifier>,
    others: Vec<Domain>,
    hints: Vec<DistinguishedName>,
}

impl std::fmt::Debug for DomainVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainVerifier")
            .field("own", &self.own)
            .field(
                "others",
                &self.others.iter().map(|d| &d.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl DomainVerifier {
    /// Loads every bundle. With `previous` (a rotation), a domain whose files no longer
    /// load keeps the bundle it had, so that one organisation's broken file neither
    /// stops another's rotation nor locks its own callers out; the node's own bundle
    /// must load.
    pub fn load(
        own: Option<String>,
        ca: &Path,
        crl: Option<&Path>,
        domains: &[DomainSpec],
        previous: Option<&DomainVerifier>,
    ) -> Result<Self, IdentityError> {
        let own_verifier = verifier(ca, crl)?;
        let mut hints = own_verifier.root_hint_subjects().to_vec();
        let mut others = Vec::new();
        for d in domains {
            let kept = previous.and_then(|p| p.others.iter().find(|o| o.spec == *d));
            let v = match (verifier(&d.ca, d.crl.as_deref()), kept) {
                (Ok(v), _) => v,
                (Err(e), Some(k)) => {
                    tracing::warn!(trust_domain = %d.name, error = %e, "trust domain's new files refused; its previous bundle keeps serving");
                    k.verifier.clone()
                }
                (Err(e), None) => return Err(e),
            };
            hints.extend(v.root_hint_subjects().iter().cloned());
            others.push(Domain {
                name: d.name.clone(),
                verifier: v,
                dns_names: d.dns_names.clone(),
                spec: d.clone(),
            });
        }
        Ok(Self {
            own,
            own_verifier,
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
        match domain_of(id) {
            Some(domain) => {
                if let Some(d) = self.others.iter().find(|d| d.name == domain) {
                    return Ok(&d.verifier);
                }
                match &self.own {
                    Some(own) if own != domain => Err(format!(
                        "{id} names trust domain {domain:?}, for which this node has no bundle"
                    )),
                    _ => Ok(&self.own_verifier),
                }
            }
            None => Ok(self
                .others
                .iter()
                .find(|d| vouches_for(&d.dns_names, id))
                .map_or(&self.own_verifier, |d| &d.verifier)),
        }
    }

    fn all(&self) -> impl Iterator<Item = &Arc<dyn ClientCertVerifier>> {
        std::iter::once(&self.own_verifier).chain(self.others.iter().map(|d| &d.verifier))
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
            )) if id.is_some()
                && self
                    .all()
                    .filter(|o| !Arc::ptr_eq(o, v))
                    .any(|o| o.verify_client_cert(end_entity, intermediates, now).is_ok()) =>
            {
                Err(refused(format!(
                    "{} is signed by another trust domain's CA than the one its identity names",
                    id.unwrap_or_default()
                )))
            }
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
    fn the_domain_is_the_spiffe_ids_authority() {
        assert_eq!(domain_of("spiffe://b.example/node/x"), Some("b.example"));
        assert_eq!(domain_of("spiffe://b.example"), Some("b.example"));
        assert_eq!(domain_of("db.b.example"), None);
    }
}
