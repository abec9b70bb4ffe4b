//! The log writer: a call appends its formatted line to a shared buffer in memory; a background thread
//! writes the buffer to stderr in one write, gathering for [`GATHER`] after the first line of a batch.
//!
//! What tracing-appender's non-blocking writer did instead: each line went through a channel to a writer
//! thread that woke for every burst of lines (a futex wake from the calling thread, the writer thread
//! spinning with `sched_yield` before it slept again) and wrote a burst of about five lines at a time.
//! Here the calling thread takes a lock and copies its line; it wakes the writer thread only when the
//! buffer was empty and the thread asleep, so at most once per batch; a batch of a busy server is
//! hundreds of lines. A line waits at most [`GATHER`] plus the write before it reaches stderr.
//!
//! Bounded as before: at most [`LOG_QUEUE_LINES`](super::LOG_QUEUE_LINES) lines wait; past that, lines
//! are dropped and counted (`cts.log.dropped_lines`) and a call never waits on stderr. Dropping the
//! [`WriterGuard`] writes out what is buffered, waiting at most [`SHUTDOWN_WAIT`].

use std::{
    io::{self, Write},
    mem,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer thread gathers lines after the first one of a batch before writing them.
pub(super) const GATHER: Duration = Duration::from_millis(5);

/// How long dropping the [`WriterGuard`] waits for the last batch to be written.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// A batch buffer larger than this is not kept for the next batch (after a burst).
const KEPT_CAPACITY: usize = 1 << 20;

/// Hands out writers that append to the shared buffer (one `write` per formatted line).
#[derive(Clone)]
pub(super) struct LogWriter {
    shared: Arc<Shared>,
}

/// Ends the writer thread when dropped, after it wrote out what was buffered.
pub(super) struct WriterGuard {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a line arrives in an empty buffer while the writer thread sleeps, and at shutdown.
    wake: Condvar,
    /// The most lines that may wait.
    max_lines: usize,
    dropped: AtomicUsize,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    lines: usize,
    /// The writer thread waits for a first line.
    asleep: bool,
    closed: bool,
}

impl LogWriter {
    /// A writer into `out` (stderr in the service) keeping at most `max_lines` lines waiting, and the
    /// guard that ends its thread.
    pub(super) fn spawn(
        out: impl Write + Send + 'static,
        max_lines: usize,
    ) -> io::Result<(LogWriter, WriterGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            max_lines,
            dropped: AtomicUsize::new(0),
        });
        let (done_tx, done) = mpsc::channel();
        let thread_shared = shared.clone();
        thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                write_batches(&thread_shared, out);
                let _ = done_tx.send(());
            })?;
        Ok((
            LogWriter {
                shared: shared.clone(),
            },
            WriterGuard { shared, done },
        ))
    }

    /// How many lines were dropped because the buffer was full.
    pub(super) fn dropped_lines(&self) -> usize {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left a buffer of whole lines: keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The writer thread: waits for a first line, gathers for [`GATHER`], writes the batch; until closed and
/// drained.
fn write_batches(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.buffer.is_empty() && !state.closed {
            state.asleep = true;
            state = shared
                .wake
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.asleep = false;
        }
        if !state.closed {
            drop(state);
            thread::sleep(GATHER);
            state = shared.lock();
        }
        mem::swap(&mut batch, &mut state.buffer);
        state.lines = 0;
        let closed = state.closed;
        drop(state);
        // Nothing to report a failed write to but stderr itself: the lines are lost, as with any logger.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEPT_CAPACITY {
            batch = Vec::new();
        }
        if closed {
            return;
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        // Bounded: stderr may be a pipe nobody reads any more.
        let _ = self.done.recv_timeout(SHUTDOWN_WAIT);
    }
}

/// One formatted line on its way into the buffer.
pub(super) struct Line<'a> {
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        if state.lines >= self.shared.max_lines || state.closed {
            drop(state);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            // Reported as written: a logger that fails a call because stderr is slow is worse.
            return Ok(line.len());
        }
        let first = state.buffer.is_empty();
        state.buffer.extend_from_slice(line);
        state.lines += 1;
        let wake = first && state.asleep;
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// What the writer thread wrote, and how many writes it took.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut sink = self.0.lock().unwrap();
            sink.0.extend_from_slice(bytes);
            sink.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn written(sink: &Sink) -> (String, usize) {
        let sink = sink.0.lock().unwrap();
        (String::from_utf8(sink.0.clone()).unwrap(), sink.1)
    }

    /// Waits (at most 5 s) until `sink` holds `expected`.
    fn wait_for(sink: &Sink, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while written(sink).0 != expected {
            assert!(Instant::now() < deadline, "{:?}", written(sink).0);
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn lines_arrive_in_order_in_one_write_per_batch() {
        let sink = Sink::default();
        let (writer, _guard) = LogWriter::spawn(sink.clone(), 100).unwrap();
        let mut expected = String::new();
        for i in 0..50 {
            let line = format!("line {i}\n");
            writer.make_writer().write_all(line.as_bytes()).unwrap();
            expected.push_str(&line);
        }
        wait_for(&sink, &expected);
        // The 50 lines came within the gathering time of the first: far fewer writes than lines.
        let (_, writes) = written(&sink);
        assert!(writes < 10, "{writes} writes for 50 lines");

        // A later line, after the thread went back to sleep, is woken for and written too.
        thread::sleep(GATHER * 4);
        writer.make_writer().write_all(b"later\n").unwrap();
        expected.push_str("later\n");
        wait_for(&sink, &expected);
    }

    #[test]
    fn past_the_bound_lines_are_dropped_and_counted() {
        // A sink that blocks until released, as a full pipe does.
        #[derive(Clone)]
        struct Blocked(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Blocked {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                let (released, signal) = &*self.0;
                let mut released = released.lock().unwrap();
                while !*released {
                    released = signal.wait(released).unwrap();
                }
                self.1.write(bytes)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (writer, guard) = LogWriter::spawn(Blocked(gate.clone(), sink.clone()), 3).unwrap();

        // The first line is taken into the batch the thread is stuck writing; then three fit and two
        // do not.
        writer.make_writer().write_all(b"0\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !writer.shared.lock().buffer.is_empty() {
            assert!(Instant::now() < deadline);
            thread::sleep(Duration::from_millis(1));
        }
        for line in ["1\n", "2\n", "3\n", "4\n", "5\n"] {
            writer.make_writer().write_all(line.as_bytes()).unwrap();
        }
        assert_eq!(writer.dropped_lines(), 2);

        let (released, signal) = &*gate;
        *released.lock().unwrap() = true;
        signal.notify_all();
        wait_for(&sink, "0\n1\n2\n3\n");
        // Room again once written.
        writer.make_writer().write_all(b"6\n").unwrap();
        wait_for(&sink, "0\n1\n2\n3\n6\n");
        drop(guard);
        assert_eq!(writer.dropped_lines(), 2);
    }

    #[test]
    fn dropping_the_guard_writes_out_what_is_buffered() {
        let sink = Sink::default();
        let (writer, guard) = LogWriter::spawn(sink.clone(), 100).unwrap();
        writer.make_writer().write_all(b"last words\n").unwrap();
        // At once, without waiting out the gathering time's worth of lines first.
        drop(guard);
        assert_eq!(written(&sink).0, "last words\n");
        // Nothing is taken after shutdown.
        writer.make_writer().write_all(b"too late\n").unwrap();
        assert_eq!(writer.dropped_lines(), 1);
    }
}
