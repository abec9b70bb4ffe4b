//! [`Caller`]: the internal service asking, and where its identity came from.

use std::{fmt, sync::Arc};

/// Who is calling: a SPIFFE id, DNS name, certificate CN, header value or the anonymous principal,
/// as the identity sources resolved it, with where it came from. Not secret: it names a service, not a
/// person.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Shared: a call clones its caller a few times (door, audit, policy), a reference count each.
    id: Arc<str>,
    source: Option<CallerSource>,
}

/// Where a caller's identity came from, so logs and audits can tell a verified SPIFFE id from a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallerSource {
    /// A verified client certificate's URI SAN.
    UriSan,
    /// A verified client certificate's DNS SAN.
    DnsSan,
    /// A verified client certificate's subject CN.
    CommonName,
    /// The `URI=` of a trusted sidecar's `x-forwarded-client-cert` header.
    Xfcc,
    /// A plain header anyone can set.
    Header,
    /// An access key's principal, from a verified SigV4 signature on an HTTP API request.
    Sigv4,
    /// No source identified the caller; the configured anonymous principal.
    Anonymous,
}

impl CallerSource {
    /// The source's name in logs and spans.
    pub fn name(self) -> &'static str {
        match self {
            CallerSource::UriSan => "uri_san",
            CallerSource::DnsSan => "dns_san",
            CallerSource::CommonName => "common_name",
            CallerSource::Xfcc => "xfcc",
            CallerSource::Header => "header",
            CallerSource::Sigv4 => "sigv4",
            CallerSource::Anonymous => "anonymous",
        }
    }
}

impl Caller {
    /// A caller known by `id` from outside any request (tests, examples): no source is recorded.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Caller {
            id: id.into(),
            source: None,
        }
    }

    /// A caller a request identified as `id` through `source`.
    pub fn with_source(id: impl Into<Arc<str>>, source: CallerSource) -> Self {
        Caller {
            id: id.into(),
            source: Some(source),
        }
    }

    /// The caller's id, e.g. `spiffe://cluster.local/ns/chat/sa/web`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the id came from; `None` for callers built with [`Caller::new`].
    pub fn source(&self) -> Option<CallerSource> {
        self.source
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}
