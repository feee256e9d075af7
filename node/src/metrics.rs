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
    /// Bytes a fetch found already here (complete or resumed), counted when it ends.
    pub bytes_local: AtomicU64,
    /// Blobs `mesh verify` found corrupt in the store (and dropped).
    pub store_verify_failures: AtomicU64,
    /// File bytes sent to HF clients through the HF-compatible endpoint.
    pub bytes_served_hf_endpoint: AtomicU64,
}

impl Metrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
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
        out
    }
}
