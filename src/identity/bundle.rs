//! SPIFFE trust bundles: the JWKS document of the SPIFFE Trust Domain and Bundle
//! specification, read (each `use = "x509-svid"` key's `x5c` CA certificate, others
//! ignored) and written (one key per CA certificate, with `kty` and its public
//! parameters, `x5c`, no `kid`), with `spiffe_sequence` and `spiffe_refresh_hint`.
//! Where the authorities of a trust domain come from (a PEM file or a bundle file) is
//! `Authorities`'.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// At most this many X.509 authorities in one bundle: a bundle is a handful of CAs (a
/// rotation holds two or three); a larger one is refused rather than held.
pub const MAX_AUTHORITIES: usize = 64;
/// A bundle document larger than this is refused (a fetch stops reading at it).
pub const MAX_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("not a SPIFFE bundle (JSON object with \"keys\"): {0}")]
    Json(String),
    #[error("key {0}: x5c[0] is not base64 DER: {1}")]
    Base64(usize, String),
    #[error("key {0}: x5c[0] is not an X.509 certificate: {1}")]
    Certificate(usize, String),
    #[error("the bundle holds no x509-svid authority")]
    Empty,
    #[error("the bundle holds more than {MAX_AUTHORITIES} x509-svid authorities")]
    TooMany,
    #[error("the bundle is larger than {MAX_BYTES} bytes")]
    TooLarge,
    #[error("{0}: key type cannot be written as a JWK")]
    KeyType(String),
    #[error("the bundle's CA names come to more than {MAX_NAME_BYTES} bytes")]
    NamesTooLong,
    #[error("the bundle holds a CA that another bundle here holds (the node's own, or another domain's): refused")]
    Shared,
}

/// At most this many bytes of CA subject names in one bundle: they are sent in every
/// handshake's certificate request, whose list of them TLS bounds at 64 KiB for all
/// the domains together.
pub const MAX_NAME_BYTES: usize = 16 << 10;

/// A parsed bundle: its X.509 authorities and what it says of its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub authorities: Vec<CertificateDer<'static>>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<Duration>,
}

#[derive(serde::Deserialize)]
struct Doc {
    keys: Vec<Key>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(serde::Deserialize)]
struct Key {
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    x5c: Vec<String>,
}

/// Reads a bundle document. Keys of another use, and x509-svid keys without `x5c`,
/// are ignored, as the X509-SVID specification (§6.2) says; beyond the first `x5c`
/// value nothing is read.
pub fn parse(bytes: &[u8]) -> Result<Bundle, BundleError> {
    if bytes.len() > MAX_BYTES {
        return Err(BundleError::TooLarge);
    }
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| BundleError::Json(e.to_string()))?;
    let mut authorities = Vec::new();
    let mut names = 0;
    for (i, k) in doc.keys.iter().enumerate() {
        if k.usage.as_deref() != Some("x509-svid") {
            continue;
        }
        let Some(first) = k.x5c.first() else { continue };
        let der = STANDARD
            .decode(first)
            .map_err(|e| BundleError::Base64(i, e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| BundleError::Certificate(i, e.to_string()))?;
        names += cert.subject().as_raw().len();
        if names > MAX_NAME_BYTES {
            return Err(BundleError::NamesTooLong);
        }
        if authorities.len() == MAX_AUTHORITIES {
            return Err(BundleError::TooMany);
        }
        authorities.push(CertificateDer::from(der));
    }
    if authorities.is_empty() {
        return Err(BundleError::Empty);
    }
    Ok(Bundle {
        authorities,
        sequence: doc.spiffe_sequence,
        refresh_hint: doc.spiffe_refresh_hint.map(Duration::from_secs),
    })
}

/// The JWK of one CA certificate: its public key's parameters, `use`, and `x5c`.
fn jwk(der: &CertificateDer<'_>) -> Result<serde_json::Value, BundleError> {
    use x509_parser::oid_registry as oid;
    use x509_parser::public_key::PublicKey;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| BundleError::Certificate(0, e.to_string()))?;
    let spki = cert.public_key();
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let subject = cert.subject().to_string();
    let mut key = match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            let trim = |b: &[u8]| {
                let z = b.iter().take_while(|x| **x == 0).count();
                b[z.min(b.len().saturating_sub(1))..].to_vec()
            };
            serde_json::json!({"kty": "RSA", "n": b64(&trim(rsa.modulus)), "e": b64(&trim(rsa.exponent))})
        }
        Ok(PublicKey::EC(point)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let (crv, len) = match curve {
                Some(c) if c == oid::OID_EC_P256 => ("P-256", 32),
                Some(c) if c == oid::OID_NIST_EC_P384 => ("P-384", 48),
                Some(c) if c == oid::OID_NIST_EC_P521 => ("P-521", 66),
                _ => return Err(BundleError::KeyType(subject)),
            };
            let d = point.data();
            if d.len() != 1 + 2 * len || d[0] != 4 {
                return Err(BundleError::KeyType(subject));
            }
            serde_json::json!({"kty": "EC", "crv": crv, "x": b64(&d[1..1 + len]), "y": b64(&d[1 + len..])})
        }
        _ if spki.algorithm.algorithm == oid::OID_SIG_ED25519 => {
            serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&spki.subject_public_key.data)})
        }
        _ => return Err(BundleError::KeyType(subject)),
    };
    key["use"] = "x509-svid".into();
    key["x5c"] = serde_json::json!([STANDARD.encode(der.as_ref())]);
    Ok(key)
}

