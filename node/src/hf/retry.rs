//! How Hub requests survive a flaky uplink: every request has connect and read timeouts, and
//! is retried with backoff on timeouts, connection errors, 5xx and 429 (honouring
//! `Retry-After`), as huggingface_hub does.

use std::time::Duration;

/// Attempts per request.
pub(crate) const ATTEMPTS: u32 = 5;
/// Time to set up a connection.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest silence allowed while reading an answer: a stalled body is abandoned and
/// re-requested (from where it stopped, for downloads).
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The wait before retry number `attempt` (0-based): 0.5, 1, 2, 4, 8 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500 << attempt.min(4))
}

/// Whether an answer with this status is worth asking again.
pub(crate) fn retryable_status(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
}

/// Whether a failed request (no answer, or a broken body) is worth asking again.
pub(crate) fn retryable_error(e: &reqwest::Error) -> bool {
    e.is_timeout() || e.is_connect() || e.is_request() || e.is_body() || e.is_decode()
}

/// How long the answer asks us to wait, if it says (`Retry-After: <seconds>`).
pub(crate) fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let secs: u64 = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_stops_at_eight_seconds() {
        let waits: Vec<u64> = (0..6).map(|a| backoff(a).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000]);
        assert!(retryable_status(reqwest::StatusCode::BAD_GATEWAY));
        assert!(retryable_status(reqwest::StatusCode::TOO_MANY_REQUESTS));
        assert!(!retryable_status(reqwest::StatusCode::NOT_FOUND));
    }
}
