//! Node counters, shared by the provider, the fetcher and the local API (Prometheus text).

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters. Cheap to bump from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Blob data bytes sent to peers (bao leaves, not framing).
    pub bytes_sent: AtomicU64,
    /// Of those, bytes of blocks we were still fetching, passed on as they were verified.
    pub bytes_passed_on: AtomicU64,
    /// Blob data bytes received from peers and verified.
    pub bytes_received: AtomicU64,
    /// Verified bytes received that were already present (endgame duplicates).
    pub bytes_duplicate: AtomicU64,
    /// Range requests served.
    pub requests_served: AtomicU64,
    /// Connections refused for a wrong mesh key.
    pub auth_failures: AtomicU64,
    /// Blobs found corrupt or changed while serving them.
    pub source_corrupt: AtomicU64,
    /// Pieces from peers that failed verification.
    pub verify_failures: AtomicU64,
    /// File bytes downloaded from HuggingFace.
    pub bytes_from_hf: AtomicU64,
    /// File bytes sent to clients of the HF-compatible endpoint.
    pub bytes_served_hf_endpoint: AtomicU64,
    /// Requests to the HF-compatible endpoint, by answer ([`HF_STATUSES`], then "other").
    pub hf_requests: [AtomicU64; HF_STATUSES.len() + 1],
    /// Bytes a fetch found already here (complete or resumed), counted when it ends.
    pub bytes_local: AtomicU64,
    /// Blobs `mesh verify` found corrupt in the store (and dropped).
    pub store_verify_failures: AtomicU64,
}

/// The statuses the HF endpoint's requests are counted by (a bounded label set).
pub const HF_STATUSES: [u16; 11] = [200, 206, 302, 400, 401, 403, 404, 416, 500, 502, 503];

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes downloaded from HuggingFace.
    pub fn add_from_hf(&self, n: u64) {
        Self::add(&self.bytes_from_hf, n);
    }

    /// Counts one answer of the HF endpoint.
    pub fn count_hf_request(&self, status: u16) {
        let i = HF_STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(HF_STATUSES.len());
        Self::add(&self.hf_requests[i], 1);
    }

    /// HF endpoint requests by status, as (label, count).
    pub fn hf_requests(&self) -> Vec<(String, u64)> {
        let label = |i: usize| HF_STATUSES.get(i).map_or("other".into(), |s| s.to_string());
        self.hf_requests
            .iter()
            .enumerate()
            .map(|(i, c)| (label(i), c.load(Ordering::Relaxed)))
            .collect()
    }

    /// The counters as (name, help, value).
    pub fn snapshot(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            (
                "mesh_bytes_sent_total",
                "Blob bytes sent to peers.",
                get(&self.bytes_sent),
            ),
            (
                "mesh_bytes_passed_on_total",
                "Blob bytes sent while we were still fetching their block.",
                get(&self.bytes_passed_on),
            ),
            (
                "mesh_bytes_received_total",
                "Verified blob bytes received from peers.",
                get(&self.bytes_received),
            ),
            (
                "mesh_bytes_duplicate_total",
                "Verified bytes received that were already present.",
                get(&self.bytes_duplicate),
            ),
            (
                "mesh_requests_served_total",
                "Range requests served.",
                get(&self.requests_served),
            ),
            (
                "mesh_auth_failures_total",
                "Connections refused for a wrong mesh key.",
                get(&self.auth_failures),
            ),
            (
                "mesh_source_corrupt_total",
                "Blobs that failed verification while being served.",
                get(&self.source_corrupt),
            ),
            (
                "mesh_verify_failures_total",
                "Received pieces that failed verification.",
                get(&self.verify_failures),
            ),
            (
                "mesh_bytes_from_hf_total",
                "File bytes downloaded from HuggingFace.",
                get(&self.bytes_from_hf),
            ),
            (
                "mesh_bytes_served_hf_endpoint_total",
                "File bytes sent to clients of the HF-compatible endpoint.",
                get(&self.bytes_served_hf_endpoint),
            ),
        ]
    }

    /// Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in self.snapshot() {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        let name = "mesh_hf_endpoint_requests_total";
        out.push_str(&format!(
            "# HELP {name} Requests to the HF-compatible endpoint, by status.\n# TYPE {name} counter\n"
        ));
        for (status, value) in self.hf_requests() {
            out.push_str(&format!("{name}{{status=\"{status}\"}} {value}\n"));
        }
        out
    }
}
