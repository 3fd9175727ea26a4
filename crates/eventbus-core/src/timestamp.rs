//! Timestamps as Go's `time.Time` writes and reads them in JSON (private).
//!
//! Writing follows `time.RFC3339Nano`: the fraction has its trailing zeros trimmed (no fraction
//! at all when it is zero), a zero offset is written `Z`, any other offset `±hh:mm`. Like Go, a
//! year outside 0..=9999 or an offset of 24 hours or more cannot be written.
//!
//! Reading follows Go's strict RFC 3339 parser: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±hh:mm)`, with
//! an uppercase `T` and `Z`, any number of fraction digits (beyond nine they are truncated), and
//! the offset kept as written.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// Go's zero `time.Time`, which a decoded envelope without a timestamp carries.
pub(crate) const GO_ZERO_TIME: OffsetDateTime = time::macros::datetime!(0001-01-01 0:00 UTC);

/// Formats like Go's `Time.MarshalJSON` (without the quotes).
pub(crate) fn format(timestamp: &OffsetDateTime) -> Result<String, &'static str> {
    let year = timestamp.year();
    if !(0..=9999).contains(&year) {
        return Err("year outside of range [0,9999]");
    }
    let offset_minutes = timestamp.offset().whole_seconds() / 60;
    if offset_minutes.abs() / 60 >= 24 {
        return Err("timezone hour outside of range [0,23]");
    }
    let mut out = format!(
        "{year:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        u8::from(timestamp.month()),
        timestamp.day(),
        timestamp.hour(),
        timestamp.minute(),
        timestamp.second()
    );
    let nanos = timestamp.nanosecond();
    if nanos != 0 {
        let fraction = format!("{nanos:09}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    if timestamp.offset().whole_seconds() == 0 {
        out.push('Z');
    } else {
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let minutes = offset_minutes.abs();
        out.push_str(&format!("{sign}{:02}:{:02}", minutes / 60, minutes % 60));
    }
    Ok(out)
}

