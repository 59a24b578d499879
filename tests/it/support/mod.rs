//! Test support: certificates made at test time, the real `fedport` binary started on
//! port 0 and awaited through its ready file, real upstreams on loopback, and helpers
//! to run clients nobody here wrote (curl, openssl, python grpcio).

pub mod etcd;
pub mod netns;
pub mod upstream;

use fedport::identity::pki::{Authority, IssuedFiles, LeafSpec};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DOMAIN: &str = "fed.test";

/// A federation CA and the certificates tests use, written into a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub node: IssuedFiles,
    /// A client of this federation: `spiffe://fed.test/client/alice`.
    pub client: IssuedFiles,
    /// Signed by another CA.
    pub stranger: IssuedFiles,
    /// Signed by the federation CA, but expired yesterday.
    pub expired: IssuedFiles,
    pub authority: Authority,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let authority = Authority::new("fedport test CA").unwrap();
        let ca = authority.write_ca(d, "ca").unwrap();
        let node = authority
            .issue(&LeafSpec {
                common_name: "node-a".into(),
                spiffe: Some(format!("spiffe://{DOMAIN}/node/a")),
                dns: vec!["localhost".into(), format!("*.{DOMAIN}")],
                ips: vec!["127.0.0.1".parse().unwrap()],
                valid: None,
                serial: None,
            })
            .unwrap()
            .write(d, "node")
            .unwrap();
        let client = authority
            .issue(&LeafSpec {
                common_name: "alice".into(),
                spiffe: Some(format!("spiffe://{DOMAIN}/client/alice")),
                ..Default::default()
            })
            .unwrap()
            .write(d, "client")
            .unwrap();
        let other = Authority::new("some other CA").unwrap();
        let stranger = other
            .issue(&LeafSpec {
                common_name: "mallory".into(),
                spiffe: Some(format!("spiffe://{DOMAIN}/client/mallory")),
                ..Default::default()
            })
            .unwrap()
            .write(d, "stranger")
            .unwrap();
        let expired = authority
            .issue(&LeafSpec {
                common_name: "old".into(),
                spiffe: Some(format!("spiffe://{DOMAIN}/client/old")),
                valid: Some((time::Duration::days(-30), time::Duration::days(-1))),
                ..Default::default()
            })
            .unwrap()
            .write(d, "expired")
            .unwrap();
        Self {
            dir,
            ca,
            node,
            client,
            stranger,
            expired,
            authority,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Another client of this federation: `spiffe://fed.test/client/NAME`.
    pub fn client_cert(&self, name: &str) -> IssuedFiles {
        self.authority
            .issue(&LeafSpec {
                common_name: name.into(),
                spiffe: Some(format!("spiffe://{DOMAIN}/client/{name}")),
                ..Default::default()
            })
            .unwrap()
            .write(self.path(), &format!("client-{name}"))
            .unwrap()
    }

    /// A node certificate: `spiffe://fed.test/node/NAME`, valid for localhost and
    /// 127.0.0.1 (and any address: peers are verified by identity, not by name).
    pub fn node_cert(&self, name: &str) -> IssuedFiles {
        self.authority
            .issue(&node_spec(name, None))
            .unwrap()
            .write(self.path(), &format!("node-{name}"))
            .unwrap()
    }

    /// Replaces node NAME's certificate files with a new certificate of `serial`: the
    /// key first, then the certificate, as a rotation writes them.
    pub fn rotate_node_cert(&self, name: &str, serial: u64) {
        let new = self
            .authority
            .issue(&node_spec(name, Some(serial)))
            .unwrap();
        std::fs::write(self.path().join(format!("node-{name}.key")), &new.key_pem).unwrap();
        std::fs::write(self.path().join(format!("node-{name}.pem")), &new.cert_pem).unwrap();
    }

    /// The `[tls]` section for a node using these files.
    pub fn tls_section(&self) -> String {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            self.node.cert.display(),
            self.node.key.display(),
            self.ca.display()
        )
    }

    /// curl arguments that present the test client's certificate.
    pub fn curl_client(&self) -> Vec<String> {
        vec![
            "--cacert".into(),
            self.ca.display().to_string(),
            "--cert".into(),
            self.client.cert.display().to_string(),
            "--key".into(),
            self.client.key.display().to_string(),
        ]
    }
}

/// A running `fedport run` process.
pub struct Fedport {
    pub child: Child,
    pub listeners: HashMap<String, SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub log: PathBuf,
    /// The config file it was started with (rewrite it and SIGHUP to reload).
    pub config: PathBuf,
    /// The network namespace it runs in, if not the test's own.
    pub netns: Option<String>,
    /// Its ready file (rewritten by the process an upgrade starts).
    ready: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fedport")
}

