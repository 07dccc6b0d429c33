//! The shutdown sequence every Fleet service uses: a signal cancels a token, background tasks
//! in a [`JoinSet`] see it and finish, and the process waits for them up to a deadline.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Cancels `token` on the first SIGINT or SIGTERM (Kubernetes sends SIGTERM).
///
/// Handlers are installed before this returns, so a failure shows at startup and a signal that
/// arrives right after is not missed.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => info!(signal = "SIGINT", "Shutdown requested."),
            _ = sigterm.recv() => info!(signal = "SIGTERM", "Shutdown requested."),
            () = token.cancelled() => return,
        }
        token.cancel();
    });
    Ok(())
}

/// How a drain ended: what a service returns, and `run_service` turns into its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every task finished within the grace period and none failed.
    Clean,
    /// A task failed, exited early, or had to be aborted at the deadline.
    Unclean,
}

impl Drain {
    /// `Clean` only if both steps of a drain were.
    #[must_use]
    pub fn and(self, other: Drain) -> Drain {
        if self == Drain::Clean && other == Drain::Clean {
            Drain::Clean
        } else {
            Drain::Unclean
        }
    }
}

/// A set of named background tasks that live until `token` is cancelled.
///
/// If any task ends on its own (early return or error) the token is cancelled so the rest wind
/// down too: a service never runs half alive.
#[derive(Debug)]
pub struct Supervisor {
    token: CancellationToken,
    tasks: JoinSet<(&'static str, TaskResult)>,
}

/// What a supervised task returns: success, or an error to log.
pub type TaskResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

impl Supervisor {
    pub fn new(token: CancellationToken) -> Self {
        Self {
            token,
            tasks: JoinSet::new(),
        }
    }

    /// The token the tasks should watch.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Runs `task` in the background under `name`.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = TaskResult> + Send + 'static,
    {
        self.tasks.spawn(async move { (name, task.await) });
    }

    /// Waits for cancellation (or for any task to end), then gives the tasks `grace` to finish
    /// and aborts what is left.
    pub async fn run(mut self, grace: Duration) -> Drain {
        let mut outcome = Drain::Clean;
        tokio::select! {
            () = self.token.cancelled() => {}
            Some(joined) = self.tasks.join_next() => {
                // A task that stopped because shutdown began (the token and its exit can
                // become ready together) is a clean stop, not an early exit.
                if !report(joined, self.token.is_cancelled()) {
                    outcome = Drain::Unclean;
                }
                self.token.cancel();
            }
        }
        let drained = tokio::time::timeout(grace, async {
            let mut clean = true;
            while let Some(joined) = self.tasks.join_next().await {
                clean &= report(joined, true);
            }
            clean
        })
        .await;
        match drained {
            Ok(true) => {}
            Ok(false) => outcome = Drain::Unclean,
            Err(_) => {
                warn!(
                    grace_ms = grace.as_millis() as u64,
                    "Grace period elapsed; aborting remaining tasks."
                );
                self.tasks.shutdown().await;
                outcome = Drain::Unclean;
            }
        }
        outcome
    }
}

/// Logs how a task ended; returns whether that was fine.
fn report(
    joined: Result<(&'static str, TaskResult), tokio::task::JoinError>,
    shutting_down: bool,
) -> bool {
    match joined {
        Ok((name, Ok(()))) if shutting_down => {
            info!(task = name, "Task stopped.");
            true
        }
        Ok((name, Ok(()))) => {
            error!(task = name, "Task exited before shutdown was requested.");
            false
        }
        Ok((name, Err(err))) => {
            error!(task = name, error = %err, "Task failed.");
            false
        }
        Err(err) => {
            error!(error = %err, "Task panicked or was cancelled.");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_that_stop_on_cancellation_drain_cleanly() {
        let token = CancellationToken::new();
        let mut supervisor = Supervisor::new(token.clone());
        for name in ["a", "b"] {
            let t = token.clone();
            supervisor.spawn(name, async move {
                t.cancelled().await;
                Ok(())
            });
        }
        token.cancel();
        assert_eq!(supervisor.run(Duration::from_secs(1)).await, Drain::Clean);
    }

    #[tokio::test]
    async fn an_early_exit_or_a_failure_stops_the_rest_and_is_unclean() {
        let token = CancellationToken::new();
        let mut supervisor = Supervisor::new(token.clone());
        let t = token.clone();
        supervisor.spawn("waits", async move {
            t.cancelled().await;
            Ok(())
        });
        supervisor.spawn("fails", async { Err("boom".into()) });
        assert_eq!(supervisor.run(Duration::from_secs(1)).await, Drain::Unclean);
        assert!(token.is_cancelled(), "the other task was told to stop");
    }

    #[tokio::test]
    async fn a_task_that_ignores_shutdown_is_aborted_at_the_deadline() {
        let token = CancellationToken::new();
        let mut supervisor = Supervisor::new(token.clone());
        supervisor.spawn("stuck", async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        token.cancel();
        let started = std::time::Instant::now();
        assert_eq!(
            supervisor.run(Duration::from_millis(100)).await,
            Drain::Unclean
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
