//! What anyone reaching a worker's data port may send (`kubemoe_api::data`): any bytes, as a
//! hello and frames, to a server with or without a token. It must answer or refuse and close
//! (the client's side ends with the input), never panic, and never allocate what a header
//! merely claims (libFuzzer's memory limit catches that).
#![no_main]

use kubemoe_api::auth::Keys;
use kubemoe_api::data::{connection, Call, Handler, Header};
use std::sync::OnceLock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A worker of hidden size 4 with one MoE layer (1), sizes checked as `ExpertStore::admit`
/// checks them; the partial sums are the activations.
struct Echo;

impl Handler for Echo {
    type Reply = Vec<u8>;

    fn admit(&self, h: &Header) -> Result<(), tonic::Status> {
        let sized = u64::from(h.activation_bytes) == u64::from(h.tokens) * 16;
        if h.layer != 1 || !sized || h.route_bytes % 12 != 0 {
            return Err(tonic::Status::invalid_argument("sizes"));
        }
        Ok(())
    }

    async fn call(&self, call: Call) -> Result<Vec<u8>, tonic::Status> {
        Ok(call.activations)
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((with_token, sent)) = data.split_first() else { return };
    let keys = (with_token % 2 == 1).then(|| Keys::fixed("sesame").expect("a key"));
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(1 << 16);
        let stop = tokio_util::sync::CancellationToken::new();
        let serve = connection(server, keys.as_ref(), &Echo, stop);
        // Sending and reading at once, as a client does: replies never back up the input.
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async {
            let _ = to_server.write_all(sent).await;
            let _ = to_server.shutdown().await;
        };
        let read = async {
            let mut reply = Vec::new();
            let _ = from_server.read_to_end(&mut reply).await;
        };
        let _ = tokio::join!(serve, send, read);
    });
});
