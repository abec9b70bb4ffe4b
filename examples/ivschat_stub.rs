//! Runs the IVS Chat stub on its own, for the local stack and manual testing:
//!
//! ```sh
//! cargo run --example ivschat_stub -- 127.0.0.1:4566
//! CTS_ISSUER=ivs CTS_IVS__ENDPOINT_URL=http://127.0.0.1:4566 \
//!   AWS_ACCESS_KEY_ID=stub AWS_SECRET_ACCESS_KEY=stub AWS_EC2_METADATA_DISABLED=true cargo run
//! ```
//!
//! See tests/common/ivs_stub.rs for the room ids that make it fail, throttle or stall.

#[allow(dead_code)] // the test-only accessors are unused here
#[path = "../tests/common/ivs_stub.rs"]
mod ivs_stub;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4566".into())
        .parse()
        .expect("usage: ivschat_stub [ADDR:PORT]");
    let stub = ivs_stub::IvsStub::start_on(addr).await;
    println!("IVS Chat stub listening on {}", stub.endpoint());
    tokio::signal::ctrl_c()
        .await
        .expect("cannot wait for Ctrl-C");
}
