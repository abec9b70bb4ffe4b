//! Telling when a connection's first request has arrived, from the bytes as they are read: the HTTP/2
//! preface and frames up to the end of the first header block, or an HTTP/1.1 head up to its blank line.

/// The HTTP/2 connection preface.
pub(super) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/2 frame header: length (3 bytes), type, flags, stream id (4 bytes).
pub(super) const FRAME_HEADER_BYTES: usize = 9;
/// The HTTP/2 frame types that carry a header block, and the flag that ends one.
pub(super) const HEADERS: u8 = 0x1;
pub(super) const CONTINUATION: u8 = 0x9;
pub(super) const END_HEADERS: u8 = 0x4;

/// How much of a connection's first request has arrived: enough of HTTP/2's framing, or of an HTTP/1.1
/// head, to tell when the first call's headers are whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FirstRequest {
    /// Nothing yet.
    Start,
    /// This many bytes of the HTTP/2 preface.
    Preface(usize),
    /// This many bytes of an HTTP/2 frame header.
    FrameHeader {
        header: [u8; FRAME_HEADER_BYTES],
        seen: usize,
    },
    /// An HTTP/2 frame's payload still to come, and whether it ends the first header block.
    Payload {
        remaining: usize,
        ends_headers: bool,
    },
    /// An HTTP/1.1 head, and how much of its closing `\r\n\r\n` was last seen.
    Head(usize),
    /// The first request's headers are whole.
    Arrived,
}

impl FirstRequest {
    pub(super) fn arrived(&self) -> bool {
        *self == FirstRequest::Arrived
    }

    /// Reads `data`; `true` once the first request's headers are whole.
    pub(super) fn feed(&mut self, data: &[u8]) -> bool {
        let mut data = data;
        while !data.is_empty() && !self.arrived() {
            data = self.step(data);
        }
        self.arrived()
    }

    /// Moves on by at least one byte of `data`; returns the rest.
    fn step<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        match *self {
            FirstRequest::Start => {
                *self = if data[0] == PREFACE[0] {
                    FirstRequest::Preface(0)
                } else {
                    FirstRequest::Head(0)
                };
                data
            }
            FirstRequest::Preface(seen) => {
                if data[0] != PREFACE[seen] {
                    // Not HTTP/2 after all (`POST …`): read what came so far as an HTTP/1.1 head.
                    *self = FirstRequest::Head(0);
                    self.feed(&PREFACE[..seen]);
                    return data;
                }
                *self = if seen + 1 == PREFACE.len() {
                    FirstRequest::FrameHeader {
                        header: [0; FRAME_HEADER_BYTES],
                        seen: 0,
                    }
                } else {
                    FirstRequest::Preface(seen + 1)
                };
                &data[1..]
            }
            FirstRequest::FrameHeader { mut header, seen } => {
                let take = (FRAME_HEADER_BYTES - seen).min(data.len());
                header[seen..seen + take].copy_from_slice(&data[..take]);
                *self = if seen + take < FRAME_HEADER_BYTES {
                    FirstRequest::FrameHeader {
                        header,
                        seen: seen + take,
                    }
                } else {
                    let length = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let kind = header[3];
                    let ends_headers =
                        matches!(kind, HEADERS | CONTINUATION) && header[4] & END_HEADERS != 0;
                    FirstRequest::Payload {
                        remaining: length,
                        ends_headers,
                    }
                    .after_payload(0)
                };
                &data[take..]
            }
            FirstRequest::Payload {
                remaining,
                ends_headers,
            } => {
                let take = remaining.min(data.len());
                *self = FirstRequest::Payload {
                    remaining,
                    ends_headers,
                }
                .after_payload(take);
                &data[take..]
            }
            FirstRequest::Head(matched) => {
                const END: &[u8] = b"\r\n\r\n";
                let byte = data[0];
                let matched = if byte == END[matched] {
                    matched + 1
                } else if byte == b'\r' {
                    1
                } else {
                    0
                };
                *self = if matched == END.len() {
                    FirstRequest::Arrived
                } else {
                    FirstRequest::Head(matched)
                };
                &data[1..]
            }
            FirstRequest::Arrived => &data[data.len()..],
        }
    }

    /// A frame payload with `read` more bytes of it read: the next frame, or the first request.
    fn after_payload(self, read: usize) -> Self {
        let FirstRequest::Payload {
            remaining,
            ends_headers,
        } = self
        else {
            return self;
        };
        match remaining - read {
            0 if ends_headers => FirstRequest::Arrived,
            0 => FirstRequest::FrameHeader {
                header: [0; FRAME_HEADER_BYTES],
                seen: 0,
            },
            remaining => FirstRequest::Payload {
                remaining,
                ends_headers,
            },
        }
    }
}
