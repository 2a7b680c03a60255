//! Bearer credentials: the API keys of a router's public API (`--api-keys-file`) and the
//! internal token of a deployment (`--internal-token-file`), which every internal call
//! (`kubemoe.expert.v1.Expert` on workers, `kubemoe.expert.v1.Balancer` on routers) must carry.
//! Both travel as `authorization: Bearer <key>` (gRPC metadata, HTTP header), as vLLM's
//! `--api-key` and the OpenAI clients send them.
//!
//! A file holds one key per line (blank lines and `#` comments ignored). It is read again when
//! it changes (checked at most once a second), so a Kubernetes Secret mounted as a volume
//! rotates keys without a restart: a server accepts every key in the file, a client presents
//! the first, so a rotation writes `new\nold` to the servers, then `new` everywhere. A rewrite
//! that leaves no key keeps the previous keys (a file caught half-written must not lock every
//! client out). Keys are compared in constant time per key, every key each time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::{Request, Status};

/// How often the file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// Keys from a file (re-read when it changes) or fixed ones.
pub struct Keys {
    /// The file and the flag that named it; none for fixed keys.
    file: Option<(PathBuf, &'static str)>,
    state: Mutex<State>,
}

struct State {
    checked: Instant,
    modified: Option<SystemTime>,
    keys: Vec<String>,
    /// `Bearer <first key>`, what a client sends.
    header: AsciiMetadataValue,
}

/// Why a call was refused; the message says what to send.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Wrong,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::Missing => f.write_str("no credential: send the header `Authorization: Bearer <key>`"),
            Denied::Wrong => f.write_str("the credential is not valid"),
        }
    }
}

/// A file's keys and the header presenting the first.
type Parsed = (Vec<String>, AsciiMetadataValue);

/// Keys of a file's text; `None` when it holds none. Keys are visible ASCII (they travel in a
/// header).
fn parse(text: &str) -> Result<Option<Parsed>, String> {
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if let Some((line, _)) = keys.iter().enumerate().find(|(_, k)| !k.bytes().all(|b| b.is_ascii_graphic())) {
        return Err(format!("key {} holds a space or a character that is not visible ASCII", line + 1));
    }
    let Some(first) = keys.first() else { return Ok(None) };
    let header = MetadataValue::try_from(format!("Bearer {first}")).map_err(|e| e.to_string())?;
    Ok(Some((keys, header)))
}

fn read(path: &Path) -> Result<(Option<SystemTime>, Option<Parsed>), String> {
    let modified = std::fs::metadata(path).map_err(|e| e.to_string())?.modified().ok();
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    Ok((modified, parse(&text)?))
}

/// Equality whose time depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Keys {
    /// Reads `path` (given by the command-line flag `flag`); a file without a key is refused
    /// (it would refuse every client).
    pub fn load(path: &Path, flag: &'static str) -> crate::Result<Self> {
        let invalid = |reason: String| crate::Error::Keys { flag, path: path.to_owned(), reason };
        let (modified, keys) = read(path).map_err(invalid)?;
        let (keys, header) = keys.ok_or_else(|| invalid("holds no key; write one key per line".into()))?;
        let state = State { checked: Instant::now(), modified, keys, header };
        Ok(Self { file: Some((path.to_owned(), flag)), state: Mutex::new(state) })
    }

    /// One fixed key (what the operator read from a Secret).
    pub fn fixed(key: &str) -> crate::Result<Self> {
        let invalid = |reason: String| crate::Error::Keys { flag: "key", path: PathBuf::new(), reason };
        let (keys, header) = parse(key).map_err(invalid)?.ok_or_else(|| invalid("is empty".into()))?;
        let state = State { checked: Instant::now(), modified: None, keys, header };
        Ok(Self { file: None, state: Mutex::new(state) })
    }

    fn current(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            self.reload(&mut state);
        }
        state
    }

    /// Checks an `authorization` header value.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Denied> {
        let presented = authorization
            .and_then(|v| {
                let (scheme, key) = v.split_at(v.iter().position(|b| *b == b' ')?);
                scheme.eq_ignore_ascii_case(b"bearer").then(|| key.trim_ascii())
            })
            .filter(|k| !k.is_empty())
            .ok_or(Denied::Missing)?;
        let mut found = false;
        for key in &self.current().keys {
            found |= same(key.as_bytes(), presented);
        }
        if found {
            Ok(())
        } else {
            Err(Denied::Wrong)
        }
    }

    /// `Bearer <first key>`: what a client presents.
    pub fn header(&self) -> AsciiMetadataValue {
        self.current().header.clone()
    }

    fn reload(&self, state: &mut State) {
        let Some((path, flag)) = &self.file else { return };
        let modified = std::fs::metadata(path).ok().and_then(|m| m.modified().ok());
        if modified.is_none() || modified == state.modified {
            return;
        }
        match read(path) {
            Ok((modified, Some((keys, header)))) => {
                tracing::info!(flag, path = %path.display(), keys = keys.len(), "keys reloaded");
                *state = State { checked: state.checked, modified, keys, header };
            }
            Ok((_, None)) => {
                tracing::warn!(flag, path = %path.display(), "the file holds no key; keeping the previous keys")
            }
            Err(error) => {
                tracing::warn!(flag, path = %path.display(), %error, "cannot read the keys; keeping the previous keys")
            }
        }
    }
}

