//! GETs of discovery documents and JWK sets: HTTPS with the system's roots (plain HTTP only to loopback,
//! as the configuration allows), no redirects followed, bounded in time and size.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// Why a fetch failed: for the log, never holding what the server sent.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTPS client cannot be made: the system's root certificates cannot be loaded.
    #[error("cannot load the system's root certificates: {0}")]
    Roots(std::io::Error),
    /// Nothing answered within the fetch timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection or the request failed.
    #[error("request failed: {0}")]
    Request(String),
    /// The server answered something other than 200 (redirects are not followed).
    #[error("HTTP status {0}")]
    Status(http::StatusCode),
    /// The body is larger than allowed.
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not what was asked for.
    #[error("{0}")]
    Invalid(String),
}

/// Fetches small JSON documents.
#[derive(Clone)]
pub struct Fetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
    max_bytes: usize,
}

impl Fetcher {
    /// A fetcher giving each GET `timeout` (connect to last byte) and at most `max_bytes` of body.
    pub fn new(timeout: Duration, max_bytes: usize) -> Result<Self, FetchError> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(FetchError::Roots)?
            // Plain http:// is only ever configured for loopback (config::FetchUrl).
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(connector);
        Ok(Fetcher {
            client,
            timeout,
            max_bytes,
        })
    }

    /// The body of `uri`, when it answers 200 within the bounds.
    pub async fn get(&self, uri: &http::Uri) -> Result<Bytes, FetchError> {
        tokio::time::timeout(self.timeout, self.get_unbounded_in_time(uri))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
    }

    async fn get_unbounded_in_time(&self, uri: &http::Uri) -> Result<Bytes, FetchError> {
        let request = http::Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| FetchError::Request(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| FetchError::Request(error_chain(&e)))?;
        if response.status() != http::StatusCode::OK {
            return Err(FetchError::Status(response.status()));
        }
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_bytes as u64) {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        Limited::new(response.into_body(), self.max_bytes)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    FetchError::TooLarge(self.max_bytes)
                } else {
                    FetchError::Request(e.to_string())
                }
            })
    }
}

/// An error and its causes on one line: hyper's own message alone says little ("client error").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
