//! The text log line without colour, written with less machinery than tracing-subscriber's defaults and
//! byte for byte the same: [`PlainLine`] writes the line, [`PlainFields`] formats span and event fields
//! (a span's once, when it is made), [`UtcMicros`] the timestamp. Used when stderr is not a terminal, which is where a busy server's
//! lines go; a terminal keeps tracing-subscriber's own formatters and their colours.
//!
//! What the defaults spend per field is `write!` over three painted pieces (name, `=`, value), each
//! painted with a style that, without colour, writes nothing around them. Here the name and `=` are
//! written as they are, strings that need no escaping between quotes, integers with `itoa`, booleans as
//! words; anything else (messages, errors, `r#` names, values given with `%` or `?`) goes through
//! tracing-subscriber's own `DefaultVisitor` or the value's `Debug`, as before.

use std::{
    cell::RefCell,
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{
    Event, Level, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    field::{RecordFields, VisitOutput},
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{DefaultVisitor, Writer},
        time::FormatTime,
    },
    registry::LookupSpan,
};

/// Fields as tracing-subscriber's `DefaultFields` formats them without colour.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    /// Formats into this thread's scratch buffer, then writes the whole into `writer` at once. A span's
    /// fields go into a `String` of their own that starts empty: written field by field it was
    /// reallocated five or six times a span, about a tenth of what a call's two spans cost.
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        if writer.has_ansi_escapes() {
            // Never the case here (PlainFields is for output without colour), but a scratch `Writer`
            // could not carry the flag: write directly.
            return format_plain(writer, fields);
        }
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => {
                scratch.clear();
                let result = format_plain(Writer::new(&mut *scratch), fields)
                    .and_then(|()| writer.write_str(&scratch));
                if scratch.capacity() > SCRATCH_KEPT {
                    // One huge value should not hold its buffer for the thread's life.
                    *scratch = String::new();
                }
                result
            }
            // A field's `Debug` that logs while it is being formatted: write that one directly.
            Err(_) => format_plain(writer, fields),
        })
    }
}

