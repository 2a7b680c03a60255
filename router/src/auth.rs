//! API keys of the public API: with `--api-keys-file`, every call of
//! `kubemoe.inference.v1.Inference` (gRPC metadata) and of the OpenAI endpoints (`/v1/*`)
//! must carry `authorization: Bearer <key>` with one of the file's keys; otherwise it is
//! refused (`UNAUTHENTICATED`, HTTP 401) before anything is parsed or run. Health, metrics
//! and reflection stay open, as vLLM's `--api-key` leaves them.
//!
//! The file holds one key per line (blank lines and `#` comments ignored). It is read again
//! when it changes (checked at most once a second), so a Kubernetes Secret mounted as a volume
//! rotates keys without a restart; a rewrite that leaves no key keeps the previous keys (a
//! file caught half-written must not lock every client out). Keys are compared in constant
//! time per key, every key each time.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often the file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

pub struct ApiKeys {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    checked: Instant,
    modified: Option<SystemTime>,
    keys: Vec<String>,
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
            Denied::Missing => f.write_str("no API key: send the header `Authorization: Bearer <key>`"),
            Denied::Wrong => f.write_str("the API key is not valid"),
        }
    }
}

fn read(path: &Path) -> crate::Result<(Option<SystemTime>, Vec<String>)> {
    let io = |e| crate::Error::Text(format!("--api-keys-file {}: {e}", path.display()));
    let modified = std::fs::metadata(path).map_err(io)?.modified().ok();
    let text = std::fs::read_to_string(path).map_err(io)?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    Ok((modified, keys))
}

/// Equality whose time depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKeys {
    /// Reads `path`; a file without a key is refused (it would refuse every client).
    pub fn load(path: &Path) -> crate::Result<Self> {
        let (modified, keys) = read(path)?;
        if keys.is_empty() {
            return Err(crate::Error::Text(format!(
                "--api-keys-file {}: holds no key; write one key per line",
                path.display()
            )));
        }
        let state = State { checked: Instant::now(), modified, keys };
        Ok(Self { path: path.to_owned(), state: Mutex::new(state) })
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
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            self.reload(&mut state);
        }
        let mut found = false;
        for key in &state.keys {
            found |= same(key.as_bytes(), presented);
        }
        if found {
            Ok(())
        } else {
            Err(Denied::Wrong)
        }
    }

    fn reload(&self, state: &mut State) {
        let modified = std::fs::metadata(&self.path).ok().and_then(|m| m.modified().ok());
        if modified.is_none() || modified == state.modified {
            return;
        }
        match read(&self.path) {
            Ok((modified, keys)) if !keys.is_empty() => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "API keys reloaded");
                *state = State { checked: state.checked, modified, keys };
            }
            Ok(_) => {
                tracing::warn!(path = %self.path.display(), "the API keys file holds no key; keeping the previous keys")
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the API keys file; keeping the previous keys"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_from_the_file_are_accepted_and_rotated() {
        let path = std::env::temp_dir().join(format!("kubemoe-keys-{}", std::process::id()));
        std::fs::write(&path, "# team a\nkey-one\n\n  key-two  \n").unwrap();
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(keys.check(Some(b"Bearer key-one")), Ok(()));
        assert_eq!(keys.check(Some(b"bearer   key-two")), Ok(()));
        assert_eq!(keys.check(Some(b"Bearer key-thr")), Err(Denied::Wrong));
        assert_eq!(keys.check(Some(b"Basic key-one")), Err(Denied::Missing));
        assert_eq!(keys.check(Some(b"Bearer ")), Err(Denied::Missing));
        assert_eq!(keys.check(None), Err(Denied::Missing));
        // A rewrite is read at the next check after a second; an empty one keeps the keys.
        std::fs::write(&path, "key-three\n").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(5)).unwrap();
        keys.state.lock().unwrap().checked -= RECHECK;
        assert_eq!(keys.check(Some(b"Bearer key-three")), Ok(()));
        assert_eq!(keys.check(Some(b"Bearer key-one")), Err(Denied::Wrong));
        std::fs::write(&path, "# nothing\n").unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(10)).unwrap();
        keys.state.lock().unwrap().checked -= RECHECK;
        assert_eq!(keys.check(Some(b"Bearer key-three")), Ok(()));
        std::fs::remove_file(&path).unwrap();
        assert!(ApiKeys::load(&path).is_err());
    }

    #[test]
    fn a_file_without_keys_is_refused_at_start() {
        let path = std::env::temp_dir().join(format!("kubemoe-nokeys-{}", std::process::id()));
        std::fs::write(&path, "\n# only a comment\n").unwrap();
        let err = ApiKeys::load(&path).err().unwrap().to_string();
        assert!(err.contains("holds no key"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
