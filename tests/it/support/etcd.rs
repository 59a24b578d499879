//! A real etcd cluster on loopback (Debian's etcd-server), one process per member,
//! with short election timeouts so that a test sees quorum come and go quickly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<(u16, u16, Option<Child>)>,
    /// CA, certificate and key: clients must present a certificate from the CA.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl Etcd {
    /// Starts `n` members and waits until the cluster answers.
    pub fn cluster(n: usize) -> Self {
        Self::start_all(n, None)
    }

    /// One member serving clients over TLS with client certificates required.
    pub fn with_tls(ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        Self::start_all(1, Some((ca, cert, key)))
    }

    fn scheme(&self) -> &str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn start_all(n: usize, tls: Option<(PathBuf, PathBuf, PathBuf)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let members = (0..n)
            .map(|_| (super::free_port(), super::free_port(), None))
            .collect();
        let mut e = Etcd { dir, members, tls };
        for i in 0..n {
            e.start(i);
        }
        super::wait_until("etcd to elect a leader", Duration::from_secs(20), || {
            e.healthy()
        });
        e
    }

    fn initial(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(i, (_, p, _))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts, with its data) member `i`.
    pub fn start(&mut self, i: usize) {
        let (c, p, _) = self.members[i];
        let client = format!("{}://127.0.0.1:{c}", self.scheme());
        let mut cmd = Command::new("etcd");
        if let Some((ca, cert, key)) = &self.tls {
            cmd.arg("--trusted-ca-file")
                .arg(ca)
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{i}")))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{p}"),
            ])
            .args(["--initial-cluster", &self.initial()])
            .args(["--initial-cluster-token", "fedport-test"])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (scripts/install-test-deps.sh)");
        self.members[i].2 = Some(child);
    }

    /// Kills member `i`.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].2.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The client URLs of every member, as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let v: Vec<String> = self
            .members
            .iter()
            .map(|(c, _, _)| format!("\"{}://127.0.0.1:{c}\"", self.scheme()))
            .collect();
        format!("[{}]", v.join(", "))
    }

    /// Whether some member reports a healthy cluster (it has a leader).
    pub fn healthy(&self) -> bool {
        self.members.iter().any(|(c, _, child)| {
            let mut curl = Command::new("curl");
            curl.args(["-s", "--max-time", "1"]);
            if let Some((ca, cert, key)) = &self.tls {
                curl.arg("--cacert")
                    .arg(ca)
                    .arg("--cert")
                    .arg(cert)
                    .arg("--key")
                    .arg(key);
            }
            child.is_some()
                && curl
                    .arg(format!("{}://127.0.0.1:{c}/health", self.scheme()))
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"true\""))
        })
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop(i);
        }
    }
}
