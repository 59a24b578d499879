//! `fedport certs`: a federation CA, node and client certificates with SPIFFE IDs and
//! DNS/IP SANs, another organisation's trust-domain CA, each printing the config lines
//! that use it (rcgen, as the sandbox and the tests).

use super::CliError;
use crate::identity::pki::{Authority, LeafSpec, PkiError};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// The federation CA and this node's certificate at once: what a new node needs.
    Init {
        /// The node's name: `spiffe://DOMAIN/node/NAME`, and its file names.
        #[arg(long)]
        node: String,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sans: Sans,
    },
    /// A CA: the federation's (`[tls] ca`), or with --for-domain another
    /// organisation's (`[[trust_domain]]`).
    Ca {
        /// Its file name (NAME.pem, NAME.key).
        #[arg(long, default_value = "federation-ca")]
        name: String,
        /// The trust domain this CA vouches for, when it is another organisation's.
        #[arg(long)]
        for_domain: Option<String>,
        /// Days it is valid (at most a hundred years).
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(i64).range(1..=36_500))]
        days: i64,
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// A node's certificate: `spiffe://DOMAIN/node/NAME`, for servers and clients.
    Node {
        name: String,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sans: Sans,
    },
    /// A client's certificate: `spiffe://DOMAIN/client/NAME`.
    Client {
        name: String,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sans: Sans,
    },
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// The trust domain of the SPIFFE ID.
    #[arg(long, default_value = "fed.example")]
    pub trust_domain: String,
    /// The CA that signs, by file name in --dir (NAME.pem and NAME.key).
    #[arg(long, default_value = "federation-ca")]
    pub ca: String,
    /// Where the files go (and the CA is).
    #[arg(long, default_value = "certs")]
    pub dir: PathBuf,
    /// Days the certificate is valid (at most a hundred years).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(i64).range(1..=36_500))]
    pub days: i64,
    /// Replace files that exist.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct Sans {
    /// A DNS name the certificate carries (repeat for more).
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// An IP address the certificate carries (repeat for more).
    #[arg(long = "ip")]
    pub ip: Vec<std::net::IpAddr>,
}

/// The files of `name` in `dir`, refused if they exist (unless `force`).
fn fresh(dir: &Path, name: &str, force: bool) -> Result<(), CliError> {
    std::fs::create_dir_all(dir).map_err(|e| CliError::Io(dir.display().to_string(), e))?;
    for ext in ["pem", "key"] {
        let p = dir.join(format!("{name}.{ext}"));
        if p.exists() && !force {
            return Err(PkiError::Exists(p).into());
        }
    }
    Ok(())
}

/// A trust domain as a SPIFFE ID's authority: lower case letters, digits, '.', '-', '_'.
fn domain_ok(d: &str) -> bool {
    !d.is_empty()
        && d.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn bad(what: &str) -> CliError {
    CliError::Io(
        what.to_owned(),
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "letters, digits, '.', '-' and '_' only (a trust domain in lower case)",
        ),
    )
}

fn leaf(
    kind: &str,
    name: &str,
    c: &Common,
    sans: &Sans,
) -> Result<(crate::identity::pki::IssuedFiles, String), CliError> {
    if !name_ok(name) {
        return Err(bad(&format!("name {name:?}")));
    }
    if !domain_ok(&c.trust_domain) {
        return Err(bad(&format!("trust domain {:?}", c.trust_domain)));
    }
    let ca = Authority::load(&c.dir, &c.ca)?;
    fresh(&c.dir, name, c.force)?;
    let (issued, id) = issue(&ca, kind, name, c, sans)?;
    Ok((issued.write(&c.dir, name)?, id))
}

