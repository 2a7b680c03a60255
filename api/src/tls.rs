//! TLS for every kubemoe port and client (rustls with the `ring` provider), from a directory
//! holding what cert-manager writes into a Secret: `tls.crt` (the certificate chain, leaf
//! first), `tls.key` (its private key) and `ca.crt` (the CA that clients of the deployment
//! trust). One certificate serves a whole deployment: routers and workers present it, and every
//! internal client (router to worker, the rebalance loop to both) checks the peer's chain
//! against `ca.crt` and the name it was told (`--tls-server-name`, else the host it dials).
//!
//! Rotation without a restart: the files are looked at again at most once a second when a
//! handshake needs them, and read again when their modification times change (Kubernetes
//! updates a mounted Secret by swapping a symlink, so all three change together). A new
//! certificate serves the next handshake; connections already open keep theirs. Files caught
//! half-written (a key that does not match the certificate, a PEM without a certificate) are
//! refused and the previous ones kept until the next change, so a bad write never stops a
//! server from taking connections.

use crate::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
pub use rustls::ServerConfig;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The file names of a `kubernetes.io/tls` Secret with a CA (cert-manager's layout).
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

/// How often the files' modification times are looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// ALPN of gRPC ports (HTTP/2 only) and of HTTP/1.1 ports.
pub const ALPN_GRPC: &[&[u8]] = &[b"h2"];
pub const ALPN_HTTP: &[&[u8]] = &[b"http/1.1"];
/// ALPN of workers' data-path ports ([`crate::data`]).
pub const ALPN_DATA: &[&[u8]] = &[b"kubemoe-data/1"];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A value made from files, made again when their modification times change.
struct Watched<T> {
    paths: Vec<PathBuf>,
    make: fn(&[PathBuf]) -> Result<T, String>,
    state: Mutex<WatchState<T>>,
}

struct WatchState<T> {
    checked: Instant,
    stamps: Vec<Option<SystemTime>>,
    value: Arc<T>,
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

impl<T> Watched<T> {
    fn load(paths: Vec<PathBuf>, make: fn(&[PathBuf]) -> Result<T, String>) -> Result<Self, String> {
        let state =
            WatchState { checked: Instant::now(), stamps: stamps(&paths), value: Arc::new(make(&paths)?) };
        Ok(Self { paths, make, state: Mutex::new(state) })
    }

    /// A value that never changes (no files behind it).
    fn fixed(value: T) -> Self {
        let state = WatchState { checked: Instant::now(), stamps: Vec::new(), value: Arc::new(value) };
        Self { paths: Vec::new(), make: |_| Err("fixed".into()), state: Mutex::new(state) }
    }

    fn get(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !self.paths.is_empty() && state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let now = stamps(&self.paths);
            if now != state.stamps {
                let file = self.paths[0].display();
                match (self.make)(&self.paths) {
                    Ok(value) => {
                        tracing::info!(%file, "TLS files reloaded");
                        state.value = Arc::new(value);
                        state.stamps = now;
                    }
                    // Not marked as read: tried again at the next check.
                    Err(error) => {
                        tracing::warn!(%file, %error, "cannot use the new TLS files; keeping the previous ones")
                    }
                }
            }
        }
        state.value.clone()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// `tls.crt` and `tls.key`: the chain a server presents, checked to match its key.
fn identity(paths: &[PathBuf]) -> Result<CertifiedKey, String> {
    let chain = read_certs(&paths[0])?;
    let key = PrivateKeyDer::from_pem_file(&paths[1]).map_err(|e| format!("{}: {e}", paths[1].display()))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| format!("{} and {}: {e}", paths[0].display(), paths[1].display()))
}

fn verifier(certs: Vec<CertificateDer<'static>>) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| format!("not a CA certificate: {e}"))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| e.to_string())
}

/// The server side: the current certificate for every handshake.
#[derive(Debug)]
struct Identity(Watched<CertifiedKey>);

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// The client side: the peer's chain checked against the current `ca.crt`.
#[derive(Debug)]
struct Roots(Watched<Arc<WebPkiServerVerifier>>);

impl ServerCertVerifier for Roots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.get().verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").field("paths", &self.paths).finish_non_exhaustive()
    }
}

