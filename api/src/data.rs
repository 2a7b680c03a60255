//! The data path: dispatch and combine between a router and a worker in length-prefixed frames
//! over persistent TCP (or TLS) connections, beside the worker's gRPC `Expert` service, which
//! keeps control, health and placement. Why a second protocol: a 1.5 MiB dispatch through
//! gRPC (HTTP/2 framing and flow control, protobuf, hyper's buffers) took ~4 ms where raw
//! loopback TCP moves it in ~1 ms. Here the payload goes from the caller's buffer to the socket
//! and from the socket into the buffer the worker computes on, with nothing in between.
//!
//! A connection starts with a hello and then carries one call at a time (a caller that wants
//! two in flight opens two connections). Integers are little-endian u32.
//!
//! | frame | sent by | layout |
//! | --- | --- | --- |
//! | hello | client, once | [`MAGIC`] (8 bytes), [`VERSION`], credential length, the credential: the `authorization` value a gRPC call carries (`Bearer <token>`; empty without one) |
//! | request | client | [`Header`] (layer, tokens, activation bytes, route bytes, request-id bytes), then the request ids (UTF-8, as [`crate::trace`] names them), the activations (`tokens × hidden` f32) and the routes ([`crate::route`] records) |
//! | reply | server, to the hello and to each request | code (a gRPC status code, 0: OK), length, then the partial sums (`tokens × hidden` f32; nothing for the hello) or, for an error, its message (UTF-8) |
//!
//! Invariants: before the credential is checked the server answers nothing but the hello's
//! reply and reads at most [`MAX_CREDENTIAL`] bytes; the credential is checked again before
//! each call (as gRPC checks each call: a key removed from the keys file stops being served on
//! connections already open); no payload is read before its header passed
//! [`Handler::admit`] (the sizes against the model, so nothing is allocated for a refused
//! frame) and the frame limit ([`crate::MAX_MESSAGE_BYTES`], as gRPC's); a frame's payload
//! and its reply move within [`FRAME_TIMEOUT`]; after an error reply the server closes the
//! connection and the client drops it, so a frame boundary is never in doubt.

use crate::auth::Keys;
use crate::conn::{incoming, HANDSHAKE_TIMEOUT};
use futures::StreamExt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::{Code, Status};

/// First bytes of every connection.
pub const MAGIC: &[u8; 8] = b"KMOEDATA";
/// The frame layout above; a server refuses another.
pub const VERSION: u32 = 1;
/// Longest credential a server reads.
pub const MAX_CREDENTIAL: usize = 4096;
/// Longest error message a client reads.
const MAX_MESSAGE: usize = 64 << 10;
/// Longest a frame's payload (once its header arrived) and its reply may take to move: a
/// peer that trickles bytes holds its buffer no longer.
pub const FRAME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a request's payload holds, read before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub layer: u32,
    pub tokens: u32,
    pub activation_bytes: u32,
    pub route_bytes: u32,
    pub request_id_bytes: u32,
}

impl Header {
    const BYTES: usize = 20;

    fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        let fields =
            [self.layer, self.tokens, self.activation_bytes, self.route_bytes, self.request_id_bytes];
        for (chunk, v) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8; Self::BYTES]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Header {
            layer: word(0),
            tokens: word(1),
            activation_bytes: word(2),
            route_bytes: word(3),
            request_id_bytes: word(4),
        }
    }
}

/// One dispatch as the server reads it (`B`: its buffers; gRPC's `Dispatch` carries the same).
#[derive(Debug)]
pub struct Call<B = Vec<u8>> {
    pub layer: u32,
    pub tokens: u32,
    /// `tokens × hidden` little-endian f32.
    pub activations: B,
    /// [`crate::route`] records.
    pub routes: B,
    /// Ids of the requests the dispatch serves, comma-separated.
    pub requests: String,
}

