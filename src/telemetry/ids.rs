//! The trace and span ids of a call on its JSON log lines, as flat top-level fields `trace_id` and
//! `span_id` (the OpenTelemetry log data model's names), where log collectors look for them to link a
//! line to its trace. tracing-subscriber's JSON format writes span fields only inside `span`/`spans`.
//!
//! The transport tags each call's span with its ids ([`tag_call`]); [`FlatIds`] wraps the JSON format and
//! adds the ids of the nearest tagged span to every line written inside it. `span_id` is the call's
//! server span, present only when spans are exported (without export there is no span to point at).

use std::{cell::RefCell, fmt};

use opentelemetry::trace::{SpanId, TraceId};
use tracing::{Event, Span, Subscriber};
use tracing_subscriber::{
    Registry,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// A call's ids, kept in its span's extensions.
#[derive(Clone, Copy, Debug)]
struct CallIds {
    trace_id: TraceId,
    span_id: Option<SpanId>,
}

/// Tags `span` (a call's server span) with the ids its JSON log lines carry. Does nothing when `span` is
/// disabled or no subscriber of this module's making is installed.
pub(crate) fn tag_call(span: &Span, trace_id: TraceId, span_id: Option<SpanId>) {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<Registry>()
            && let Some(span) = registry.span(id)
        {
            span.extensions_mut().insert(CallIds { trace_id, span_id });
        }
    });
}

/// A JSON event format with the call's `trace_id` and `span_id` added as top-level fields.
pub struct FlatIds<F>(pub F);

thread_local! {
    /// Where a line is formatted before the ids are added: one buffer per thread, reused.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

impl<S, N, F> FormatEvent<S, N> for FlatIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let ids = ctx.event_scope().and_then(|scope| {
            scope
                .from_root()
                .find_map(|span| span.extensions().get::<CallIds>().copied())
        });
        let Some(ids) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                // Formatting a line while formatting another on this thread: without the ids.
                return self.0.format_event(ctx, writer, event);
            };
            line.clear();
            self.0.format_event(ctx, Writer::new(&mut *line), event)?;
            // One JSON object, then the line's end: the ids go in before its closing brace.
            let object = line.trim_end();
            let Some(open) = object.strip_suffix('}') else {
                return writer.write_str(&line);
            };
            write!(writer, "{open},\"trace_id\":\"{}\"", ids.trace_id)?;
            if let Some(span_id) = ids.span_id {
                write!(writer, ",\"span_id\":\"{span_id}\"")?;
            }
            writer.write_str("}")?;
            writer.write_str(&line[object.len()..])
        })
    }
}