impl Fedport {
    /// Writes `config` to a file and starts the daemon on it; returns once it is ready.
    pub fn start(config: &str) -> Self {
        Self::start_in(None, config)
    }

    /// [`Fedport::start`] inside a network namespace (`ip netns exec`).
    pub fn start_in(netns: Option<&str>, config: &str) -> Self {
        Self::start_with(netns, config, &[])
    }

    /// [`Fedport::start_in`] with more arguments for `fedport` (before `run`).
    pub fn start_with(netns: Option<&str>, config: &str, args: &[&str]) -> Self {
        let cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        };
        Self::launch(cmd, netns, config, args)
    }

    /// [`Fedport::start`] with its soft RLIMIT_NOFILE lowered to `soft` (the hard one
    /// kept), as a login shell or a supervisor may leave it.
    pub fn start_with_soft_nofile(config: &str, soft: u64) -> Self {
        let mut c = Command::new("prlimit");
        c.arg(format!("--nofile={soft}:")).arg(bin());
        Self::launch(c, None, config, &[])
    }

    /// [`Fedport::start`] run by `cmd` (which names the binary and what goes before
    /// `run`), e.g. `env VAR=… fedport`.
    pub fn start_by(cmd: Command, config: &str) -> Self {
        Self::launch(cmd, None, config, &[])
    }

    fn launch(mut cmd: Command, netns: Option<&str>, config: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("fedport.toml");
        std::fs::write(&cfg, config).unwrap();
        let ready = dir.path().join("ready.json");
        let log = dir.path().join("fedport.log");
        let child = cmd
            .args(args)
            .args(["run", "-c"])
            .arg(&cfg)
            .arg("--ready-file")
            .arg(&ready)
            .env(
                "FEDPORT_LOG",
                std::env::var("FEDPORT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start fedport");
        let mut f = Fedport {
            child,
            listeners: HashMap::new(),
            admin: None,
            log,
            config: cfg.clone(),
            netns: netns.map(str::to_owned),
            ready: ready.clone(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                for (k, a) in v["listeners"].as_object().unwrap() {
                    f.listeners
                        .insert(k.clone(), a.as_str().unwrap().parse().unwrap());
                }
                f.admin = v["admin"].as_str().map(|a| a.parse().unwrap());
                return f;
            }
            if let Ok(Some(status)) = f.child.try_wait() {
                panic!(
                    "fedport exited with {status} before ready:\n{}",
                    f.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "fedport not ready in 30s:\n{}",
                f.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ready_file(&self) -> &Path {
        &self.ready
    }

    /// Waits for the process to exit, at most `within`: its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.listeners[listener]
    }

    pub fn port(&self, listener: &str) -> u16 {
        self.addr(listener).port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Fetches an admin path with curl.
    pub fn admin_get(&self, path: &str) -> String {
        let a = self.admin.expect("admin port configured");
        let url = format!("http://{a}{path}");
        let out = match &self.netns {
            Some(ns) => Command::new("ip")
                .args(["netns", "exec", ns, "curl", "-s", &url])
                .output(),
            None => Command::new("curl").args(["-s", &url]).output(),
        }
        .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The value of one metric sample, e.g. `fedport_rejections_total{listener="internal",reason="tls"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = self.admin_get("/metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Peak resident memory of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM")
    }
}

impl Drop for Fedport {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A size from a process's `/proc/PID/status` (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// What node NAME's certificate says (see [`Pki::node_cert`]).
fn node_spec(name: &str, serial: Option<u64>) -> LeafSpec {
    LeafSpec {
        common_name: format!("node-{name}"),
        spiffe: Some(format!("spiffe://{DOMAIN}/node/{name}")),
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
        valid: None,
        serial,
    }
}

/// curl to `https://localhost:PORT/x` for service `up`, presenting `cert` and `key`.
pub fn curl_as(pki: &Pki, cert: &Path, key: &Path, port: u16) -> (u16, String, i32) {
    let url = format!("https://localhost:{port}/x");
    curl_tls(&pki.ca, cert, key, &["-H", "fed-service: up", &url])
}

/// curl trusting `ca` and presenting `cert` and `key`, with more arguments (the URL
/// among them).
pub fn curl_tls(ca: &Path, cert: &Path, key: &Path, more: &[&str]) -> (u16, String, i32) {
    let (ca, c, k) = (
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let mut a = vec!["--cacert", &ca, "--cert", &c, "--key", &k];
    a.extend(more);
    curl(&a)
}

/// A test helper server of tests/py: started with `args`, it prints its port on its
/// first line; killed and reaped when dropped.
pub struct PyServer {
    child: std::process::Child,
    pub port: u16,
}

impl PyServer {
    pub fn start(script: &str, args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg(py(script))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{script}: {line:?}"));
        Self { child, port }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fedport check FILE`: its exit code and what it wrote to stderr.
pub fn check(file: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin()).arg("check").arg(file).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs curl; returns (http status, body, exit code). `-w` appends the status.
pub fn curl(args: &[&str]) -> (u16, String, i32) {
    let out: Output = Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "30",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(args)
        .output()
        .expect("curl is installed (scripts/install-test-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// A node config with a peer listener, a local listener and an admin port, all on
/// port 0, followed by `services`, and a rule that lets every identity reach every service.
pub fn node_config(pki: &Pki, services: &str) -> String {
    node_config_with_rules(pki, services, "[[allow]]\nfrom = \"*\"\nto = \"*\"\n")
}

/// [`node_config`] with these `[[allow]]` rules instead.
pub fn node_config_with_rules(pki: &Pki, services: &str, rules: &str) -> String {
    format!(
        r#"[node]
name = "test-a"
region = "test-1"
workers = 2
drain_timeout = "10s"

{tls}
[admin]
bind = "127.0.0.1:0"

[[listener]]
name = "internal"
bind = "127.0.0.1:0"

[[listener]]
name = "local"
role = "local"
bind = "127.0.0.1:0"

{services}

{rules}
"#,
        tls = pki.tls_section()
    )
}

/// A loopback port free right now, for configs that must name each other's ports
/// before either node starts. Not a bind to port 0: see [`fedport::sandbox::free_port`]
/// for why a port so freed may be taken by another test's connection first.
pub fn free_port() -> u16 {
    fedport::sandbox::free_port().expect("a free loopback port")
}

/// Path of a test helper script under tests/py.
pub fn py(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script)
}

/// A run of a Python client of tests/py (Python's `h2` speaking raw frames) against
/// `port`, holding `cert` and trusting the test CA; `args` come after those.
pub struct PyClient {
    args: Vec<String>,
}

impl PyClient {
    pub fn new(pki: &Pki, script: &str, port: u16, cert: &IssuedFiles, args: &[&str]) -> Self {
        let args = [py(script).display().to_string()]
            .into_iter()
            .chain(args.iter().map(|s| s.to_string()))
            .chain(["--port".into(), port.to_string()])
            .chain(["--ca".into(), pki.ca.display().to_string()])
            .chain(["--cert".into(), cert.cert.display().to_string()])
            .chain(["--key".into(), cert.key.display().to_string()])
            .collect();
        PyClient { args }
    }

    /// What the client printed; panics with its stderr if it failed.
    pub fn stdout(&self) -> String {
        let out = Command::new("python3")
            .args(&self.args)
            .output()
            .expect("python3 with h2 (scripts/install-test-deps.sh)");
        assert!(
            out.status.success(),
            "{:?}: {}",
            self.args,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Its one JSON report.
    pub fn json(&self) -> serde_json::Value {
        let out = self.stdout();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// [`PyClient::json`] on a thread of its own.
    pub fn spawn(self) -> std::thread::JoinHandle<serde_json::Value> {
        std::thread::spawn(move || self.json())
    }
}

/// `fedport bench` of `n` GETs to service `up` through the node's internal port with
/// the test client's certificate, `conns` connections of `streams` streams, JSON out;
/// more arguments (a rate) may follow.
pub fn bench_up(fp: &Fedport, pki: &Pki, n: u64, (conns, streams): (u32, u32)) -> Command {
    let mut c = Command::new(bin());
    c.arg("bench")
        .arg(format!("https://127.0.0.1:{}/", fp.port("internal")))
        .args(["-c", &conns.to_string(), "-m", &streams.to_string()])
        .args(["--json", "-H", "fed-service: up", "-n", &n.to_string()])
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key)
        .arg("--ca")
        .arg(&pki.ca);
    c
}

/// Waits until `f` is true, polling; panics with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An HTTP/2 client connection over mutual TLS to a fedport listener, with the test
/// client's certificate (hyper + rustls).
pub async fn h2_connect<B>(
    pki: &Pki,
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let files = fedport::identity::TlsFiles {
        cert: pki.client.cert.clone(),
        key: pki.client.key.clone(),
        ca: pki.ca.clone(),
    };
    let tls = tokio_rustls::TlsConnector::from(
        fedport::identity::client_config(&files, &[b"h2"]).unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.unwrap();
    let (s, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    s
}
