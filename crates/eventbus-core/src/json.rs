//! A small JSON reader and writer with the Go SDK's quirks (private).
//!
//! The envelope must decode whatever the Go services accept and encode the exact bytes they send.
//! `serde_json` is stricter on input (invalid UTF-8 and lone surrogates are errors, duplicate
//! fields are errors) and differs on output (no HTML escaping), so the envelope's outer object is
//! read and written here. The reader never recurses (nesting is tracked on a heap stack up to Go's
//! limit of 10,000 levels) and never indexes out of bounds, so it cannot panic on any input.

use std::borrow::Cow;

/// Go's `encoding/json` refuses documents nested deeper than this.
const MAX_DEPTH: usize = 10_000;

/// A JSON syntax error: where and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub(crate) offset: usize,
    pub(crate) reason: &'static str,
}

/// The kind of the next value, judged by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

/// A cursor over a JSON document.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn slice(&self, start: usize, end: usize) -> &'a [u8] {
        self.bytes.get(start..end).unwrap_or_default()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn error(&self, reason: &'static str) -> SyntaxError {
        SyntaxError {
            offset: self.pos,
            reason,
        }
    }

    fn unexpected(&self) -> SyntaxError {
        match self.peek() {
            None => self.error("unexpected end of JSON input"),
            Some(_) => self.error("invalid character"),
        }
    }

    /// Skips JSON whitespace (space, tab, line feed, carriage return).
    pub(crate) fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// Consumes `byte` or fails.
    pub(crate) fn expect(&mut self, byte: u8) -> Result<(), SyntaxError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    /// Consumes `byte` if it is next.
    pub(crate) fn eat(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// True when only whitespace is left.
    pub(crate) fn at_end(&mut self) -> bool {
        self.skip_whitespace();
        self.pos >= self.bytes.len()
    }

    /// The kind of the value that starts here (whitespace already skipped).
    pub(crate) fn next_kind(&self) -> Result<Next, SyntaxError> {
        match self.peek() {
            Some(b'{') => Ok(Next::Object),
            Some(b'[') => Ok(Next::Array),
            Some(b'"') => Ok(Next::String),
            Some(b'-' | b'0'..=b'9') => Ok(Next::Number),
            Some(b't' | b'f') => Ok(Next::Bool),
            Some(b'n') => Ok(Next::Null),
            _ => Err(self.unexpected()),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), SyntaxError> {
        for &expected in word {
            if self.peek() != Some(expected) {
                return Err(self.unexpected());
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// Consumes `null`.
    pub(crate) fn null(&mut self) -> Result<(), SyntaxError> {
        self.literal(b"null")
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    /// Consumes a number; returns its text and whether it is an integer literal.
    pub(crate) fn number(&mut self) -> Result<(&'a [u8], bool), SyntaxError> {
        let start = self.pos;
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.unexpected()),
        }
        let mut integer = true;
        if self.eat(b'.') {
            integer = false;
            if self.digits() == 0 {
                return Err(self.unexpected());
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            integer = false;
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.unexpected());
            }
        }
        Ok((self.slice(start, self.pos), integer))
    }

    /// Consumes a string without decoding it; returns the bytes between the quotes.
    ///
    /// Like Go's scanner it checks escapes and control characters but not UTF-8.
    pub(crate) fn raw_string(&mut self) -> Result<&'a [u8], SyntaxError> {
        self.expect(b'"')?;
        let start = self.pos;
        loop {
            match self.peek() {
                None => return Err(self.error("unexpected end of JSON input")),
                Some(b'"') => {
                    let raw = self.slice(start, self.pos);
                    self.pos += 1;
                    return Ok(raw);
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            self.pos += 1
                        }
                        Some(b'u') => {
                            self.pos += 1;
                            self.hex4()?;
                        }
                        _ => return Err(self.error("invalid escape in string")),
                    }
                }
                Some(0..0x20) => return Err(self.error("control character in string")),
                Some(_) => self.pos += 1,
            }
        }
    }

    fn hex4(&mut self) -> Result<u16, SyntaxError> {
        let mut value: u16 = 0;
        for _ in 0..4 {
            let digit = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.error("invalid \\u escape in string")),
            };
            value = (value << 4) | u16::from(digit);
            self.pos += 1;
        }
        Ok(value)
    }

    /// Consumes and decodes a string the way Go's `encoding/json` does: invalid UTF-8 bytes
    /// and lone surrogate escapes each become U+FFFD.
    pub(crate) fn string(&mut self) -> Result<Cow<'a, str>, SyntaxError> {
        let start = self.pos + 1;
        let raw = self.raw_string()?;
        if let Ok(plain) = std::str::from_utf8(raw)
            && !raw.contains(&b'\\')
        {
            return Ok(Cow::Borrowed(plain));
        }
        decode_string(raw, start).map(Cow::Owned)
    }

    /// Consumes one value of any kind, checking its syntax; returns its span.
    pub(crate) fn skip_value(&mut self) -> Result<(usize, usize), SyntaxError> {
        let start = self.pos;
        let mut open: Vec<u8> = Vec::new();
        'value: loop {
            self.skip_whitespace();
            match self.next_kind()? {
                Next::Object => {
                    if open.len() >= MAX_DEPTH {
                        return Err(self.error("exceeded max depth"));
                    }
                    self.pos += 1;
                    self.skip_whitespace();
                    if !self.eat(b'}') {
                        open.push(b'}');
                        self.member_name()?;
                        continue 'value;
                    }
                }
                Next::Array => {
                    if open.len() >= MAX_DEPTH {
                        return Err(self.error("exceeded max depth"));
                    }
                    self.pos += 1;
                    self.skip_whitespace();
                    if !self.eat(b']') {
                        open.push(b']');
                        continue 'value;
                    }
                }
                Next::String => {
                    self.raw_string()?;
                }
                Next::Number => {
                    self.number()?;
                }
                Next::Bool => {
                    if self.peek() == Some(b't') {
                        self.literal(b"true")?;
                    } else {
                        self.literal(b"false")?;
                    }
                }
                Next::Null => self.null()?,
            }
            // A value ended: close containers until one expects another element.
            loop {
                let Some(&close) = open.last() else {
                    return Ok((start, self.pos));
                };
                self.skip_whitespace();
                if self.eat(b',') {
                    if close == b'}' {
                        self.skip_whitespace();
                        self.member_name()?;
                    }
                    continue 'value;
                }
                if self.eat(close) {
                    open.pop();
                } else {
                    return Err(self.unexpected());
                }
            }
        }
    }

    /// Consumes `"name"` and the `:` after it.
    fn member_name(&mut self) -> Result<(), SyntaxError> {
        self.raw_string()?;
        self.skip_whitespace();
        self.expect(b':')
    }
}

