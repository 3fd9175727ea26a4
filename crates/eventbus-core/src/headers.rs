//! Message headers.

use std::borrow::Cow;

use bytes::Bytes;

use crate::dead_letter::{
    HEADER_DEAD_LETTERED_AT, HEADER_ERROR_MESSAGE, HEADER_FAILED_ATTEMPTS, HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION, HEADER_ORIGINAL_STREAM_SEQUENCE, HEADER_ORIGINAL_TOPIC,
};
use crate::envelope::{
    HEADER_AGGREGATE_ID, HEADER_CORRELATION_ID, HEADER_EVENT_ID, HEADER_EVENT_TYPE,
    HEADER_EVENT_VERSION, HEADER_TENANT_ID, HEADER_TRACE_ID,
};

/// The header that carries a message's key where the broker has no record key (NATS).
pub const HEADER_MESSAGE_KEY: &str = "X-Message-Key";

/// Header names the bus and its peers write on nearly every message: a consumed message that
/// carries them shares these instead of allocating a name per header.
const KNOWN_NAMES: &[&str] = &[
    HEADER_EVENT_ID,
    HEADER_AGGREGATE_ID,
    HEADER_EVENT_TYPE,
    HEADER_EVENT_VERSION,
    HEADER_TRACE_ID,
    HEADER_CORRELATION_ID,
    HEADER_TENANT_ID,
    HEADER_ORIGINAL_TOPIC,
    HEADER_ERROR_MESSAGE,
    HEADER_FAILED_ATTEMPTS,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ORIGINAL_PARTITION,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_STREAM_SEQUENCE,
    HEADER_MESSAGE_KEY,
    "Nats-Msg-Id",
    "traceparent",
    "tracestate",
];

/// `name` as stored: a shared name when it is a known one, else its own string.
fn stored_name<N: AsRef<str> + Into<String>>(name: N) -> Cow<'static, str> {
    let wanted = name.as_ref();
    match KNOWN_NAMES.iter().find(|known| **known == wanted) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(name.into()),
    }
}

/// The longest header value the bus writes itself (`X-Error-Message` and the envelope headers):
/// longer text is cut at a character boundary and ends with `…`.
pub const MAX_HEADER_VALUE: usize = 4096;

/// `text` made safe as a header value on every transport: CR, LF and tab as `\r`, `\n`, `\t`,
/// other control characters (U+0000–U+001F, U+007F) as `\u00xx`, and at most
/// [`MAX_HEADER_VALUE`] bytes. The bus applies it to the header values it generates from fields
/// that may hold anything (an error message, an envelope's event type or trace ID), so that a
/// multi-line `assert_eq!` panic or a Go service's odd field cannot make a publish or a
/// dead-letter write fail.
///
/// ```
/// use eventbus_core::header_value;
///
/// assert_eq!(header_value("assertion failed\n  left: 1"), "assertion failed\\n  left: 1");
/// assert_eq!(header_value("bell\u{7}"), "bell\\u0007");
/// assert_eq!(header_value("plain ünïcode"), "plain ünïcode");
/// ```
pub fn header_value(text: &str) -> String {
    if text.len() <= MAX_HEADER_VALUE && !text.bytes().any(|byte| byte.is_ascii_control()) {
        return text.to_owned();
    }
    let mut escaped = String::with_capacity(text.len().min(MAX_HEADER_VALUE));
    for c in text.chars() {
        let piece = match c {
            '\r' => "\\r".to_owned(),
            '\n' => "\\n".to_owned(),
            '\t' => "\\t".to_owned(),
            c if c.is_ascii_control() => format!("\\u{:04x}", u32::from(c)),
            c => c.to_string(),
        };
        if escaped.len() + piece.len() > MAX_HEADER_VALUE - '…'.len_utf8() {
            escaped.push('…');
            break;
        }
        escaped.push_str(&piece);
    }
    escaped
}

