//! `fedport sandbox`: sets up and runs the loopback federation until Ctrl-C.

use super::CliError;
use crate::sandbox::{self, demo};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Keep the generated files here instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also write the bound addresses here as JSON once ready.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Find the nodes through a registry instead of `[[peer]]` lists: `etcd` starts a
    /// local one-member etcd (Debian's etcd-server must be installed).
    #[arg(long, value_parser = ["etcd"])]
    pub registry: Option<String>,
}

pub fn sandbox(a: &SandboxArgs) -> Result<i32, CliError> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| CliError::Io(d.display().to_string(), e))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("fedport-sandbox-")
                .tempdir()
                .map_err(|e| CliError::Io("temporary directory".into(), e))?;
            tmp.path().to_owned()
        }
    };
    // The demo instances run on a runtime of their own beside the nodes.
    let io = |e| CliError::Io("bind".into(), e);
    let names = [
        ("echo@eu-a", demo::Kind::GrpcEcho),
        ("inventory@eu-a", demo::Kind::Json),
        ("inventory@eu-b", demo::Kind::Json),
        ("inventory@us-a", demo::Kind::Json),
        ("pricing@us-a", demo::Kind::Json),
        ("kv@us-a", demo::Kind::Kv),
        ("catalog@eu-1a", demo::Kind::Json),
        ("catalog@eu-1b", demo::Kind::Json),
    ];
    let mut instances = Vec::new();
    let mut listeners = Vec::new();
    for (name, kind) in names {
        let (inst, l) = demo::instance(name).map_err(io)?;
        instances.push(Arc::new(inst));
        listeners.push((l, kind));
    }
    let control = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    control.set_nonblocking(true).map_err(io)?;
    let demos = sandbox::Demos {
        echo: instances[0].addr,
        inventory: [instances[1].addr, instances[2].addr, instances[3].addr],
        pricing: instances[4].addr,
        kv: instances[5].addr,
        catalog: [instances[6].addr, instances[7].addr],
        control: control.local_addr().map_err(io)?,
    };
    let all = Arc::new(instances);
    let served = all.clone();
    crate::runtime::runtime_thread("sandbox-demo".into(), move || async move {
        for (inst, (l, kind)) in served.iter().zip(listeners) {
            tokio::spawn(demo::run(inst.clone(), l, kind));
        }
        if let Ok(c) = tokio::net::TcpListener::from_std(control) {
            demo::control(c, served).await;
        }
    })
    .map_err(|e| CliError::Io("demo thread".into(), e))?;

    // the nodes name each other's ports in their configs: pick them first
    let mut ports = [0u16; 3];
    for p in &mut ports {
        *p = sandbox::free_port().map_err(io)?;
    }
    let etcd = match a.registry.as_deref() {
        Some(_) => Some(sandbox::LocalEtcd::start(&dir)?),
        None => None,
    };
    let layout = sandbox::write(&dir, &demos, ports, etcd.as_ref().map(|e| e.url.as_str()))?;
    // eu-b and us-a run beside; eu-a, the one you talk to, in the foreground. With a
    // registry they are processes of their own, each registering and watching.
    let mut others = Vec::new();
    let mut children = Vec::new();
    for (_, _, config, _) in &layout.nodes[1..] {
        if etcd.is_some() {
            let exe = std::env::current_exe().map_err(|e| CliError::Io("current_exe".into(), e))?;
            let child = std::process::Command::new(exe)
                .arg("run")
                .arg("-c")
                .arg(config)
                .stdout(std::process::Stdio::null())
                .spawn()
                .map_err(|e| CliError::Io("node process".into(), e))?;
            children.push(child);
            continue;
        }
        let (cfg, _) = crate::config::load(config)?;
        let cfg = Arc::new(cfg);
        let metrics = crate::telemetry::Metrics::new(&cfg.node.name, &cfg.hash);
        let server = crate::server::Server::start(cfg, metrics)?;
        server.open();
        others.push(server);
    }
    let (cfg, _) = crate::config::load(&layout.nodes[0].2)?;
    let ready_file = a.ready_file.clone();
    super::run::serve(Arc::new(cfg), |bound, admin| {
        let find = |n: &str| bound.iter().find(|(name, _)| name == n).map(|(_, a)| *a);
        if let (Some(peer), Some(local)) = (find("internal"), find("local")) {
            // a closed stdout (a pipe whose reader left) must not stop the sandbox
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = writeln!(
                out,
                "{}",
                sandbox::instructions(&layout, &demos, peer, (local, find("kv")), admin)
            );
            let _ = out.flush();
        }
        match &ready_file {
            Some(p) => super::write_ready_file(p, bound, admin),
            None => Ok(()),
        }
    })?;
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(etcd);
    for s in &others {
        s.drain();
    }
    for s in others {
        s.join();
    }
    Ok(0)
}