/// A server's check of every call (a tonic interceptor); without keys every call passes.
#[derive(Clone)]
pub struct Guard(pub Option<Arc<Keys>>);

impl tonic::service::Interceptor for Guard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(keys) = &self.0 {
            let header = request.metadata().get("authorization").map(|v| v.as_bytes());
            keys.check(header).map_err(|denied| Status::unauthenticated(denied.to_string()))?;
        }
        Ok(request)
    }
}

/// A client's credential on every call (a tonic interceptor); without keys none is sent.
#[derive(Clone)]
pub struct Bearer(pub Option<Arc<Keys>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(keys) = &self.0 {
            request.metadata_mut().insert("authorization", keys.header());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the deployment's internal credential.
pub type Internal = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// An internal token: 32 random bytes from the kernel, hex. What the operator writes into a
/// deployment's Secret and `kubemoe up` into a file of its own.
pub fn generate_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn bearer_keys_from_the_file_are_accepted_and_rotated() {
        let path = std::env::temp_dir().join(format!("kubemoe-keys-{}", std::process::id()));
        std::fs::write(&path, "# team a\nkey-one\n\n  key-two  \n").unwrap();
        let keys = Keys::load(&path, "--api-keys-file").unwrap();
        assert_eq!(keys.check(Some(b"Bearer key-one")), Ok(()));
        assert_eq!(keys.check(Some(b"bearer   key-two")), Ok(()));
        assert_eq!(keys.check(Some(b"Bearer key-thr")), Err(Denied::Wrong));
        assert_eq!(keys.check(Some(b"Basic key-one")), Err(Denied::Missing));
        assert_eq!(keys.check(Some(b"Bearer ")), Err(Denied::Missing));
        assert_eq!(keys.check(None), Err(Denied::Missing));
        assert_eq!(keys.header(), "Bearer key-one");
        // A rewrite is read at the next check after a second; an empty one keeps the keys.
        std::fs::write(&path, "key-three\n").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(5)).unwrap();
        keys.state.lock().unwrap().checked -= RECHECK;
        assert_eq!(keys.check(Some(b"Bearer key-three")), Ok(()));
        assert_eq!(keys.check(Some(b"Bearer key-one")), Err(Denied::Wrong));
        assert_eq!(keys.header(), "Bearer key-three");
        std::fs::write(&path, "# nothing\n").unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(10)).unwrap();
        keys.state.lock().unwrap().checked -= RECHECK;
        assert_eq!(keys.check(Some(b"Bearer key-three")), Ok(()));
        std::fs::remove_file(&path).unwrap();
        assert!(Keys::load(&path, "--api-keys-file").is_err());
    }

    #[test]
    fn files_without_keys_or_with_unsendable_ones_are_refused_at_start() {
        let path = std::env::temp_dir().join(format!("kubemoe-nokeys-{}", std::process::id()));
        std::fs::write(&path, "\n# only a comment\n").unwrap();
        let err = Keys::load(&path, "--internal-token-file").err().unwrap().to_string();
        assert!(err.contains("--internal-token-file") && err.contains("holds no key"), "{err}");
        std::fs::write(&path, "good\nbad key\n").unwrap();
        let err = Keys::load(&path, "--api-keys-file").err().unwrap().to_string();
        assert!(err.contains("key 2"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_client_presents_what_a_server_accepts() {
        let token = generate_token().unwrap();
        assert_eq!(token.len(), 64);
        assert_ne!(token, generate_token().unwrap());
        let keys = Some(Arc::new(Keys::fixed(&token).unwrap()));
        let sent = Bearer(keys.clone()).call(Request::new(())).unwrap();
        assert!(Guard(keys.clone()).call(sent).is_ok());
        let status = Guard(keys.clone()).call(Request::new(())).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let other = Bearer(Some(Arc::new(Keys::fixed("other").unwrap()))).call(Request::new(())).unwrap();
        assert_eq!(Guard(keys).call(other).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(Guard(None).call(Request::new(())).is_ok());
    }
}
