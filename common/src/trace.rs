//! W3C trace context (`traceparent`) carried with every task: from the submission (an HTTP
//! header or a Kafka header on the submit topic, or a new trace), stored with the task in
//! Redis, and sent as a Kafka header with every dispatch, so a handler's logs carry the trace
//! id of the request that created the task.

use std::fmt;

/// A `traceparent` value: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: String,
    span_id: String,
    flags: String,
    /// The span this one was started from, when known (kept in memory only).
    parent_span_id: Option<String>,
}

impl TraceParent {
    /// A new trace (sampled).
    pub fn new_root() -> Self {
        Self {
            trace_id: hex(&rand::random::<[u8; 16]>()),
            span_id: hex(&rand::random::<[u8; 8]>()),
            flags: "01".into(),
            parent_span_id: None,
        }
    }

    /// Parses a header value; `None` for anything not a valid version-00 traceparent.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let is_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let valid = parts.next().is_none()
            && version == "00"
            && is_hex(trace_id, 32)
            && is_hex(span_id, 16)
            && is_hex(flags, 2)
            && trace_id.bytes().any(|b| b != b'0')
            && span_id.bytes().any(|b| b != b'0');
        valid.then(|| Self {
            trace_id: trace_id.into(),
            span_id: span_id.into(),
            flags: flags.into(),
            parent_span_id: None,
        })
    }

    /// The `traceparent` header of a Kafka record, if present and valid.
    pub fn from_kafka(message: &impl rdkafka::Message) -> Option<Self> {
        use rdkafka::message::Headers;
        message
            .headers()?
            .iter()
            .find(|h| h.key == "traceparent")
            .and_then(|h| std::str::from_utf8(h.value?).ok())
            .and_then(Self::parse)
    }

    /// A new span of `parent`'s trace, or a new trace when there is no parent.
    pub fn continue_or_start(parent: Option<&Self>) -> Self {
        parent.map_or_else(Self::new_root, Self::child)
    }

    /// A new span in the same trace.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id.clone(),
            span_id: hex(&rand::random::<[u8; 8]>()),
            flags: self.flags.clone(),
            parent_span_id: Some(self.span_id.clone()),
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    pub fn span_id(&self) -> &str {
        &self.span_id
    }

    /// The span this one continues, if it was made by [`TraceParent::child`].
    pub fn parent_span_id(&self) -> Option<&str> {
        self.parent_span_id.as_deref()
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// Lower-case hex of `bytes`. Written by hand: a `format!` per byte was a tenth of the
/// scheduler's CPU at full load (a new trace for every submission without one).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
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
    }

    #[test]
    fn hex_is_lower_case_and_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff, 0x4b]), "000fa0ff4b");
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
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        let fresh = TraceParent::continue_or_start(TraceParent::parse("garbage").as_ref());
        assert_eq!(fresh.trace_id().len(), 32);
    }
}