/// Decodes the bytes between a string's quotes (already syntax-checked).
fn decode_string(raw: &[u8], offset: usize) -> Result<String, SyntaxError> {
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&byte) = raw.get(i) {
        match byte {
            b'\\' => {
                let escape = raw.get(i + 1).copied();
                i += 2;
                let simple = match escape {
                    Some(b'"') => '"',
                    Some(b'\\') => '\\',
                    Some(b'/') => '/',
                    Some(b'b') => '\u{8}',
                    Some(b'f') => '\u{c}',
                    Some(b'n') => '\n',
                    Some(b'r') => '\r',
                    Some(b't') => '\t',
                    Some(b'u') => {
                        let unit = hex4_at(raw, i).ok_or(SyntaxError {
                            offset: offset + i,
                            reason: "invalid \\u escape in string",
                        })?;
                        i += 4;
                        out.push(decode_utf16_escape(unit, raw, &mut i));
                        continue;
                    }
                    _ => {
                        return Err(SyntaxError {
                            offset: offset + i,
                            reason: "invalid escape in string",
                        });
                    }
                };
                out.push(simple);
            }
            0..0x80 => {
                out.push(char::from(byte));
                i += 1;
            }
            _ => match decode_utf8(raw.get(i..).unwrap_or_default()) {
                Some((c, len)) => {
                    out.push(c);
                    i += len;
                }
                None => {
                    out.push(char::REPLACEMENT_CHARACTER);
                    i += 1;
                }
            },
        }
    }
    Ok(out)
}

