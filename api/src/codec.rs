//! The protobuf codec of every kubemoe service: prost's, except that a message that does not
//! decode is the caller's error (`INVALID_ARGUMENT`, as gRPC's status code guide says of a
//! malformed request), not tonic's default `INTERNAL`, which reads as a server fault to
//! clients, retry policies and alerts.

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The codec `build.rs` names for every generated client and server.
#[derive(Debug, Clone, Default)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CallerError<ProstDecoder<U>>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CallerError(self.0.decoder())
    }
}

/// A decoder whose failures are `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct CallerError<D>(D);

impl<D: Decoder<Error = Status>> Decoder for CallerError<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0
            .decode(buf)
            .map_err(|s| Status::invalid_argument(format!("malformed protobuf message: {}", s.message())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
