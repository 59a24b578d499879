//! Network namespaces made by a test, joined by veth pairs; deleted when dropped.

use std::process::{Child, Command, Stdio};

pub fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace, deleted (with its veth ends) when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Result<Self, String> {
        let _ = run(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns(name);
        run(&["ip", "-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut a = vec!["ip", "netns", "exec", &self.0];
        a.extend(args);
        run(&a)
    }

    pub fn spawn(&self, args: &[&str]) -> Proc {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in namespace");
        Proc(child)
    }

    pub fn output(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Joins namespace `a` and `b` with a veth pair on a /30: `a` gets .1, `b` gets .2.
pub fn link(a: &Netns, b: &Netns, ifa: &str, ifb: &str, net: &str) -> Result<(), String> {
    run(&[
        "ip", "link", "add", ifa, "netns", &a.0, "type", "veth", "peer", "name", ifb, "netns", &b.0,
    ])?;
    a.exec(&["ip", "addr", "add", &format!("{net}.1/30"), "dev", ifa])?;
    b.exec(&["ip", "addr", "add", &format!("{net}.2/30"), "dev", ifb])?;
    a.exec(&["ip", "link", "set", ifa, "up"])?;
    b.exec(&["ip", "link", "set", ifb, "up"])
}