/// What a server does with the calls it reads.
pub trait Handler: Send + Sync + 'static {
    /// The bytes of a reply.
    type Reply: AsRef<[u8]> + Send;

    /// Refuses a call by its header alone, before its payload is read.
    fn admit(&self, header: &Header) -> Result<(), Status>;

    /// The call's partial sums (`tokens × hidden` little-endian f32).
    fn call(&self, call: Call) -> impl Future<Output = Result<Self::Reply, Status>> + Send;
}

/// Serves the data path on `listener` (TLS with `tls`, whose ALPN is
/// [`crate::tls::ALPN_DATA`]) until `stop`: each connection presents one of `keys` (none: any
/// client is served) and its calls go to `handler`.
pub async fn serve<H: Handler>(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    keys: Option<Arc<Keys>>,
    handler: Arc<H>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut conns = std::pin::pin!(incoming(listener, tls));
    loop {
        let conn = tokio::select! {
            conn = conns.next() => conn,
            () = stop.cancelled() => return,
        };
        match conn {
            Some(Ok(conn)) => {
                let (keys, handler, stop) = (keys.clone(), handler.clone(), stop.clone());
                tokio::spawn(async move {
                    if let Err(error) = connection(conn, keys.as_deref(), handler.as_ref(), stop).await {
                        tracing::debug!(%error, "data-path connection ended");
                    }
                });
            }
            Some(Err(error)) => tracing::debug!(%error, "data-path connection not taken"),
            None => return,
        }
    }
}

/// Serves one connection (already accepted, its TLS handshake done) until the client closes
/// it, a refusal, or `stop`.
pub async fn connection<S: AsyncRead + AsyncWrite + Unpin, H: Handler>(
    mut conn: S,
    keys: Option<&Keys>,
    handler: &H,
    stop: tokio_util::sync::CancellationToken,
) -> io::Result<()> {
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_hello(&mut conn))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello"))??;
    let credential = match hello {
        Ok(credential) => credential,
        Err(status) => return refuse(&mut conn, &status).await,
    };
    let denied = || {
        let denied = keys?.check(Some(&credential)).err()?;
        Some(Status::unauthenticated(denied.to_string()))
    };
    if let Some(status) = denied() {
        return refuse(&mut conn, &status).await;
    }
    write_reply(&mut conn, Code::Ok, &[]).await?;
    loop {
        let mut head = [0u8; Header::BYTES];
        tokio::select! {
            read = conn.read_exact(&mut head) => match read {
                Ok(_) => {}
                // The client closed between calls.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            },
            () = stop.cancelled() => return Ok(()),
        }
        let header = Header::decode(&head);
        if let Some(status) = denied() {
            return refuse(&mut conn, &status).await;
        }
        if let Err(status) = within_limits(&header).and_then(|()| handler.admit(&header)) {
            return refuse(&mut conn, &status).await;
        }
        let payload = async {
            let requests = read_bytes(&mut conn, header.request_id_bytes as usize).await?;
            Ok::<_, io::Error>(Call {
                layer: header.layer,
                tokens: header.tokens,
                requests: String::from_utf8_lossy(&requests).into_owned(),
                activations: read_bytes(&mut conn, header.activation_bytes as usize).await?,
                routes: read_bytes(&mut conn, header.route_bytes as usize).await?,
            })
        };
        let call =
            tokio::time::timeout(FRAME_TIMEOUT, payload).await.map_err(|_| timed_out("a payload"))??;
        match handler.call(call).await {
            Ok(partial) => {
                let reply = write_reply(&mut conn, Code::Ok, partial.as_ref());
                tokio::time::timeout(FRAME_TIMEOUT, reply).await.map_err(|_| timed_out("a reply"))??
            }
            Err(status) => return refuse(&mut conn, &status).await,
        }
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} took longer than {FRAME_TIMEOUT:?}"))
}

