//! The wire format: the generated protobuf types and gRPC stubs of `proto/`, and their codec. Only the
//! front doors, the transport and the server use it; everything else speaks [`crate::domain`].

pub mod codec;

/// `package ivschat.v1`.
pub mod ivschat {
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("ivschat.v1");
    }
}

/// The encoded `FileDescriptorSet` of proto/ (with its imports), served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/token_service_descriptor.bin"));
