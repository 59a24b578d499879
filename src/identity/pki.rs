//! A small certificate authority (rcgen) for `fedport certs`, the sandbox and the
//! tests: a federation CA (made, or loaded from its files) and node/client
//! certificates with SPIFFE URI, DNS and IP SANs.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} exists already; keep it, or remove it (or pass --force) to make a new one")]
    Exists(PathBuf),
    #[error("{0} is not the key of {1}: what it issued would not chain to that certificate")]
    Mismatch(PathBuf, PathBuf),
    #[error("{0} is not a PEM certificate")]
    NotCertificate(PathBuf),
}

/// A federation CA held in memory.
pub struct Authority {
    cert: Certificate,
    key: KeyPair,
}

/// PEM texts of an issued certificate and its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Files written by [`Issued::write`].
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone, Default)]
pub struct LeafSpec {
    pub common_name: String,
    pub spiffe: Option<String>,
    pub dns: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    /// Validity relative to now: (start, end). Default: (-1h, +30d).
    pub valid: Option<(Duration, Duration)>,
    /// The serial number; default: random.
    pub serial: Option<u64>,
}

impl Authority {
    pub fn new(name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// A CA valid for `days` from now.
    pub fn with_days(name: &str, days: i64) -> Result<Self, PkiError> {
        let mut a = Self::new(name)?;
        let mut params = CertificateParams::from_ca_cert_pem(&a.cert.pem())?;
        params.not_after = OffsetDateTime::now_utc() + Duration::days(days);
        a.cert = params.self_signed(&a.key)?;
        Ok(a)
    }

    /// The CA of `dir/NAME.pem` and `dir/NAME.key`, to issue more certificates with: what
    /// it issues chains to the certificate on disk (the same subject and key).
    pub fn load(dir: &Path, name: &str) -> Result<Self, PkiError> {
        let read =
            |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| PkiError::Read(p.clone(), e));
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        let cert = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        // the certificate on disk must carry this key: one re-signed with another key
        // would name the same CA, and nothing it issued would verify
        let on_disk = x509_parser::pem::parse_x509_pem(cert.as_bytes())
            .ok()
            .and_then(|(_, pem)| {
                let (_, c) = x509_parser::parse_x509_certificate(&pem.contents).ok()?;
                Some(c.tbs_certificate.subject_pki.raw.to_vec())
            })
            .ok_or_else(|| PkiError::NotCertificate(cert_path.clone()))?;
        if on_disk != key.public_key_der() {
            return Err(PkiError::Mismatch(key_path, cert_path));
        }
        let cert = CertificateParams::from_ca_cert_pem(&cert)?.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Writes the CA's key to `dir/NAME.key`, readable by its owner only.
    pub fn write_key(&self, dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
        let p = dir.join(format!("{name}.key"));
        write_private(&p, &self.key.serialize_pem())?;
        Ok(p)
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(spec.dns.clone())?;
        if let Some(uri) = &spec.spiffe {
            params
                .subject_alt_names
                .insert(0, SanType::URI(uri.as_str().try_into()?));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if let Some(s) = spec.serial {
            params.serial_number = Some(rcgen::SerialNumber::from(s));
        }
        let (start, end) = spec
            .valid
            .unwrap_or((Duration::hours(-1), Duration::days(30)));
        let now = OffsetDateTime::now_utc();
        params.not_before = now + start;
        params.not_after = now + end;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CRL (PEM) revoking the given serial numbers, valid for a day.
    pub fn crl(&self, revoked: &[u64]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(1),
            next_update: now + Duration::days(1),
            crl_number: rcgen::SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
    }

    /// Writes the CA certificate to `dir/NAME.pem`.
    pub fn write_ca(&self, dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, self.cert_pem()).map_err(|e| PkiError::Write(p.clone(), e))?;
        Ok(p)
    }
}

impl Issued {
    /// Writes `dir/NAME.pem` and `dir/NAME.key`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<IssuedFiles, PkiError> {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).map_err(|e| PkiError::Write(cert.clone(), e))?;
        write_private(&key, &self.key_pem)?;
        Ok(IssuedFiles { cert, key })
    }
}

/// Writes a private key, readable by its owner only (0600).
fn write_private(p: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(p);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(p)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| PkiError::Write(p.to_owned(), e))
}
