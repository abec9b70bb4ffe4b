//! Reloads what files describe when the files change: polls their contents every interval and, when
//! asked, on SIGHUP.
//!
//! Polling contents rather than watching inodes is deliberate: Kubernetes updates mounted Secrets and
//! ConfigMaps by swapping a symlink, which inode watchers miss; comparing bytes catches every change,
//! including a file replaced with identical metadata. The files are small, so reading them is cheap.

use std::{ops::ControlFlow, path::PathBuf, time::Duration};

/// Why a reload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A watched file's contents changed (or it appeared or vanished).
    Changed,
    /// SIGHUP: reload even if nothing seems to have changed.
    Hangup,
}

/// Spawns a task that calls `reload` whenever one of `paths` changes, checked every `interval`, and on
/// SIGHUP when `on_hangup`. The task ends when `reload` returns `Break` (its target is gone).
pub fn spawn(
    paths: Vec<PathBuf>,
    interval: Duration,
    on_hangup: bool,
    mut reload: impl FnMut(Trigger) -> ControlFlow<()> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut hangups = if on_hangup {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(signal) => Some(signal),
                Err(e) => {
                    tracing::warn!("cannot listen for SIGHUP, reloads happen on change only: {e}");
                    None
                }
            }
        } else {
            None
        };
        let mut seen = contents(&paths).await;
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        ticks.tick().await; // the first tick is immediate
        loop {
            let hangup = async {
                match hangups.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                _ = ticks.tick() => Trigger::Changed,
                Some(()) = hangup => Trigger::Hangup,
            };
            let now = contents(&paths).await;
            if trigger == Trigger::Hangup || now != seen {
                seen = now;
                if reload(trigger).is_break() {
                    return;
                }
            }
        }
    });
}

async fn contents(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    let mut all = Vec::with_capacity(paths.len());
    for path in paths {
        all.push(tokio::fs::read(path).await.ok());
    }
    all
}