/// A server's and its clients' TLS, from a `--tls-dir`.
pub struct Tls {
    dir: PathBuf,
    identity: Arc<Identity>,
    roots: Option<Arc<Roots>>,
}

impl Tls {
    /// Reads `dir` (`tls.crt` and `tls.key` required, `ca.crt` when present); what is wrong
    /// fails the start, naming the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::Tls { path: dir.to_owned(), reason };
        let identity =
            Watched::load(vec![dir.join(CERT_FILE), dir.join(KEY_FILE)], identity).map_err(invalid)?;
        let ca = dir.join(CA_FILE);
        let roots = if ca.exists() {
            let make =
                |p: &[PathBuf]| verifier(read_certs(&p[0])?).map_err(|e| format!("{}: {e}", p[0].display()));
            Some(Arc::new(Roots(Watched::load(vec![ca], make).map_err(invalid)?)))
        } else {
            None
        };
        Ok(Self { dir: dir.to_owned(), identity: Arc::new(Identity(identity)), roots })
    }

    /// What a server port accepts handshakes with; `alpn` is [`ALPN_GRPC`], [`ALPN_HTTP`] or
    /// [`ALPN_DATA`].
    pub fn server(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls { path: self.dir.clone(), reason: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(self.identity.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// How this process calls the deployment's other servers: their chains checked against
    /// `ca.crt` (re-read on change) and `name` (else the host dialled).
    pub fn client(&self, name: Option<&str>) -> Result<Client> {
        let roots = self.roots.clone().ok_or_else(|| Error::Tls {
            path: self.dir.join(CA_FILE),
            reason: "is missing: internal calls check the servers' certificates against it".into(),
        })?;
        Client::new(roots, name).map_err(|reason| Error::Tls { path: self.dir.clone(), reason })
    }
}

/// A client's TLS: a [`crate::channel`] with one connects through it.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    /// The same, offering [`ALPN_DATA`].
    data: Arc<ClientConfig>,
    name: Option<ServerName<'static>>,
}

impl Client {
    fn new(roots: Arc<Roots>, name: Option<&str>) -> Result<Self, String> {
        let name =
            name.map(|n| ServerName::try_from(n.to_string()).map_err(|e| format!("server name {n:?}: {e}")));
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(roots)
            .with_no_client_auth();
        let mut data = config.clone();
        config.alpn_protocols = ALPN_GRPC.iter().map(|p| p.to_vec()).collect();
        data.alpn_protocols = ALPN_DATA.iter().map(|p| p.to_vec()).collect();
        Ok(Self { config: Arc::new(config), data: Arc::new(data), name: name.transpose()? })
    }

    /// Trusting the CA certificates of `pem` (what the operator reads from a Secret's
    /// `ca.crt`), checking `name` (else the host dialled).
    pub fn from_ca_pem(pem: &[u8], name: Option<&str>) -> Result<Self> {
        let invalid = |reason: String| Error::Tls { path: PathBuf::from(CA_FILE), reason };
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        if certs.is_empty() {
            return Err(invalid("holds no PEM certificate".into()));
        }
        let roots = Arc::new(Roots(Watched::fixed(verifier(certs).map_err(invalid)?)));
        Client::new(roots, name).map_err(invalid)
    }

    /// Connects to `host:port` (a URL's host: a name, an IPv4 address or a bracketed IPv6
    /// one) and completes the handshake.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        self.connect_with(&self.config, host, port).await
    }

    /// [`Client::connect`] to a worker's data-path port.
    pub async fn connect_data(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        self.connect_with(&self.data, host, port).await
    }

    async fn connect_with(
        &self,
        config: &Arc<ClientConfig>,
        host: &str,
        port: u16,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = match &self.name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?,
        };
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await
    }
}

/// tonic's connector: every connection of a channel made with TLS.
impl tower_service::Service<http::Uri> for Client {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let client = self.clone();
        Box::pin(async move {
            let invalid =
                || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: no host or port"));
            let host = uri.host().ok_or_else(invalid)?;
            let port = uri.port_u16().ok_or_else(invalid)?;
            Ok(hyper_util::rt::TokioIo::new(client.connect(host, port).await?))
        })
    }
}
