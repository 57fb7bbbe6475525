//! Waiting in the daemon's loop: deadlines and signals.

pub(super) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// SIGTERM and SIGINT, listened for from the daemon's start to its end: a signal that arrives
/// while the daemon is busy elsewhere (setting up its backend, say) is kept until it next waits
/// for one. A listener made anew at each wait would miss it, and the daemon would ignore it.
pub(super) struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    pub(super) fn listen() -> Shutdown {
        use tokio::signal::unix::{signal, SignalKind};
        Shutdown {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    /// Until SIGTERM or SIGINT (at once if one came since the last wait). Cancel-safe.
    pub(super) async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
