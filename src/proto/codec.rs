//! The protobuf codec of the token service: tonic-prost's, except that a request that fails to decode is
//! the caller's mistake (INVALID_ARGUMENT), not ours (tonic-prost answers INTERNAL, which monitoring
//! counts as a server fault and clients may retry).
//!
//! The generated service uses it through `codec_path` in build.rs.
//!
//! Its buffers start at [`BUFFER_BYTES`] instead of tonic's 8 KiB: tonic allocates one for each request
//! it decodes and one for each response it encodes, and this service's messages are a few hundred bytes
//! (a token response about 500). A larger message grows its buffer as it needs.
//!
//! Its refusal carries `google.rpc.ErrorInfo` like every other error (AIP-193), reason
//! [`UNDECODABLE`] in the service's error domain, which lives in `rescue` above this layer: the same
//! words are written here, and a test of the rescue table holds them equal.

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;
use tonic_types::{ErrorDetails, StatusExt};

/// `google.rpc.ErrorInfo.reason` of a request message that cannot be decoded.
pub const UNDECODABLE: &str = "MESSAGE_UNDECODABLE";
/// Bytes each call's decode and encode buffers start with. Under 1,008 so that glibc serves them as small
/// requests: an allocation of 1,008 bytes or more (tonic's default is 8,192) first merges every free
/// small chunk (`malloc_consolidate`), a walk over cold memory on every call.
pub const BUFFER_BYTES: usize = 1000;
/// Tonic's default: how much a server stream gathers before it yields (this service has none).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`BUFFER_BYTES`] and tonic's yield threshold.
fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

/// `rescue::ERROR_DOMAIN`, which this layer cannot name.
pub const ERROR_DOMAIN: &str = "chat-token-service.internal";

/// A [`Codec`] for `application/grpc+proto` whose decode errors are INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct ProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

/// Decodes `U`; see [`ProstCodec`].
#[derive(Debug)]
pub struct ProstDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|error| {
            // prost's message names the field and the problem (e.g. "invalid string value: data is not
            // UTF-8 encoded"), never the bytes.
            Status::with_error_details(
                tonic::Code::InvalidArgument,
                format!("the request message cannot be decoded: {error}"),
                ErrorDetails::with_error_info(
                    UNDECODABLE,
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                ),
            )
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}
