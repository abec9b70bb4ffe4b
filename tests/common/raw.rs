//! gRPC over one raw HTTP/2 connection (the h2 crate, no tonic): what the server does on the wire, with
//! no client timer, retry or reconnection in between.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::net::TcpStream;
use tonic::Code;

use super::within;

/// One HTTP/2 connection to the server; its driver runs on a task whose end is the connection's end.
pub struct RawConnection {
    pub send: h2::client::SendRequest<Bytes>,
    pub driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
    addr: SocketAddr,
}

impl RawConnection {
    pub async fn open(addr: SocketAddr) -> RawConnection {
        let tcp = within("a TCP connection", TcpStream::connect(addr))
            .await
            .unwrap();
        let (send, connection) = within("the HTTP/2 handshake", h2::client::handshake(tcp))
            .await
            .unwrap();
        RawConnection {
            send,
            driver: tokio::spawn(connection),
            addr,
        }
    }

    /// The headers of a gRPC call to `path`, with `extra` headers.
    pub fn head(&self, path: &str, extra: &[(&str, &str)]) -> http::Request<()> {
        grpc_head(self.addr, path, extra)
    }

    /// Sends a unary call to `path` carrying `message`, on this connection; its status and message.
    pub async fn unary(
        &mut self,
        path: &str,
        extra: &[(&str, &str)],
        message: &impl prost::Message,
    ) -> (Code, String) {
        let head = self.head(path, extra);
        let mut send = within("a stream of the connection", self.send.clone().ready())
            .await
            .unwrap();
        let (response, mut body) = send.send_request(head, false).unwrap();
        body.send_data(frame(message), true).unwrap();
        status(response).await
    }
}

/// The headers of a gRPC call to `path` on `addr`, with `extra` headers.
pub fn grpc_head(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

/// `message` in gRPC's length-prefixed framing, uncompressed.
pub fn frame(message: &impl prost::Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut framed = Vec::with_capacity(encoded.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&u32::try_from(encoded.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&encoded);
    framed.into()
}

/// The gRPC status and message of `response`: its trailers-only headers, or its trailers.
pub async fn status(response: h2::client::ResponseFuture) -> (Code, String) {
    within("the server's answer", async {
        let response = response.await.unwrap();
        let of = |headers: &http::HeaderMap| {
            headers.get("grpc-status").map(|code| {
                let message = headers
                    .get("grpc-message")
                    .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
                    .unwrap_or_default();
                (Code::from_bytes(code.as_bytes()), message)
            })
        };
        if let Some(status) = of(response.headers()) {
            return status;
        }
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            let _ = body.flow_control().release_capacity(data.len());
        }
        let trailers = body.trailers().await.unwrap().expect("trailers");
        of(&trailers).expect("a grpc-status trailer")
    })
    .await
}
