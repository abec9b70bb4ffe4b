//! Reloads what files describe when the files change: polls their contents every interval and, when
//! asked, on SIGHUP.
//!
//! Polling contents rather than watching inodes is deliberate: Kubernetes updates mounted Secrets and
//! ConfigMaps by swapping a symlink, which inode watchers miss; comparing bytes catches every change,
//! including a file replaced with identical metadata. The files are small, so reading them is cheap.
//!
//! Reloading (reading, parsing, validating) runs on tokio's blocking pool, never on a runtime worker: a
//! large policy or entities file must not stall requests. A reload refused while a file is being written
//! (an editor or `cp` caught half-way) is tried again once the file has settled; a reload is all or
//! nothing, so a half-written file is never half-applied.

use std::{ops::ControlFlow, path::PathBuf, time::Duration};

/// Why a reload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A watched file's contents changed (or it appeared or vanished).
    Changed,
    /// SIGHUP: reload even if nothing seems to have changed.
    Hangup,
    /// The previous attempt was refused while the files were still changing: tried again once they
    /// settled.
    Retry,
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The new contents are in force.
    Applied,
    /// The new contents were refused; the old ones stay in force. The message says why, for the log.
    Refused(String),
}

/// How long files must stay unchanged after a refused reload before it is tried again: long enough for
/// a writer to finish, short enough that a fixed file is picked up at once.
const SETTLE: Duration = Duration::from_millis(200);

/// Spawns a task that calls `reload` (on the blocking pool) whenever one of `paths` changes, checked every
/// `interval`, and on SIGHUP when `on_hangup`. A refused reload is tried once more when the files have
/// stayed the same for a moment (200 ms) after it; if it is refused again, the error is logged and the next change
/// triggers the next attempt. The task ends when `reload` returns `Break` (its target is gone).
pub fn spawn<F>(paths: Vec<PathBuf>, interval: Duration, on_hangup: bool, reload: F)
where
    F: FnMut(Trigger) -> ControlFlow<(), Reload> + Send + 'static,
{
    // What the files hold now, read before this returns: the caller has just loaded them, and a change
    // made while the task waits for its first poll (a busy runtime) must count as a change, not as the
    // starting point. Small files, read once at start-up.
    let mut seen: Vec<Option<Vec<u8>>> =
        paths.iter().map(|path| std::fs::read(path).ok()).collect();
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
        let mut reload = Some(reload);
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
            if trigger == Trigger::Changed && now == seen {
                continue;
            }
            seen = now;
            let mut outcome = run(&mut reload, trigger).await;
            if let ControlFlow::Continue(Reload::Refused(_)) = outcome {
                // Caught mid-write? Once the files stop changing, try again.
                loop {
                    tokio::time::sleep(SETTLE).await;
                    let settled = contents(&paths).await;
                    if settled == seen {
                        break;
                    }
                    seen = settled;
                }
                outcome = run(&mut reload, Trigger::Retry).await;
            }
            match outcome {
                ControlFlow::Break(()) => return,
                ControlFlow::Continue(Reload::Applied) => {}
                ControlFlow::Continue(Reload::Refused(why)) => tracing::error!("{why}"),
            }
        }
    });
}

/// Runs `reload` on the blocking pool and hands it back for the next time. A reload that panicked is
/// gone; the task ends with it.
async fn run<F>(reload: &mut Option<F>, trigger: Trigger) -> ControlFlow<(), Reload>
where
    F: FnMut(Trigger) -> ControlFlow<(), Reload> + Send + 'static,
{
    let Some(mut f) = reload.take() else {
        return ControlFlow::Break(());
    };
    match tokio::task::spawn_blocking(move || {
        let outcome = f(trigger);
        (f, outcome)
    })
    .await
    {
        Ok((f, outcome)) => {
            *reload = Some(f);
            outcome
        }
        Err(e) => {
            tracing::error!("a reload failed and will not run again: {e}");
            ControlFlow::Break(())
        }
    }
}

async fn contents(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    let mut all = Vec::with_capacity(paths.len());
    for path in paths {
        all.push(tokio::fs::read(path).await.ok());
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher's task may first run well after `spawn` (a busy runtime): a change made in between is
    /// a change, not the starting point.
    #[tokio::test]
    async fn a_change_made_before_the_watcher_first_runs_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("certificate");
        std::fs::write(&path, "v1").unwrap();
        let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let file = path.clone();
        spawn(
            vec![path.clone()],
            Duration::from_millis(50),
            false,
            move |trigger| {
                let _ = events.send((trigger, std::fs::read_to_string(&file).unwrap()));
                ControlFlow::Continue(Reload::Applied)
            },
        );
        // This runtime has one thread and has not polled the watcher yet.
        std::fs::write(&path, "v2").unwrap();
        let (trigger, text) = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .expect("the change is reloaded")
            .unwrap();
        assert_eq!((trigger, text.as_str()), (Trigger::Changed, "v2"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_caught_half_written_is_retried_once_it_settles_never_half_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy");
        std::fs::write(&path, "v1 complete").unwrap();
        let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let file = path.clone();
        spawn(
            vec![path.clone()],
            Duration::from_millis(100),
            false,
            move |trigger| {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let outcome = if text.ends_with("complete") {
                    Reload::Applied
                } else {
                    Reload::Refused(format!("{text:?} is not complete"))
                };
                let _ = events.send((trigger, text, outcome.clone()));
                ControlFlow::Continue(outcome)
            },
        );
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(10), seen.recv())
                .await
                .expect("a reload within 10 s")
                .unwrap()
        };

        // Let the watcher read the files as they were first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A writer caught half-way: the reload is refused ...
        std::fs::write(&path, "v2 half").unwrap();
        let (trigger, text, outcome) = next().await;
        assert_eq!((trigger, text.as_str()), (Trigger::Changed, "v2 half"));
        assert!(matches!(outcome, Reload::Refused(_)));
        // ... and tried again once the file has settled, without waiting for another change to be seen.
        std::fs::write(&path, "v2 complete").unwrap();
        let (trigger, text, outcome) = next().await;
        assert_eq!(
            (trigger, text.as_str(), outcome),
            (Trigger::Retry, "v2 complete", Reload::Applied)
        );
    }
}