/// The certificate of `kind/name`, issued by `ca`, in memory: its PEM texts and its
/// SPIFFE ID.
fn issue(
    ca: &Authority,
    kind: &str,
    name: &str,
    c: &Common,
    sans: &Sans,
) -> Result<(crate::identity::pki::Issued, String), CliError> {
    // clap keeps it within a hundred years: no overflow
    let days = time::Duration::days(c.days);
    let id = format!("spiffe://{}/{kind}/{name}", c.trust_domain);
    let issued = ca.issue(&LeafSpec {
        common_name: name.to_owned(),
        spiffe: Some(id.clone()),
        dns: sans.dns.clone(),
        ips: sans.ip.clone(),
        valid: Some((time::Duration::hours(-1), days)),
        serial: None,
    })?;
    Ok((issued, id))
}

/// The `[tls]` lines for a node's files.
fn tls_lines(files: &crate::identity::pki::IssuedFiles, ca: &Path) -> String {
    format!(
        "[tls]\ncert = \"{}\"\nkey  = \"{}\"\nca   = \"{}\"\n",
        files.cert.display(),
        files.key.display(),
        ca.display()
    )
}

pub fn certs(a: &CertsArgs) -> Result<i32, CliError> {
    match &a.what {
        What::Init { node, common, sans } => {
            // everything that could refuse the node's certificate is asked first, so
            // that a refusal leaves no CA behind for the next try to trip over
            if !name_ok(node) {
                return Err(bad(&format!("name {node:?}")));
            }
            if !domain_ok(&common.trust_domain) {
                return Err(bad(&format!("trust domain {:?}", common.trust_domain)));
            }
            fresh(&common.dir, node, common.force)?;
            fresh(&common.dir, &common.ca, common.force)?;
            let ca = Authority::with_days("fedport federation CA", 3650)?;
            // the node's certificate is made before anything is written
            let (issued, id) = issue(&ca, "node", node, common, sans)?;
            let ca_pem = ca.write_ca(&common.dir, &common.ca)?;
            ca.write_key(&common.dir, &common.ca)?;
            let files = issued.write(&common.dir, node)?;
            println!(
                "# the federation CA: {} (its key beside it: keep it off the nodes)\n# node {node}: {id}\n{}",
                ca_pem.display(),
                tls_lines(&files, &ca_pem)
            );
        }
        What::Ca {
            name,
            for_domain,
            days,
            dir,
            force,
        } => {
            if !name_ok(name) {
                return Err(bad(&format!("name {name:?}")));
            }
            fresh(dir, name, *force)?;
            let title = match for_domain {
                Some(d) if !domain_ok(d) => return Err(bad(&format!("trust domain {d:?}"))),
                Some(d) => format!("fedport CA of {d}"),
                None => "fedport federation CA".to_owned(),
            };
            let ca = Authority::with_days(&title, *days)?;
            let pem = ca.write_ca(dir, name)?;
            let key = ca.write_key(dir, name)?;
            match for_domain {
                Some(d) => println!(
                    "# {d}'s CA: {} (its key: {}); it vouches for spiffe://{d}/… only\n[[trust_domain]]\nname = \"{d}\"\nca   = \"{}\"\n",
                    pem.display(),
                    key.display(),
                    pem.display()
                ),
                None => println!(
                    "# the federation CA (its key: {}, kept off the nodes)\n[tls]\nca = \"{}\"\n",
                    key.display(),
                    pem.display()
                ),
            }
        }
        What::Node { name, common, sans } => {
            let (files, id) = leaf("node", name, common, sans)?;
            let ca = common.dir.join(format!("{}.pem", common.ca));
            println!("# node {name}: {id}\n{}", tls_lines(&files, &ca));
        }
        What::Client { name, common, sans } => {
            let (files, id) = leaf("client", name, common, sans)?;
            let ca = common.dir.join(format!("{}.pem", common.ca));
            println!(
                "# client {name}: {id}\n# curl --cacert {} --cert {} --key {} https://…\n[[allow]]\nfrom = \"{id}\"\nto   = \"SERVICE\"\n",
                ca.display(),
                files.cert.display(),
                files.key.display()
            );
        }
    }
    Ok(0)
}