/// Go's handling of `\uXXXX`: a high surrogate followed by an escaped low surrogate is one
/// character; any other surrogate becomes U+FFFD and consumes only itself.
fn decode_utf16_escape(unit: u16, raw: &[u8], i: &mut usize) -> char {
    if !(0xD800..=0xDFFF).contains(&unit) {
        return char::from_u32(u32::from(unit)).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    if (0xD800..0xDC00).contains(&unit)
        && raw.get(*i) == Some(&b'\\')
        && raw.get(*i + 1) == Some(&b'u')
        && let Some(low) = hex4_at(raw, *i + 2)
        && (0xDC00..=0xDFFF).contains(&low)
    {
        *i += 6;
        let code = 0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
        return char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
    }
    char::REPLACEMENT_CHARACTER
}

fn hex4_at(raw: &[u8], at: usize) -> Option<u16> {
    let digits = raw.get(at..at + 4)?;
    let text = std::str::from_utf8(digits).ok()?;
    u16::from_str_radix(text, 16).ok()
}

/// Decodes one UTF-8 character at the start of `bytes`, or `None` if it is invalid.
fn decode_utf8(bytes: &[u8]) -> Option<(char, usize)> {
    let len = match bytes.first()? {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    let text = std::str::from_utf8(bytes.get(..len)?).ok()?;
    text.chars().next().map(|c| (c, len))
}

/// Checks that `bytes` hold exactly one JSON value, with optional surrounding whitespace.
pub(crate) fn is_valid(bytes: &[u8]) -> Result<(), SyntaxError> {
    let mut reader = Reader::new(bytes);
    reader.skip_value()?;
    if reader.at_end() {
        Ok(())
    } else {
        Err(reader.error("invalid character after top-level value"))
    }
}

/// True when a valid JSON document is the literal `null`.
pub(crate) fn is_null(bytes: &[u8]) -> bool {
    bytes.trim_ascii() == b"null"
}

/// Appends `text` as a JSON string with the escaping of the Go SDK's encoder
/// (jsoniter's `ConfigCompatibleWithStandardLibrary`): `<`, `>`, `&`, U+2028 and U+2029 as
/// `\uXXXX`; `\n`, `\r`, `\t` short; other control characters as `\u00xx`.
pub(crate) fn write_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut copied = 0;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let escape: Option<&[u8]> = match byte {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            b'<' | b'>' | b'&' | 0..0x20 => None,
            0xE2 if matches!(bytes.get(i + 1..i + 3), Some([0x80, 0xA8 | 0xA9])) => None,
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(bytes.get(copied..i).unwrap_or_default());
        match escape {
            Some(short) => {
                out.extend_from_slice(short);
                i += 1;
            }
            None if byte == 0xE2 => {
                let last = bytes.get(i + 2).copied().unwrap_or_default();
                out.extend_from_slice(if last == 0xA8 { b"\\u2028" } else { b"\\u2029" });
                i += 3;
            }
            None => {
                out.extend_from_slice(b"\\u00");
                for nibble in [byte >> 4, byte & 0xF] {
                    out.extend(HEX.get(usize::from(nibble)));
                }
                i += 1;
            }
        }
        copied = i;
    }
    out.extend_from_slice(bytes.get(copied..).unwrap_or_default());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(json: &[u8]) -> Result<String, SyntaxError> {
        Reader::new(json).string().map(Cow::into_owned)
    }

    fn written(text: &str) -> String {
        let mut out = Vec::new();
        write_string(&mut out, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_decode_escapes_like_go() {
        assert_eq!(decoded(br#""a\"b\\c\/d\n\t""#).unwrap(), "a\"b\\c/d\n\t");
        assert_eq!(decoded(br#""\u00e9\u20ac""#).unwrap(), "é€");
        assert_eq!(decoded(br#""\ud83d\ude00""#).unwrap(), "😀");
    }

    #[test]
    fn lone_surrogates_and_invalid_utf8_become_replacement_characters() {
        assert_eq!(decoded(br#""\ud800x""#).unwrap(), "\u{FFFD}x");
        assert_eq!(decoded(br#""\udc00\ud83d\ude00""#).unwrap(), "\u{FFFD}😀");
        assert_eq!(decoded(br#""\ud800\u0041""#).unwrap(), "\u{FFFD}A");
        // Go replaces each invalid byte, not each maximal invalid sequence.
        assert_eq!(decoded(b"\"\xE2\x82A\"").unwrap(), "\u{FFFD}\u{FFFD}A");
        assert_eq!(decoded(b"\"\xFF\"").unwrap(), "\u{FFFD}");
    }

    #[test]
    fn strings_reject_control_characters_and_bad_escapes() {
        assert!(decoded(b"\"a\nb\"").is_err());
        assert!(decoded(br#""\x""#).is_err());
        assert!(decoded(br#""\u12""#).is_err());
        assert!(decoded(br#""open"#).is_err());
    }

    #[test]
    fn values_are_checked_like_go_scanner() {
        for ok in [
            "0",
            "-0",
            "1.5e-3",
            "[]",
            "{}",
            r#"{"a":[1,{"b":null}],"c":true}"#,
            " \t\n[ 1 , 2 ]\r ",
            r#""\u00e9""#,
        ] {
            assert_eq!(is_valid(ok.as_bytes()), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "+1",
            "[1,]",
            "{,}",
            r#"{"a"}"#,
            r#"{"a":1,}"#,
            "nul",
            "tru",
            "[1 2]",
            "{} {}",
            "NaN",
            "'a'",
            "[",
            "{\"a\":",
        ] {
            assert!(is_valid(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nesting_beyond_go_limit_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(is_valid(deep.as_bytes()).is_err());
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert_eq!(is_valid(ok.as_bytes()), Ok(()));
    }

    #[test]
    fn strings_are_written_with_go_html_escaping() {
        assert_eq!(written("a<b>&c"), r#""a\u003cb\u003e\u0026c""#);
        assert_eq!(written("q\"\\"), r#""q\"\\""#);
        assert_eq!(
            written("\n\r\t\u{8}\u{c}\u{1}\u{1f}"),
            r#""\n\r\t\u0008\u000c\u0001\u001f""#
        );
        assert_eq!(
            written("\u{2028}\u{2029}é\u{7f}"),
            "\"\\u2028\\u2029é\u{7f}\""
        );
        assert_eq!(written(""), r#""""#);
    }
}
