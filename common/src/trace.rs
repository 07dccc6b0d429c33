//! W3C trace context (`traceparent`) carried with every task: from the submission (an HTTP
//! header or a Kafka header on the submit topic, or a new trace), stored with the task in
//! Redis, and sent as a Kafka header with every dispatch, so a handler's logs carry the trace
//! id of the request that created the task.

use std::fmt;

/// Bytes of a version-00 `traceparent` value.
const LEN: usize = 55;
/// Where the trace id, the span id and the flags sit in the value.
const TRACE_ID: std::ops::Range<usize> = 3..35;
const SPAN_ID: std::ops::Range<usize> = 36..52;
const FLAGS: std::ops::Range<usize> = 53..55;

/// A `traceparent` value: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
///
/// Held as the header's bytes, not as strings: every task carries one through the scheduler
/// and the worker, and three heap strings per value (and `format!` to write it out) were a
/// visible part of the scheduler's allocations.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The header value; lower-case hex and dashes only (so always UTF-8).
    value: [u8; LEN],
    /// The span this one was started from, when known (kept in memory only).
    parent_span_id: Option<[u8; 16]>,
}

impl TraceParent {
    /// A new trace (sampled).
    pub fn new_root() -> Self {
        let mut value = *b"00-00000000000000000000000000000000-0000000000000000-01";
        hex_into(&rand::random::<[u8; 16]>(), &mut value[TRACE_ID]);
        hex_into(&rand::random::<[u8; 8]>(), &mut value[SPAN_ID]);
        Self {
            value,
            parent_span_id: None,
        }
    }

    /// Parses a header value; `None` for anything not a valid version-00 traceparent.
    pub fn parse(header: &str) -> Option<Self> {
        let bytes = header.trim().as_bytes();
        let value: [u8; LEN] = bytes.try_into().ok()?;
        let is_hex = |range: std::ops::Range<usize>| {
            value[range]
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        };
        let valid = value.starts_with(b"00-")
            && value[TRACE_ID.end] == b'-'
            && value[SPAN_ID.end] == b'-'
            && is_hex(TRACE_ID)
            && is_hex(SPAN_ID)
            && is_hex(FLAGS)
            && value[TRACE_ID].iter().any(|b| *b != b'0')
            && value[SPAN_ID].iter().any(|b| *b != b'0');
        valid.then_some(Self {
            value,
            parent_span_id: None,
        })
    }

    /// A new span of `parent`'s trace, or a new trace when there is no parent.
    pub fn continue_or_start(parent: Option<&Self>) -> Self {
        parent.map_or_else(Self::new_root, Self::child)
    }

    /// A new span in the same trace.
    pub fn child(&self) -> Self {
        let mut value = self.value;
        hex_into(&rand::random::<[u8; 8]>(), &mut value[SPAN_ID]);
        let mut parent = [0; 16];
        parent.copy_from_slice(&self.value[SPAN_ID]);
        Self {
            value,
            parent_span_id: Some(parent),
        }
    }

    /// The header value, as sent and stored.
    pub fn as_str(&self) -> &str {
        ascii(&self.value)
    }

    pub fn trace_id(&self) -> &str {
        ascii(&self.value[TRACE_ID])
    }

    pub fn span_id(&self) -> &str {
        ascii(&self.value[SPAN_ID])
    }

    /// The span this one continues, if it was made by [`TraceParent::child`].
    pub fn parent_span_id(&self) -> Option<&str> {
        self.parent_span_id.as_ref().map(|id| ascii(id))
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceParent")
            .field("value", &self.as_str())
            .field("parent_span_id", &self.parent_span_id())
            .finish()
    }
}

/// Bytes this module wrote or checked as hex and dashes, as text.
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// Writes the lower-case hex of `bytes` into `out` (twice as long). By hand: a `format!` per
/// byte was a tenth of the scheduler's CPU at full load (a new trace for every submission
/// without one).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_headers_round_trip_and_children_keep_the_trace() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(header).unwrap();
        assert_eq!(parent.to_string(), header);
        let child = TraceParent::continue_or_start(Some(&parent));
        assert_eq!(child.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(child.span_id(), "00f067aa0ba902b7");
        assert!(TraceParent::parse(&child.to_string()).is_some());
        assert_eq!(child.parent_span_id(), Some("00f067aa0ba902b7"));
        assert_eq!(parent.parent_span_id(), None);
        assert_eq!(child.as_str(), child.to_string());
        assert_eq!(&child.as_str()[..36], &header[..36]);
        assert_eq!(&child.as_str()[52..], "-01");
        // Surrounding whitespace is not part of the value.
        assert_eq!(TraceParent::parse(&format!(" {header}\t")), Some(parent));
    }

    #[test]
    fn hex_is_lower_case_and_two_digits_per_byte() {
        let mut out = [0; 10];
        hex_into(&[0x00, 0x0f, 0xa0, 0xff, 0x4b], &mut out);
        assert_eq!(&out, b"000fa0ff4b");
        let root = TraceParent::new_root();
        assert!(TraceParent::parse(&root.to_string()).is_some(), "{root}");
    }

    #[test]
    fn invalid_headers_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            // 55 bytes, but not ASCII.
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        let fresh = TraceParent::continue_or_start(TraceParent::parse("garbage").as_ref());
        assert_eq!(fresh.trace_id().len(), 32);
    }
}
