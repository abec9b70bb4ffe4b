use super::first_request::*;
use super::*;

#[test]
fn the_log_throttle_admits_one_line_per_period_and_counts_the_rest() {
    let throttle = LogThrottle::new();
    assert_eq!(throttle.admit(), Some(0), "the first line is written");
    assert_eq!(throttle.admit(), None);
    assert_eq!(throttle.admit(), None);
    assert_eq!(throttle.suppressed.load(Ordering::Relaxed), 2);
    // A later line than this thread's clock reading, stored by another thread, is no underflow.
    throttle.last.store(u64::MAX, Ordering::Relaxed);
    assert_eq!(throttle.admit(), None);
}

/// An HTTP/2 frame: header and `payload`.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags, 0, 0, 0, 1];
    frame.extend_from_slice(payload);
    frame
}

#[test]
fn an_http2_connection_has_its_first_request_once_a_header_block_ends() {
    let settings = frame(0x4, 0, &[0; 12]);
    let ping = frame(0x6, 0, &[0; 8]);
    let headers = frame(HEADERS, 0, &[1, 2, 3]);
    let continuation = frame(CONTINUATION, END_HEADERS, &[4]);
    let mut stream = PREFACE.to_vec();
    for frame in [&settings, &ping, &ping, &headers] {
        stream.extend_from_slice(frame);
    }
    // Byte by byte, and all at once: never before the CONTINUATION that ends the block.
    let mut first = FirstRequest::Start;
    for byte in &stream {
        assert!(!first.feed(&[*byte]), "not a request yet: {first:?}");
    }
    for (i, byte) in continuation.iter().enumerate() {
        assert_eq!(first.feed(&[*byte]), i == continuation.len() - 1);
    }
    let mut whole = FirstRequest::Start;
    assert!(!whole.feed(&stream));
    assert!(whole.feed(&continuation));

    let mut only_preface = FirstRequest::Start;
    assert!(!only_preface.feed(PREFACE));
    let mut one_frame = FirstRequest::Start;
    let mut request = PREFACE.to_vec();
    request.extend_from_slice(&frame(HEADERS, END_HEADERS | 0x1, &[]));
    assert!(
        one_frame.feed(&request),
        "an empty header block ends at once"
    );
}

#[test]
fn an_http1_connection_has_its_first_request_once_its_head_ends() {
    for head in [
        &b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"PRIVATE / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: \r\r\n\r\n",
    ] {
        let mut first = FirstRequest::Start;
        assert!(!first.feed(&head[..head.len() - 1]), "{head:?}");
        assert!(first.feed(&head[head.len() - 1..]), "{head:?}");
        let mut bytewise = FirstRequest::Start;
        let ends: Vec<bool> = head.iter().map(|b| bytewise.feed(&[*b])).collect();
        assert_eq!(
            ends.iter().position(|e| *e),
            Some(head.len() - 1),
            "{head:?}"
        );
    }
}

#[test]
fn only_resource_exhaustion_pauses_the_accept_loop() {
    for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
        assert!(is_out_of_resources(&io::Error::from_raw_os_error(errno)));
    }
    assert!(!is_out_of_resources(&io::Error::from_raw_os_error(
        libc::ECONNABORTED
    )));
}