thread_local! {
    /// See [`PlainFields::format_fields`].
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// The largest scratch buffer a thread keeps between uses.
const SCRATCH_KEPT: usize = 4096;

fn format_plain<R: RecordFields>(writer: Writer<'_>, fields: R) -> fmt::Result {
    let mut visitor = PlainVisitor {
        writer,
        empty: true,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    /// Nothing written yet: no space before the next field.
    empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes the space before a field but the first.
    fn pad(&mut self) -> fmt::Result {
        if self.empty {
            self.empty = false;
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    /// Whether `name=value` is how the default visitor writes this field (not the message, not a raw
    /// identifier, not log metadata).
    fn plain(field: &Field) -> bool {
        let name = field.name();
        name != "message" && !name.starts_with("r#") && !name.starts_with("log.")
    }

    /// `name=` then `value`, as the default visitor writes a plain field.
    fn write(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .pad()
            .and_then(|()| self.writer.write_str(field.name()))
            .and_then(|()| self.writer.write_char('='))
            .and_then(|()| value(&mut self.writer));
    }

    /// Anything else, through tracing-subscriber's own visitor (which writes the space this one owes).
    fn delegate(&mut self, visit: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.empty);
        visit(&mut default);
        self.result = default.finish();
        // It writes every field: the log metadata it would skip exists only with tracing-subscriber's
        // tracing-log feature, which is off.
        self.empty = false;
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // `{:?}` of a string of printable ASCII without quotes or backslashes is that string, quoted.
        if Self::plain(field)
            && value
                .bytes()
                .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.write(field, |writer| {
                writer.write_char('"')?;
                writer.write_str(value)?;
                writer.write_char('"')
            });
        } else {
            self.delegate(|default| default.record_str(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if Self::plain(field) {
            self.write(field, |writer| {
                writer.write_str(if value { "true" } else { "false" })
            });
        } else {
            self.delegate(|default| default.record_bool(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if Self::plain(field) {
            self.write(field, |writer| {
                writer.write_str(itoa::Buffer::new().format(value))
            });
        } else {
            self.delegate(|default| default.record_i64(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if Self::plain(field) {
            self.write(field, |writer| {
                writer.write_str(itoa::Buffer::new().format(value))
            });
        } else {
            self.delegate(|default| default.record_u64(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(|default| default.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if Self::plain(field) {
            self.write(field, |writer| write!(writer, "{value:?}"));
        } else {
            self.delegate(|default| default.record_debug(field, value));
        }
    }
}

/// The whole line as tracing-subscriber's `Full` format writes it without colour: time, level (right
/// aligned in five), each span from the root with its formatted fields, the target, the event's fields.
/// Written piece by piece instead of through `write!` over painted pieces.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PlainLine<T> {
    timer: T,
}

impl<T> PlainLine<T> {
    pub(super) fn with_timer(timer: T) -> Self {
        PlainLine { timer }
    }
}

impl<S, N, T> FormatEvent<S, N> for PlainLine<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if self.timer.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    writer.write_char('{')?;
                    writer.write_str(fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

/// The time as tracing-subscriber's `SystemTime` timer writes it: RFC 3339 in UTC with microseconds
/// (`2026-12-04T20:49:29.527439Z`), from humantime's formatter, which fills one buffer instead of a
/// `write!` per part.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct UtcMicros;

impl FormatTime for UtcMicros {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now();
        match now.duration_since(UNIX_EPOCH) {
            // humantime's range: from 1970 to the end of year 9999.
            Ok(since) if since.as_secs() < 253_402_300_800 => {
                write!(writer, "{}", humantime::format_rfc3339_micros(now))
            }
            _ => tracing_subscriber::fmt::time::SystemTime.format_time(writer),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt};

    use super::*;

    /// Everything written to it, shared.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// A timer that always writes the same time, so two runs can be compared byte for byte.
    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
            writer.write_str("T")
        }
    }

    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner \"cause\"")
        }
    }
    impl std::error::Error for Inner {}

    #[derive(Debug)]
    struct Outer(Inner);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// A value that logs while it is being formatted.
    struct Chatty;
    impl fmt::Debug for Chatty {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            tracing::info!(inside = "a field", "logged while formatting");
            f.write_str("chatty")
        }
    }

    /// Events of every shape the service logs, and some it does not.
    fn log_everything() {
        let outer = tracing::info_span!(
            "grpc.server",
            rpc.method = "ivschat.v1.TokenService/CreateChatToken",
            trace_id = %"6c096bef8a5e9d9da4a49751d47512e6",
            rpc.status_code = tracing::field::Empty,
        );
        let _outer = outer.enter();
        let audit = tracing::info_span!(
            target: "audit",
            "audit",
            caller = %"spiffe://cluster.local/ns/chat/sa/web",
            caller_source = Some("header"),
            capabilities = ?["SEND_MESSAGE", "DELETE_MESSAGE"],
            session_minutes = 60i64,
            issuer = "local",
            end_user_bound = false,
            end_user_issuer = None::<&str>,
            unsigned = 7u64,
            r#type = "raw",
        );
        audit.in_scope(|| {
            tracing::info!(target: "audit", outcome = "issued", token_id_hash = %"9812ebdbe781", "token issued");
            tracing::warn!(quoted = "a \"b\" \\ c", tab = "a\tb", unicode = "zoë ✓", empty = "", "odd strings");
            tracing::warn!(negative = -5i64, float = 1.5f64, big = u128::MAX, flag = true, "numbers");
            let error = Outer(Inner);
            tracing::error!(error = &error as &(dyn std::error::Error + 'static), "with a source");
            tracing::error!(error = &Inner as &(dyn std::error::Error + 'static), "without one");
            tracing::info!("message \u{1b}[31m with an escape");
            tracing::info!(message = "a message given as a field");
        });
        // Fields recorded after the span was made, one of them longer than the scratch buffer keeps.
        outer.record("rpc.status_code", 0u64);
        let long = "x".repeat(SCRATCH_KEPT + 1);
        let grown = tracing::info_span!("grown", long = long.as_str(), short = 1u64);
        grown.in_scope(|| tracing::info!("in a span with a long field"));
        let chatty = tracing::info_span!("chatty", value = ?Chatty, after = "it");
        chatty.in_scope(|| tracing::info!(value = ?Chatty, "a field that logs"));
        tracing::info!(later = 1u64);
        tracing::debug!(level = "debug");
        tracing::trace!(level = "trace");
    }

    fn captured(
        layer: impl FnOnce(
            Captured,
        ) -> Box<
            dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync,
        >,
    ) -> String {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry().with(layer(out.clone()));
        tracing::subscriber::with_default(subscriber, log_everything);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_are_byte_for_byte_those_of_the_default_formatter() {
        let default = captured(|out| {
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(out)
                    .with_ansi(false)
                    .with_timer(Fixed),
            )
        });
        let plain_fields = captured(|out| {
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(out)
                    .with_ansi(false)
                    .fmt_fields(PlainFields)
                    .with_timer(Fixed),
            )
        });
        let plain = captured(|out| {
            Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(out)
                    .with_ansi(false)
                    .fmt_fields(PlainFields)
                    .event_format(PlainLine::with_timer(Fixed)),
            )
        });
        // Chatty's own event is not there: tracing drops events made inside the subscriber.
        assert_eq!(default.lines().count(), 12, "{default}");
        assert!(default.contains("rpc.status_code=0}"), "{default}");
        assert!(default.contains(&format!(
            "grown{{long=\"{}\" short=1}}",
            "x".repeat(SCRATCH_KEPT + 1)
        )));
        assert!(
            default.contains("chatty{value=chatty after=\"it\"}"),
            "{default}"
        );
        assert!(default.contains("token_id_hash=9812ebdbe781"), "{default}");
        assert!(default.contains("T  WARN "), "{default}");
        assert!(default.contains("T ERROR "), "{default}");
        assert!(default.contains("T TRACE "), "{default}");
        assert_eq!(plain_fields, default);
        assert_eq!(plain, default);
    }

    #[test]
    fn the_time_is_written_as_the_default_timer_writes_it() {
        for _ in 0..3 {
            let mut ours = String::new();
            UtcMicros.format_time(&mut Writer::new(&mut ours)).unwrap();
            let mut theirs = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
            assert_eq!(ours.len(), "2026-12-04T20:49:29.527439Z".len());
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            // The same second, unless one crossed into the next between the two.
            if ours[..19] == theirs[..19] {
                return;
            }
        }
        panic!("the two timers never agreed to the second");
    }
}
