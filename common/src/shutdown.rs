//! The signal that starts a graceful shutdown.

/// Completes when the process receives SIGTERM (what Kubernetes sends
/// before killing a pod) or SIGINT (Ctrl-C in a terminal).
///
/// If a signal handler cannot be installed (which only happens when the
/// runtime has no signal driver), the error is logged and that signal is
/// ignored, rather than shutting down at once.
pub fn signal() -> Signal {
    Box::pin(wait())
}

/// The future [`signal`] returns.
pub type Signal = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

async fn wait() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = async {
            match signal(SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot listen for sigterm");
                    std::future::pending::<()>().await;
                }
            }
        };
        let int = async {
            match signal(SignalKind::interrupt()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot listen for sigint");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = term => tracing::info!(signal = "SIGTERM", "shutdown signal received"),
            () = int => tracing::info!(signal = "SIGINT", "shutdown signal received"),
        }
    }
    #[cfg(not(unix))]
    {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown signal received");
    }
}