/// Message headers: ordered, case-preserving, repeated names kept, values are bytes.
///
/// This is the common shape of Kafka record headers and NATS message headers. Lookups by name
/// are exact (case-sensitive); with a repeated name, [`get`](Self::get) returns the last value,
/// as a map built from the list would.
///
/// ```
/// use eventbus_core::Headers;
///
/// let mut headers = Headers::new();
/// headers.append("X-Trace", "a");
/// headers.append("X-Trace", "b");
/// headers.insert("X-Event-Type", "OrderCreated");
/// assert_eq!(headers.get("X-Trace"), Some(&b"b"[..]));
/// assert_eq!(headers.get_all("X-Trace").count(), 2);
/// assert_eq!(headers.get_str("X-Event-Type"), Some("OrderCreated"));
/// assert_eq!(headers.get("x-trace"), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(Cow<'static, str>, Bytes)>,
}

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// No headers, with room for `entries` of them (a transport copying a record's headers).
    pub fn with_capacity(entries: usize) -> Self {
        Self {
            entries: Vec::with_capacity(entries),
        }
    }

    /// The number of entries, repeated names counted each time.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds an entry after the existing ones, keeping any with the same name.
    pub fn append<N: AsRef<str> + Into<String>>(&mut self, name: N, value: impl Into<Bytes>) {
        self.entries.push((stored_name(name), value.into()));
    }

    /// Sets `name` to `value`: removes every entry with that exact name, then appends.
    pub fn insert<N: AsRef<str> + Into<String>>(&mut self, name: N, value: impl Into<Bytes>) {
        let name = stored_name(name);
        self.remove(&name);
        self.entries.push((name, value.into()));
    }

    /// Removes every entry named `name`; returns how many there were.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|(entry, _)| entry != name);
        before - self.entries.len()
    }

    /// The last value of `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .rev()
            .find(|(entry, _)| entry == name)
            .map(|(_, value)| value.as_ref())
    }

    /// The last value of `name`, if it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.entries
            .iter()
            .filter(move |(entry, _)| entry == name)
            .map(|(_, value)| value.as_ref())
    }

    /// True when at least one entry is named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|(entry, _)| entry == name)
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries
            .iter()
            .map(|(name, value)| (name.as_ref(), value.as_ref()))
    }
}

impl<N: AsRef<str> + Into<String>, V: Into<Bytes>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        headers.extend(iter);
        headers
    }
}

impl<N: AsRef<str> + Into<String>, V: Into<Bytes>> Extend<(N, V)> for Headers {
    fn extend<I: IntoIterator<Item = (N, V)>>(&mut self, iter: I) {
        for (name, value) in iter {
            self.append(name, value);
        }
    }
}

impl IntoIterator for Headers {
    type Item = (String, Bytes);
    type IntoIter = std::iter::Map<
        std::vec::IntoIter<(Cow<'static, str>, Bytes)>,
        fn((Cow<'static, str>, Bytes)) -> (String, Bytes),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries
            .into_iter()
            .map(|(name, value)| (name.into_owned(), value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_name_behaves_as_any_other_name() {
        let mut headers = Headers::new();
        headers.append(String::from("X-Event-ID"), "a");
        headers.append("x-event-id", "lower");
        headers.insert("X-Event-ID", "b");
        headers.append("X-Custom", "c");
        assert_eq!(headers.get_str(&String::from("X-Event-ID")), Some("b"));
        assert_eq!(headers.get_str("x-event-id"), Some("lower"));
        assert_eq!(headers.remove("X-Event-ID"), 1);
        let owned: Vec<(String, Bytes)> = headers.clone().into_iter().collect();
        assert_eq!(owned[0].0, "x-event-id");
        assert_eq!(owned[1].0, "X-Custom");
        let same: Headers = [("x-event-id", "lower"), ("X-Custom", "c")]
            .into_iter()
            .collect();
        assert_eq!(headers, same);
    }

    #[test]
    fn headers_keep_order_case_and_duplicates() {
        let headers: Headers = [("B", "1"), ("a", "2"), ("B", "3"), ("b", "4")]
            .into_iter()
            .collect();
        let names: Vec<&str> = headers.iter().map(|(name, _)| name).collect();
        assert_eq!(names, ["B", "a", "B", "b"]);
        assert_eq!(headers.get("B"), Some(&b"3"[..]));
        assert_eq!(headers.get("b"), Some(&b"4"[..]));
        assert_eq!(headers.get_all("B").collect::<Vec<_>>(), [&b"1"[..], b"3"]);
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn insert_replaces_every_entry_of_that_exact_name() {
        let mut headers: Headers = [("k", "1"), ("K", "2"), ("k", "3")].into_iter().collect();
        headers.insert("k", "new");
        assert_eq!(headers.get_all("k").collect::<Vec<_>>(), [&b"new"[..]]);
        assert!(headers.contains("K"));
        assert_eq!(headers.remove("k"), 1);
        assert_eq!(headers.remove("k"), 0);
        assert_eq!(headers.len(), 1);
    }

    #[test]
    fn values_are_bytes_not_necessarily_text() {
        let mut headers = Headers::new();
        headers.append("bin", vec![0xff, 0x00]);
        assert_eq!(headers.get("bin"), Some(&[0xff, 0x00][..]));
        assert_eq!(headers.get_str("bin"), None);
        assert!(Headers::new().is_empty());
    }
}
