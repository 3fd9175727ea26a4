//! Shared by `metrics_reference.rs` and `prometheus_dashboard.rs`: what the metric reference of
//! docs/operations.md says about each metric, the repository's files, and a plain HTTP GET.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One row of the reference table of docs/operations.md.
pub(crate) struct Documented {
    /// Its type column: `counter`, `gauge` or `histogram`.
    pub(crate) kind: String,
    /// Its backends column: `all`, `NATS, Kafka`, `Kafka`, `all (only NATS sends them)`, ...
    pub(crate) backends: String,
}

impl Documented {
    /// Whether a bus of `backend` (`memory`, `nats`, `kafka`) serves it, by the backends column.
    pub(crate) fn served_by(&self, backend: &str) -> bool {
        self.backends.starts_with("all") || self.backends.to_lowercase().contains(backend)
    }
}

/// The path of `path`, relative to the repository's root.
pub(crate) fn repository_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The text of the repository's file `path`.
pub(crate) fn repository_file(path: &str) -> String {
    let file = repository_path(path);
    std::fs::read_to_string(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()))
}

/// The rows of the reference table of docs/operations.md ("Metric reference"), by metric name
/// (the first column, in backquotes, without the namespace).
pub(crate) fn documented() -> BTreeMap<String, Documented> {
    let guide = repository_file("docs/operations.md");
    let table = guide
        .split("### Metric reference")
        .nth(1)
        .expect("docs/operations.md has a \"Metric reference\" section");
    let rows: BTreeMap<String, Documented> = table
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .filter_map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = cells.get(1)?.split('`').nth(1)?;
            Some((
                name.to_owned(),
                Documented {
                    kind: (*cells.get(2)?).to_owned(),
                    backends: (*cells.get(4)?).to_owned(),
                },
            ))
        })
        .collect();
    assert!(
        !rows.is_empty(),
        "no rows in the metric reference of docs/operations.md"
    );
    rows
}

/// `GET {path}` on `address` over HTTP/1.0: the response's status code and body, or `None`
/// while nothing answers there (yet).
pub(crate) fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// The metric names `text` names after each `marker` (a namespace and its `_`, or the
/// dashboard's `${namespace}_`), in order; a histogram's `_bucket`, `_sum` and `_count` series
/// as the histogram itself.
pub(crate) fn metric_names_after(text: &str, marker: &str) -> Vec<String> {
    text.split(marker)
        .skip(1)
        .map(|piece| {
            let name: String = piece
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| base.ends_with("_seconds"))
                .map_or(name.clone(), str::to_owned)
        })
        .collect()
}