/// Parses like Go's `Time.UnmarshalJSON` (the bytes between the quotes, not unescaped).
pub(crate) fn parse(text: &[u8]) -> Result<OffsetDateTime, &'static str> {
    const INVALID: &str = "not an RFC 3339 timestamp";
    let field = |start: usize, len: usize| -> Result<u32, &'static str> {
        let digits = text.get(start..start + len).ok_or(INVALID)?;
        digits.iter().try_fold(0u32, |value, &b| {
            if b.is_ascii_digit() {
                Ok(value * 10 + u32::from(b - b'0'))
            } else {
                Err(INVALID)
            }
        })
    };
    let separators_ok = text.get(4) == Some(&b'-')
        && text.get(7) == Some(&b'-')
        && text.get(10) == Some(&b'T')
        && text.get(13) == Some(&b':')
        && text.get(16) == Some(&b':');
    if !separators_ok {
        return Err(INVALID);
    }
    let year = i32::try_from(field(0, 4)?).map_err(|_| INVALID)?;
    let month = u8::try_from(field(5, 2)?)
        .ok()
        .and_then(|m| Month::try_from(m).ok())
        .ok_or("month out of range")?;
    let day = u8::try_from(field(8, 2)?).map_err(|_| INVALID)?;
    let date = Date::from_calendar_date(year, month, day).map_err(|_| "day out of range")?;
    let hour = field(11, 2)?;
    let minute = field(14, 2)?;
    let second = field(17, 2)?;
    if hour > 23 || minute > 59 || second > 59 {
        return Err("time out of range");
    }

    let mut rest = text.get(19..).unwrap_or_default();
    let mut nanos = 0u32;
    if rest.first() == Some(&b'.') && rest.get(1).is_some_and(u8::is_ascii_digit) {
        let digits = rest
            .iter()
            .skip(1)
            .take_while(|b| b.is_ascii_digit())
            .count();
        for position in 0..9 {
            let digit = if position < digits {
                rest.get(1 + position).map_or(0, |b| u32::from(b - b'0'))
            } else {
                0
            };
            nanos = nanos * 10 + digit;
        }
        rest = rest.get(1 + digits..).unwrap_or_default();
    }

    let offset = match rest {
        b"Z" => UtcOffset::UTC,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Result<i8, &'static str> {
                if a.is_ascii_digit() && b.is_ascii_digit() {
                    Ok(((a - b'0') * 10 + (b - b'0')) as i8)
                } else {
                    Err(INVALID)
                }
            };
            let (hours, minutes) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if hours > 23 || minutes > 59 {
                return Err("timezone offset out of range");
            }
            let (hours, minutes) = if *sign == b'-' {
                (-hours, -minutes)
            } else {
                (hours, minutes)
            };
            UtcOffset::from_hms(hours, minutes, 0).map_err(|_| "timezone offset out of range")?
        }
        _ => return Err(INVALID),
    };
    let clock = Time::from_hms_nano(hour as u8, minute as u8, second as u8, nanos)
        .map_err(|_| "time out of range")?;
    Ok(PrimitiveDateTime::new(date, clock).assume_offset(offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn formats_like_go_rfc3339_nano() {
        let cases = [
            (datetime!(2024-05-06 07:08:09 UTC), "2024-05-06T07:08:09Z"),
            (
                datetime!(2024-05-06 07:08:09.5 UTC),
                "2024-05-06T07:08:09.5Z",
            ),
            (
                datetime!(2024-05-06 07:08:09.123456789 +08:00),
                "2024-05-06T07:08:09.123456789+08:00",
            ),
            (
                datetime!(2024-05-06 07:08:09.000000120 -05:30),
                "2024-05-06T07:08:09.00000012-05:30",
            ),
            (GO_ZERO_TIME, "0001-01-01T00:00:00Z"),
            (datetime!(0000-01-01 00:00 UTC), "0000-01-01T00:00:00Z"),
        ];
        for (timestamp, expected) in cases {
            assert_eq!(format(&timestamp).unwrap(), expected);
        }
    }

    #[test]
    fn refuses_what_go_cannot_write() {
        assert!(format(&datetime!(-0001-01-01 00:00 UTC)).is_err());
        assert!(format(&datetime!(2024-01-01 00:00 +24:00)).is_err());
    }

    #[test]
    fn parses_go_strict_rfc3339() {
        for (text, expected) in [
            ("2024-05-06T07:08:09Z", "2024-05-06T07:08:09Z"),
            (
                "2024-05-06T07:08:09.1234567891234Z",
                "2024-05-06T07:08:09.123456789Z",
            ),
            (
                "2024-05-06T07:08:09.100+01:00",
                "2024-05-06T07:08:09.1+01:00",
            ),
            ("2024-05-06T07:08:09-00:00", "2024-05-06T07:08:09Z"),
            ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00Z"),
            ("9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-23:59"),
        ] {
            let parsed = parse(text.as_bytes()).unwrap();
            assert_eq!(format(&parsed).unwrap(), expected, "{text}");
        }
        for bad in [
            "",
            "2024-05-06",
            "2024-05-06 07:08:09Z",
            "2024-05-06t07:08:09Z",
            "2024-05-06T07:08:09z",
            "2024-05-06T07:08:09",
            "2024-05-06T7:08:09Z",
            "2024-05-06T07:08:09,5Z",
            "2024-05-06T07:08:09.Z",
            "2024-13-06T07:08:09Z",
            "2023-02-29T07:08:09Z",
            "2024-05-06T24:00:00Z",
            "2024-05-06T23:59:60Z",
            "2024-05-06T07:08:09+24:00",
            "2024-05-06T07:08:09+01:60",
            "2024-05-06T07:08:09+0100",
            "+2024-05-06T07:08:09Z",
            "2024-05-06T07:08:09ZZ",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }
}
