//! The W3C trace context (`traceparent`), kept by this crate when requests
//! are not recorded as spans (see the crate docs).

use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

/// A request's trace: its id and the W3C trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Trace {
    pub trace_id: u128,
    pub flags: u8,
}

fn hex_id(s: &str, len: usize) -> Option<u128> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|v| *v != 0)
}

impl Trace {
    /// A new trace, not sampled.
    pub(crate) fn new() -> Self {
        Trace { trace_id: u128::from_be_bytes(RandomIdGenerator::default().new_trace_id().to_bytes()), flags: 0 }
    }

    /// The trace of the valid `traceparent` in `headers`
    /// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`), if any: an
    /// invalid one is ignored, as the W3C spec asks (a new trace starts).
    pub(crate) fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let value = headers.get("traceparent")?.to_str().ok()?;
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four parts; later versions may add more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        hex_id(parent, 16)?;
        if flags.len() != 2 {
            return None;
        }
        Some(Trace { trace_id: hex_id(trace_id, 32)?, flags: u8::from_str_radix(flags, 16).ok()? })
    }

    pub(crate) fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The `traceparent` of a call made within this trace (a fresh span id
    /// as the caller's).
    pub(crate) fn child_traceparent(&self) -> Option<http::HeaderValue> {
        let span_id = RandomIdGenerator::default().new_span_id();
        http::HeaderValue::from_str(&format!("00-{:032x}-{span_id}-{:02x}", self.trace_id, self.flags)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("traceparent", tp.parse().unwrap());
        h
    }

    #[test]
    fn parses_valid_and_ignores_invalid_traceparents() {
        let t = Trace::from_headers(&headers("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")).unwrap();
        assert_eq!((t.trace_id_hex().as_str(), t.flags), ("4bf92f3577b34da6a3ce929d0e0e4736", 1));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Trace::from_headers(&headers(bad)), None, "{bad:?}");
        }
        assert_eq!(Trace::from_headers(&http::HeaderMap::new()), None);
    }

    #[test]
    fn made_up_ids_round_trip() {
        let t = Trace { flags: 1, ..Trace::new() };
        let child = Trace::from_headers(&headers(t.child_traceparent().unwrap().to_str().unwrap())).unwrap();
        assert_eq!(child, t);
        assert_eq!(t.trace_id_hex().len(), 32);
    }
}
