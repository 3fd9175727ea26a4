//! Secrets in configuration: kept out of `Debug` output, logs and serialized dumps.

use std::fmt;

/// A secret string (a token, a password, an nkey seed, a SASL password).
///
/// Its `Debug` output and its serialized form are `"***"`, so it never reaches a log or a dump
/// of a configuration; only [`expose`](Self::expose) gives the value, for the client library.
/// It deserializes from a plain string.
///
/// ```
/// use eventbus_core::Secret;
///
/// let secret = Secret::new("s3cr3t");
/// assert_eq!(format!("{secret:?}"), "***");
/// assert_eq!(secret.expose(), "s3cr3t");
/// assert_eq!(serde_json::to_string(&secret).unwrap(), r#""***""#);
/// let read: Secret = serde_json::from_str(r#""hunter2""#).unwrap();
/// assert_eq!(read.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}
