//! The route record of `kubemoe.expert.v1.DispatchRequest.routes`: which expert a row of the
//! dispatched activations goes to, with which gate weight. 12 bytes, little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | row: index into the request's activation rows (u32) |
//! | 4..8 | logical expert id (u32) |
//! | 8..12 | gate weight (f32) |
//!
//! The router encodes, the worker decodes; both through this module only.

/// Size of one record.
pub const ROUTE_BYTES: usize = 12;

/// One route: (row, logical expert, gate weight).
pub type Route = (u32, u32, f32);

/// `routes` as packed records.
pub fn encode(routes: &[Route]) -> Vec<u8> {
    let mut out = Vec::with_capacity(routes.len() * ROUTE_BYTES);
    for (row, expert, weight) in routes {
        out.extend_from_slice(&row.to_le_bytes());
        out.extend_from_slice(&expert.to_le_bytes());
        out.extend_from_slice(&weight.to_le_bytes());
    }
    out
}

/// The records in `bytes`; `None` unless it holds whole records.
pub fn decode(bytes: &[u8]) -> Option<impl ExactSizeIterator<Item = Route> + '_> {
    if !bytes.len().is_multiple_of(ROUTE_BYTES) {
        return None;
    }
    Some(bytes.chunks_exact(ROUTE_BYTES).map(|r| {
        let word = |i: usize| [r[i], r[i + 1], r[i + 2], r[i + 3]];
        (u32::from_le_bytes(word(0)), u32::from_le_bytes(word(4)), f32::from_le_bytes(word(8)))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_partial_ones_are_refused() {
        let routes = [(0, 9, 0.5), (7, 255, -1.25), (u32::MAX, 0, f32::MIN_POSITIVE)];
        let bytes = encode(&routes);
        assert_eq!(bytes.len(), 36);
        assert_eq!(&bytes[12..16], &7u32.to_le_bytes());
        assert_eq!(decode(&bytes).unwrap().collect::<Vec<_>>(), routes);
        assert!(decode(&bytes[..35]).is_none());
        assert_eq!(decode(&[]).unwrap().len(), 0);
    }
}
