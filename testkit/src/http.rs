//! A minimal HTTP/1.1 client for the admin endpoints of the project's
//! binaries (`/health`, `/ready`, `/metrics`) and the gateway's HTTP API.
//!
//! Deliberately tiny: one request per connection, `Connection: close`, simple
//! chunked bodies, so a test sees exactly what the server wrote.

use std::io::{Read, Write};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a response may take.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// `method path` on `127.0.0.1:port` with `headers` and `body`; returns the
/// status and the (unchunked) body. Panics when nothing listens.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    try_http(port, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"))
}

/// [`http`], with connection errors returned instead of panicking.
pub async fn try_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(request(method, path, headers, body).as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(RESPONSE_TIMEOUT, stream.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))??;
    Ok(parse_response(&String::from_utf8_lossy(&out)))
}

/// `GET path`: status and body, or `(0, "")` when nothing listens (for polling).
pub async fn get(port: u16, path: &str) -> (u16, String) {
    try_http(port, "GET", path, &[], "")
        .await
        .unwrap_or((0, String::new()))
}

/// Blocking `GET` returning only the status (for polling from sync code).
pub fn http_status_blocking(port: u16, path: &str) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(request("GET", path, &[], "").as_bytes())
        .ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (key, value) in headers {
        request.push_str(&format!("{key}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    request
}

/// Status and body of a whole response; a chunked body is joined.
fn parse_response(text: &str) -> (u16, String) {
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    if !text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (status, body);
    }
    let mut rest = body.as_str();
    let mut joined = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || tail.len() < size {
            break;
        }
        joined.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    (status, joined)
}

/// Samples of a Prometheus/OpenMetrics text body: each line's series (name
/// and labels) and value, comments skipped.
pub fn samples(body: &str) -> impl Iterator<Item = (&str, f64)> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series, value.parse().ok()?))
        })
}

/// The value of the first sample whose line starts with `prefix` (a metric
/// name, a name followed by a space for the unlabelled series, or a whole
/// series with labels); 0 when there is none.
pub fn first_sample(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|line| line.starts_with(prefix) && !line.starts_with('#'))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every sample of metric `name`, whatever its labels.
pub fn sum_samples(body: &str, name: &str) -> f64 {
    samples(body)
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .map(|(_, value)| value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "# HELP x_total Things.\n# TYPE x_total counter\n\
        x_total{kind=\"a\"} 2\nx_total{kind=\"b\"} 3\nx_total_other 7\ny 1.5\n";

    #[test]
    fn metrics_are_read_by_series_or_summed_by_name() {
        assert_eq!(sum_samples(BODY, "x_total"), 5.0);
        assert_eq!(sum_samples(BODY, "y"), 1.5);
        assert_eq!(sum_samples(BODY, "missing"), 0.0);
        assert_eq!(first_sample(BODY, "x_total{kind=\"b\"}"), 3.0);
        assert_eq!(first_sample(BODY, "y "), 1.5);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let response =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(response), (200, "abcde".to_owned()));
        assert_eq!(
            parse_response("HTTP/1.1 503 Service Unavailable\r\n\r\nno"),
            (503, "no".to_owned())
        );
    }
}
