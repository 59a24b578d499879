//! The threads fedport runs its work on: each a single-threaded tokio runtime (thread
//! per core for workers; one each for the control and registry loops).

use std::thread::JoinHandle;

/// A named thread running a single-threaded tokio runtime until `task` completes.
pub fn runtime_thread<F, Fut>(name: String, task: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::Builder::new().name(name).spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(task()),
            Err(e) => tracing::error!(error = %e, "a runtime failed to start"),
        }
    })
}
