//! Following one request across processes. The router gives every request an id (the
//! `x-request-id` a client sent, else its own) and names the requests of each step in the
//! metadata of the dispatches the step makes; the worker's span of a dispatch records them, so
//! one request's log lines are found by its id in the router's and every worker's output.

use tonic::metadata::{MetadataMap, MetadataValue};

/// Metadata key of the ids of the requests a dispatch serves, comma-separated.
pub const REQUESTS_KEY: &str = "x-kubemoe-requests";

/// Metadata key of a client's own request id (as gateways and OpenAI clients send it).
pub const REQUEST_ID_KEY: &str = "x-request-id";

/// Longest id list a worker logs: a peer that sends more gets it cut, not a log line of megabytes.
pub(crate) const MAX_LOGGED: usize = 4096;

/// Names `ids` in `metadata`, at most [`MAX_LOGGED`] bytes of them (cut at a comma, so that a
/// large batch of long client ids never makes a header a worker refuses); a list that is not
/// visible ASCII is left out.
pub fn set_requests(metadata: &mut MetadataMap, ids: &str) {
    if let Ok(value) = MetadataValue::try_from(truncated(ids)) {
        metadata.insert(REQUESTS_KEY, value);
    }
}

/// `ids` cut to at most [`MAX_LOGGED`] bytes, at a comma.
pub fn truncated(ids: &str) -> &str {
    if ids.len() <= MAX_LOGGED {
        return ids;
    }
    let cut = ids.get(..=MAX_LOGGED).and_then(|head| head.rfind(',')).unwrap_or(0);
    &ids[..cut]
}

/// The request ids named in `metadata`, at most [`MAX_LOGGED`] bytes of them.
pub fn requests(metadata: &MetadataMap) -> &str {
    let ids = metadata.get(REQUESTS_KEY).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut end = ids.len().min(MAX_LOGGED);
    while !ids.is_char_boundary(end) {
        end -= 1;
    }
    &ids[..end]
}

/// A client's request id from `metadata`, when it is one a log line can carry.
pub fn client_request_id(metadata: &MetadataMap) -> Option<String> {
    valid_request_id(metadata.get(REQUEST_ID_KEY)?.to_str().ok()?)
}

/// `id` when a log line and the id list of a dispatch can carry it: visible ASCII without
/// commas, at most 128 bytes (gRPC metadata and HTTP headers alike).
pub fn valid_request_id(id: &str) -> Option<String> {
    let fits = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic() && b != b',');
    fits.then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_in_metadata_and_are_bounded() {
        let mut m = MetadataMap::new();
        assert_eq!(requests(&m), "");
        set_requests(&mut m, "req-1,req-2");
        assert_eq!(requests(&m), "req-1,req-2");
        let many = vec!["id-0123456789"; 1000].join(",");
        set_requests(&mut m, &many);
        let sent = requests(&m);
        assert!(sent.len() <= MAX_LOGGED && sent.len() > MAX_LOGGED - 14, "{}", sent.len());
        assert!(sent.split(',').all(|id| id == "id-0123456789"));
        m.insert(REQUEST_ID_KEY, MetadataValue::from_static("abc-123"));
        assert_eq!(client_request_id(&m).as_deref(), Some("abc-123"));
        m.insert(REQUEST_ID_KEY, MetadataValue::from_static("a,b"));
        assert_eq!(client_request_id(&m), None);
    }
}