/// The protocol's own limits on a header, before the handler's.
fn within_limits(h: &Header) -> Result<(), Status> {
    let max_ids = crate::trace::MAX_LOGGED;
    if h.request_id_bytes as usize > max_ids {
        return Err(Status::invalid_argument(format!(
            "request ids of {} bytes; at most {max_ids} are read",
            h.request_id_bytes
        )));
    }
    let payload = h.activation_bytes as usize + h.route_bytes as usize;
    if payload > crate::MAX_MESSAGE_BYTES {
        return Err(Status::invalid_argument(format!(
            "a payload of {payload} bytes; a frame holds at most {} (as a gRPC message)",
            crate::MAX_MESSAGE_BYTES
        )));
    }
    Ok(())
}

/// The hello's credential, or why the client is refused.
async fn read_hello<S: AsyncRead + Unpin>(conn: &mut S) -> io::Result<Result<Vec<u8>, Status>> {
    let mut head = [0u8; 16];
    conn.read_exact(&mut head).await?;
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if &head[..8] != MAGIC {
        return Ok(Err(Status::invalid_argument("not a kubemoe data-path client (no KMOEDATA hello)")));
    }
    if word(8) != VERSION {
        return Ok(Err(Status::failed_precondition(format!(
            "data-path version {} is not served here ({VERSION} is): run the same kubemoe release on routers and workers",
            word(8)
        ))));
    }
    let len = word(12) as usize;
    if len > MAX_CREDENTIAL {
        return Ok(Err(Status::invalid_argument(format!(
            "a credential of {len} bytes; at most {MAX_CREDENTIAL} are read"
        ))));
    }
    Ok(Ok(read_bytes(conn, len).await?))
}

/// Exactly `len` bytes, without zeroing a buffer first (activations are megabytes); memory
/// the process cannot get fails the read, not the process.
async fn read_bytes<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    r.take(len as u64).read_to_end(&mut out).await?;
    if out.len() != len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} of {len} bytes", out.len())));
    }
    Ok(out)
}

async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, code: Code, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&(code as u32).to_le_bytes());
    head[4..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// How long a refused client has to close its side after the refusal.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers `status` and closes the connection. What the client still sends is read and
/// dropped (a little at a time, for at most [`LINGER`]): closing with unread bytes would
/// reset the connection, and the client might lose the refusal with it.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut S, status: &Status) -> io::Result<()> {
    let message = status.message().as_bytes();
    write_reply(conn, status.code(), &message[..message.len().min(MAX_MESSAGE)]).await?;
    conn.shutdown().await?;
    let mut sink = [0u8; 16 << 10];
    let _ = tokio::time::timeout(LINGER, async { while conn.read(&mut sink).await.is_ok_and(|n| n > 0) {} })
        .await;
    Ok(())
}

/// The byte stream of a client connection, plaintext or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A client's connection to one worker's data path. A call that fails for any reason leaves
/// it unusable: drop it and open another.
pub struct Connection {
    stream: Box<dyn Stream>,
}

/// An I/O failure as the caller's status: the worker (or the way to it) failed.
fn unavailable(e: io::Error) -> Status {
    Status::unavailable(format!("data path: {e}"))
}