/// Writes a bundle document for `authorities` (one key each, no `kid`, as the
/// X509-SVID specification §6.1 says).
pub fn render(
    authorities: &[CertificateDer<'_>],
    sequence: u64,
    refresh_hint: Duration,
) -> Result<String, BundleError> {
    let keys = authorities.iter().map(jwk).collect::<Result<Vec<_>, _>>()?;
    let doc = serde_json::json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint.as_secs(),
    });
    Ok(serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n")
}

/// Where a trust domain's X.509 authorities come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorities {
    /// `ca = "…"`: a PEM bundle.
    Pem(PathBuf),
    /// `bundle = "…"`: a SPIFFE bundle (JWKS) file, perhaps kept by a fetch from the
    /// domain's `bundle_endpoint`.
    Spiffe(PathBuf),
}

impl Authorities {
    pub fn path(&self) -> &Path {
        match self {
            Self::Pem(p) | Self::Spiffe(p) => p,
        }
    }

    /// The CA certificates, read now.
    pub fn load(&self) -> Result<Vec<CertificateDer<'static>>, super::IdentityError> {
        match self {
            Self::Pem(p) => super::load_certs(p),
            Self::Spiffe(p) => {
                let bytes = std::fs::read(p)
                    .map_err(|e| super::IdentityError::Read(p.to_owned(), e.to_string()))?;
                parse(&bytes)
                    .map(|b| b.authorities)
                    .map_err(|e| super::IdentityError::BadCertificate(p.to_owned(), e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(alg: &'static rcgen::SignatureAlgorithm) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_rendered_bundle_reads_back_with_its_version() {
        let cas = [ca(&rcgen::PKCS_ECDSA_P256_SHA256), ca(&rcgen::PKCS_ED25519)];
        let doc = render(&cas, 7, Duration::from_secs(30)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["keys"][0]["kty"], "EC");
        assert_eq!(v["keys"][0]["crv"], "P-256");
        assert_eq!(v["keys"][1]["kty"], "OKP");
        assert!(v["keys"][0].get("kid").is_none());
        let b = parse(doc.as_bytes()).unwrap();
        assert_eq!(b.authorities, cas.to_vec());
        assert_eq!(b.sequence, Some(7));
        assert_eq!(b.refresh_hint, Some(Duration::from_secs(30)));
    }

    #[test]
    fn keys_of_other_uses_and_without_x5c_are_ignored() {
        let c = STANDARD.encode(ca(&rcgen::PKCS_ECDSA_P256_SHA256).as_ref());
        let doc = format!(
            r#"{{"keys":[{{"use":"jwt-svid","kid":"k","kty":"EC","crv":"P-256","x":"a","y":"b"}},
                {{"use":"x509-svid","kty":"EC"}},
                {{"use":"x509-svid","kty":"EC","x5c":["{c}","not even base64"]}}]}}"#
        );
        let b = parse(doc.as_bytes()).unwrap();
        assert_eq!(b.authorities.len(), 1);
        assert_eq!(b.sequence, None);
        // nothing left: the domain has no X.509 authority
        assert_eq!(
            parse(br#"{"keys":[{"use":"jwt-svid","kid":"k"}]}"#),
            Err(BundleError::Empty)
        );
        assert!(matches!(
            parse(br#"{"keys":[{"use":"x509-svid","x5c":["%%"]}]}"#),
            Err(BundleError::Base64(0, _))
        ));
        assert!(matches!(
            parse(br#"{"keys":[{"use":"x509-svid","x5c":["AAAA"]}]}"#),
            Err(BundleError::Certificate(0, _))
        ));
        assert!(matches!(parse(b"[1]"), Err(BundleError::Json(_))));
        assert_eq!(
            parse(&vec![b' '; MAX_BYTES + 1]),
            Err(BundleError::TooLarge)
        );
    }
}
