use super::*;
use http_body_util::BodyExt;
use std::convert::Infallible;
use tower::{Layer, ServiceExt};

/// A gRPC message frame (prefix and `len` payload bytes).
fn message(len: usize) -> bytes::Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.resize(5 + len, 7);
    frame.into()
}

fn token_call(body: tonic::body::Body) -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .uri("/ivschat.v1.TokenService/CreateChatToken")
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap()
}

fn health_check() -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .uri("/grpc.health.v1.Health/Check")
        .body(tonic::body::Body::empty())
        .unwrap()
}

/// Reads the request body as tonic's decoder would, answering with the status it ends in (or OK).
fn service(
    calls: &Calls,
) -> impl tower::Service<
    http::Request<tonic::body::Body>,
    Response = http::Response<InFlightBody<String>>,
    Error = Infallible,
> + Clone {
    InFlightLayer::new(calls.clone()).layer(tower::service_fn(
        |request: http::Request<tonic::body::Body>| async {
            let answer = match request.into_body().collect().await {
                Ok(_) => "ok".to_string(),
                Err(status) => format!("{:?}", status.code()),
            };
            Ok::<_, Infallible>(http::Response::new(answer))
        },
    ))
}

async fn send<S>(service: &mut S, request: http::Request<tonic::body::Body>) -> S::Response
where
    S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>,
{
    service.ready().await.unwrap().call(request).await.unwrap()
}

/// What the inner service answered, or the status of a refusal made before it.
async fn answer(response: http::Response<InFlightBody<String>>) -> String {
    let status = response.headers().get("grpc-status").cloned();
    match response.into_body().inner {
        Either::Left(answer) => answer,
        Either::Right(_) => {
            let code = tonic::Code::from_bytes(status.expect("a refusal has a status").as_bytes());
            format!("{code:?}")
        }
    }
}

/// The defaults, with `max_calls` places.
fn limits(max_calls: usize) -> Calls {
    Calls::new(CallLimits {
        max_calls,
        ..CallLimits::default()
    })
}

fn poll_once<F: Future>(future: &mut Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    future.as_mut().poll(&mut cx)
}

#[tokio::test]
async fn a_call_counts_until_its_body_is_dropped() {
    let calls = limits(10);
    let mut service = service(&calls);
    let response = send(
        &mut service,
        token_call(tonic::body::Body::new(
            http_body_util::Full::new(message(3)).map_err(|e| match e {}),
        )),
    )
    .await;
    assert_eq!((calls.in_flight(), calls.capped()), (1, 1));
    assert!(
        calls.request_bytes() > 3,
        "the head and the message are held"
    );

    let idle = calls.idle();
    let mut idle = std::pin::pin!(idle);
    assert!(poll_once(&mut idle).is_pending());
    drop(response);
    assert_eq!((calls.in_flight(), calls.capped()), (0, 0));
    assert_eq!(calls.request_bytes(), 0);
    assert!(poll_once(&mut idle).is_ready());
}

#[tokio::test]
async fn calls_past_the_request_byte_budget_are_shed_and_health_checks_are_not() {
    let calls = Calls::new(CallLimits {
        request_bytes: 1000,
        ..CallLimits::default()
    });
    let mut service = service(&calls);
    let call = |len| {
        token_call(tonic::body::Body::new(
            http_body_util::Full::new(message(len)).map_err(|e| match e {}),
        ))
    };
    let head = head_bytes(call(0).headers());
    // One byte short of the budget, then one past it: the first is admitted, the second shed.
    let fits = send(&mut service, call(1000 - head - 1)).await;
    assert_eq!(calls.request_bytes(), 999);
    let past = send(&mut service, call(1)).await;
    assert_eq!(answer(past).await, "Unavailable");
    assert_eq!(calls.request_bytes(), 999, "a shed call holds nothing");
    let health = send(&mut service, health_check()).await;
    assert_eq!(answer(health).await, "ok");
    drop(fits);
    assert_eq!(calls.request_bytes(), 0);
    let exactly = send(&mut service, call(1000 - head)).await;
    assert_eq!(answer(exactly).await, "ok");
}