impl Connection {
    /// Connects to `host:port` (over TLS with `tls`) and presents `credential` (the
    /// `authorization` value gRPC calls carry).
    pub async fn open(
        host: &str,
        port: u16,
        tls: Option<&crate::tls::Client>,
        credential: Option<&[u8]>,
    ) -> Result<Self, Status> {
        let stream: Box<dyn Stream> = match tls {
            Some(tls) => Box::new(tls.connect_data(host, port).await.map_err(unavailable)?),
            None => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(unavailable)?;
                tcp.set_nodelay(true).map_err(unavailable)?;
                Box::new(tcp)
            }
        };
        let mut c = Connection { stream };
        let credential = credential.unwrap_or_default();
        let mut hello = Vec::with_capacity(16 + credential.len());
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&(credential.len() as u32).to_le_bytes());
        hello.extend_from_slice(credential);
        c.stream.write_all(&hello).await.map_err(unavailable)?;
        c.stream.flush().await.map_err(unavailable)?;
        c.reply(0).await?;
        Ok(c)
    }

    /// Sends one dispatch and returns its partial sums, which must be `reply_bytes` long.
    pub async fn call(
        &mut self,
        layer: u32,
        tokens: u32,
        requests: &str,
        activations: &[u8],
        routes: &[u8],
        reply_bytes: usize,
    ) -> Result<Vec<u8>, Status> {
        let requests = crate::trace::truncated(requests).as_bytes();
        let too_large = |what: &str, n: usize| {
            Status::invalid_argument(format!("{what} of {n} bytes do not fit a frame"))
        };
        let header = Header {
            layer,
            tokens,
            activation_bytes: u32::try_from(activations.len())
                .map_err(|_| too_large("activations", activations.len()))?,
            route_bytes: u32::try_from(routes.len()).map_err(|_| too_large("routes", routes.len()))?,
            request_id_bytes: requests.len() as u32,
        };
        let mut head = Vec::with_capacity(Header::BYTES + requests.len());
        head.extend_from_slice(&header.encode());
        head.extend_from_slice(requests);
        for part in [&head[..], activations, routes] {
            self.stream.write_all(part).await.map_err(unavailable)?;
        }
        self.stream.flush().await.map_err(unavailable)?;
        self.reply(reply_bytes).await
    }

    /// Reads a reply: an OK one must be `expected` bytes long.
    async fn reply(&mut self, expected: usize) -> Result<Vec<u8>, Status> {
        let mut head = [0u8; 8];
        self.stream.read_exact(&mut head).await.map_err(unavailable)?;
        let code = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if code != 0 {
            if len > MAX_MESSAGE {
                return Err(Status::internal(format!("an error reply of {len} bytes")));
            }
            let message = read_bytes(&mut self.stream, len).await.map_err(unavailable)?;
            return Err(Status::new(Code::from(code as i32), String::from_utf8_lossy(&message)));
        }
        if len != expected {
            return Err(Status::internal(format!("reply holds {len} bytes, expected {expected}")));
        }
        read_bytes(&mut self.stream, len).await.map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::net::TcpListener;

    /// Sums nothing: answers each activation byte plus the layer; refuses tokens above 8.
    struct Echo;

    impl Handler for Echo {
        type Reply = Vec<u8>;

        fn admit(&self, header: &Header) -> Result<(), Status> {
            if header.tokens > 8 || header.activation_bytes != header.tokens * 4 {
                return Err(Status::invalid_argument(format!("{header:?}")));
            }
            Ok(())
        }

        async fn call(&self, call: Call) -> Result<Vec<u8>, Status> {
            if call.layer == 99 {
                return Err(Status::unavailable("layer 99 is busy"));
            }
            assert_eq!(call.requests, "a,b");
            Ok(call.activations.iter().map(|b| b + call.layer as u8 + call.routes.len() as u8).collect())
        }
    }

    async fn server(keys: Option<&str>) -> (String, tokio_util::sync::CancellationToken) {
        server_with(keys.map(|k| Arc::new(Keys::fixed(k).unwrap()))).await
    }

    async fn server_with(keys: Option<Arc<Keys>>) -> (String, tokio_util::sync::CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(listener, None, keys, Arc::new(Echo), stop.clone()));
        (port, stop)
    }

    /// A hello claiming a credential of `len` bytes, followed by `credential`.
    fn hello(len: u32, credential: &[u8]) -> Vec<u8> {
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&len.to_le_bytes());
        hello.extend_from_slice(credential);
        hello
    }

    /// What the server answers `bytes` with, until it closes.
    async fn raw(port: u16, bytes: &[u8]) -> Vec<u8> {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        let mut reply = Vec::new();
        tcp.read_to_end(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn calls_round_trip_on_one_connection_and_errors_close_it() {
        let (port, stop) = server(Some("sesame")).await;
        let port: u16 = port.parse().unwrap();
        let mut c = Connection::open("127.0.0.1", port, None, Some(b"Bearer sesame")).await.unwrap();
        for layer in 1..4u32 {
            let reply = c.call(layer, 2, "a,b", &[1, 2, 3, 4, 5, 6, 7, 8], &[0; 12], 8).await.unwrap();
            assert_eq!(reply, (1..=8).map(|b| b + layer as u8 + 12).collect::<Vec<u8>>());
        }
        // A reply of another size than the caller expects is an error, not a short combine.
        assert_eq!(c.call(1, 1, "a,b", &[0; 4], &[], 8).await.unwrap_err().code(), Code::Internal);
        // The handler's error reaches the caller with its code; the connection is closed after.
        let mut c = Connection::open("127.0.0.1", port, None, Some(b"Bearer sesame")).await.unwrap();
        let busy = c.call(99, 1, "a,b", &[0; 4], &[], 4).await.unwrap_err();
        assert_eq!((busy.code(), busy.message()), (Code::Unavailable, "layer 99 is busy"));
        assert_eq!(c.call(1, 1, "a,b", &[0; 4], &[], 4).await.unwrap_err().code(), Code::Unavailable);
        // Refused by its header: nothing of its payload is read (the server has closed).
        let mut c = Connection::open("127.0.0.1", port, None, Some(b"Bearer sesame")).await.unwrap();
        let refused = c.call(1, 9, "a,b", &[0; 36], &[], 36).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_without_the_token_or_the_protocol_is_refused_before_any_call() {
        let (port, stop) = server(Some("sesame")).await;
        let port: u16 = port.parse().unwrap();
        for credential in [None, Some(&b"Bearer wrong"[..])] {
            let refused = Connection::open("127.0.0.1", port, None, credential).await.err().unwrap();
            assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        }
        // Not our protocol (an HTTP client), and an over-long credential.
        let reply = raw(port, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), Code::InvalidArgument as u32);
        let reply = raw(port, &hello(1 << 30, b"")).await;
        assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()), Code::InvalidArgument as u32);
        // A frame larger than a gRPC message is refused by its header, whatever the handler says.
        let mut frame = hello(13, b"Bearer sesame");
        let header =
            Header { layer: 1, tokens: 2, activation_bytes: 8, route_bytes: u32::MAX, request_id_bytes: 0 };
        frame.extend_from_slice(&header.encode());
        let reply = raw(port, &frame).await;
        assert_eq!(&reply[..8], &[0; 8], "the hello's OK");
        assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), Code::InvalidArgument as u32);
        assert!(String::from_utf8_lossy(&reply[16..]).contains("a frame holds at most"));
        // Without keys, any client is served.
        let (open, stop_open) = server(None).await;
        let mut c = Connection::open("127.0.0.1", open.parse().unwrap(), None, None).await.unwrap();
        assert_eq!(c.call(0, 1, "a,b", &[1; 4], &[], 4).await.unwrap(), vec![1; 4]);
        stop.cancel();
        stop_open.cancel();
    }

    #[tokio::test]
    async fn a_key_removed_from_the_keys_file_is_refused_on_connections_already_open() {
        let file = std::env::temp_dir().join(format!("kubemoe-data-keys-{}", std::process::id()));
        std::fs::write(&file, "old\n").unwrap();
        let keys = Arc::new(Keys::load(&file, "--internal-token-file").unwrap());
        let (port, stop) = server_with(Some(keys)).await;
        let port: u16 = port.parse().unwrap();
        let mut c = Connection::open("127.0.0.1", port, None, Some(b"Bearer old")).await.unwrap();
        c.call(1, 1, "a,b", &[0; 4], &[], 4).await.unwrap();
        // The file is looked at again at most once a second; a new modification time is read.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::write(&file, "new\n").unwrap();
        let refused = c.call(1, 1, "a,b", &[0; 4], &[], 4).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        let mut c = Connection::open("127.0.0.1", port, None, Some(b"Bearer new")).await.unwrap();
        c.call(1, 1, "a,b", &[0; 4], &[], 4).await.unwrap();
        stop.cancel();
        let _ = std::fs::remove_file(&file);
    }
}
