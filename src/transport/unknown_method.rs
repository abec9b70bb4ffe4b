//! Answers a gRPC call to a method this server does not serve before any service sees it:
//! UNIMPLEMENTED with `google.rpc.ErrorInfo` reason `UNKNOWN_METHOD`, like every other error (tonic's
//! generated services answer an unknown method of their own with no details). Calls to health and
//! reflection, and everything that is not gRPC, pass through.
//!
//! It sits inside [`super::trace`], so such a call still gets its span and measurement (`_OTHER`).

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};

use super::trace::is_unknown_grpc_method;
use crate::rescue::unknown_method;

/// See the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnknownMethodLayer;

impl<S> tower::Layer<S> for UnknownMethodLayer {
    type Service = UnknownMethod<S>;

    fn layer(&self, inner: S) -> UnknownMethod<S> {
        UnknownMethod { inner }
    }
}

/// See [`UnknownMethodLayer`].
#[derive(Clone, Debug)]
pub struct UnknownMethod<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for UnknownMethod<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<http::Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if is_unknown_grpc_method(request.uri().path(), request.headers()) {
            Either::Right(ready(Ok(unknown_method().into_http())))
        } else {
            Either::Left(self.inner.call(request))
        }
    }
}