#[tokio::test]
async fn streaming_calls_are_capped_per_connection_and_in_total() {
    let calls = Calls::new(CallLimits {
        max_streams: 3,
        max_streams_per_connection: 2,
        ..CallLimits::default()
    });
    let mut service = service(&calls);
    let (one, two) = (ConnInfo::for_tests(), ConnInfo::for_tests());
    let watch = |conn: &ConnInfo| {
        let mut request = http::Request::builder()
            .uri("/grpc.health.v1.Health/Watch")
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap();
        request.extensions_mut().insert(conn.clone());
        request
    };
    let a = send(&mut service, watch(&one)).await;
    let _b = send(&mut service, watch(&one)).await;
    let third_on_one = send(&mut service, watch(&one)).await;
    assert_eq!(answer(third_on_one).await, "Unavailable");
    let _c = send(&mut service, watch(&two)).await;
    let fourth = send(&mut service, watch(&two)).await;
    assert_eq!(answer(fourth).await, "Unavailable", "three in total");
    drop(a);
    let again = send(&mut service, watch(&one)).await;
    assert_eq!(answer(again).await, "ok");
}

#[tokio::test]
async fn token_calls_over_the_cap_are_shed_with_unavailable_but_health_checks_are_not() {
    let calls = limits(2);
    let mut service = service(&calls);
    let full = || {
        token_call(tonic::body::Body::new(
            http_body_util::Full::new(message(10)).map_err(|e| match e {}),
        ))
    };
    let first = send(&mut service, full()).await;
    let _second = send(&mut service, full()).await;

    let shed = send(&mut service, full()).await;
    assert_eq!(calls.capped(), 2, "a shed call takes no place");
    assert_eq!(answer(shed).await, "Unavailable");

    let health = send(&mut service, health_check()).await;
    assert_eq!(answer(health).await, "ok");

    drop(first);
    let admitted = send(&mut service, full()).await;
    assert_eq!(answer(admitted).await, "ok");
}

#[tokio::test]
async fn a_token_call_takes_a_place_only_once_its_whole_message_has_arrived() {
    let calls = limits(1);
    let mut service = service(&calls);
    // A body that sends the prefix and part of the message, then waits.
    let (sender, body) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let whole = message(100);
    let stream =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(body), |data| {
            Ok::<_, tonic::Status>(http_body::Frame::data(data))
        });
    let mut slow_service = service.clone();
    let slow = async {
        let request = token_call(tonic::body::Body::new(http_body_util::StreamBody::new(
            stream,
        )));
        answer(send(&mut slow_service, request).await).await
    };
    let mut slow = std::pin::pin!(slow);
    sender.send(whole.slice(..3)).await.unwrap();
    sender.send(whole.slice(3..50)).await.unwrap();
    assert!(poll_once(&mut slow).is_pending());
    assert_eq!(calls.capped(), 0, "a partial message takes no place");
    assert_eq!(calls.in_flight(), 1, "but the call is counted for draining");

    // Another call gets the only place meanwhile.
    let other = send(
        &mut service,
        token_call(tonic::body::Body::new(
            http_body_util::Full::new(message(1)).map_err(|e| match e {}),
        )),
    )
    .await;
    assert_eq!(calls.capped(), 1);

    // The slow call's message completes while the place is taken: shed.
    sender.send(whole.slice(50..)).await.unwrap();
    drop(sender);
    let Poll::Ready(slow) = poll_once(&mut slow) else {
        panic!("the whole message has arrived")
    };
    assert_eq!(slow, "Unavailable");
    drop(other);
    assert_eq!((calls.in_flight(), calls.capped()), (0, 0));
}

#[test]
fn message_progress_reads_the_length_across_frames() {
    let whole = message(300);
    let mut progress = MessageProgress::default();
    assert!(!progress.feed(whole.slice(..2)));
    assert!(!progress.feed(whole.slice(2..6)));
    assert!(!progress.feed(whole.slice(6..304)));
    assert!(progress.feed(whole.slice(304..)));
    let mut empty = MessageProgress::default();
    assert!(
        empty.feed(message(0)),
        "an empty message is whole at its prefix"
    );
}

#[tokio::test]
async fn idle_is_immediate_with_nothing_in_flight() {
    let calls = limits(1);
    let idle = calls.idle();
    let mut idle = std::pin::pin!(idle);
    assert!(poll_once(&mut idle).is_ready());
}
