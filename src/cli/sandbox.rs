//! `fedport sandbox`: sets up and runs the loopback federation until Ctrl-C.

use super::CliError;
use crate::sandbox;
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
    // The demo services run on a runtime of their own beside the node.
    let echo =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| CliError::Io("bind".into(), e))?;
    let json =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| CliError::Io("bind".into(), e))?;
    let (echo_addr, json_addr) = (
        echo.local_addr()
            .map_err(|e| CliError::Io("bind".into(), e))?,
        json.local_addr()
            .map_err(|e| CliError::Io("bind".into(), e))?,
    );
    echo.set_nonblocking(true)
        .map_err(|e| CliError::Io("bind".into(), e))?;
    json.set_nonblocking(true)
        .map_err(|e| CliError::Io("bind".into(), e))?;
    std::thread::Builder::new()
        .name("sandbox-demo".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let (Ok(e), Ok(j)) = (
                    tokio::net::TcpListener::from_std(echo),
                    tokio::net::TcpListener::from_std(json),
                ) else {
                    return;
                };
                tokio::join!(sandbox::demo::grpc_echo(e), sandbox::demo::json_service(j));
            });
        })
        .map_err(|e| CliError::Io("demo thread".into(), e))?;

    let layout = sandbox::write(&dir, echo_addr, json_addr)?;
    let (cfg, _) = crate::config::load(&layout.config)?;
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
                sandbox::instructions(&layout, peer, local, admin)
            );
            let _ = out.flush();
        }
        match &ready_file {
            Some(p) => super::write_ready_file(p, bound, admin),
            None => Ok(()),
        }
    })?;
    Ok(0)
}
