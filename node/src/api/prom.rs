//! The labelled and gauge series of `GET /metrics`, beside the plain counters of
//! [`crate::metrics`]: bytes by source and by destination, per-peer totals, transfers in
//! progress, verification failures by where they were caught, store and disk bytes, and which
//! limits bind. Labels stay bounded: sources and destinations are fixed sets, and at most
//! [`MAX_PEER_SERIES`] peers (those with the most bytes) get series.

use std::{fmt::Write, sync::atomic::Ordering};

use super::ApiState;

/// Peers with their own series, at most.
const MAX_PEER_SERIES: usize = 256;

/// The series, in Prometheus text format.
pub(super) fn series(state: &ApiState) -> String {
    let m = &state.metrics;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut out = String::new();
    family(
        &mut out,
        "mesh_bytes_received_by_source_total",
        "counter",
        "Verified bytes a fetch got, by source (local: already here when it started).",
        &[
            ("source=\"peer\"", get(&m.bytes_received)),
            ("source=\"hf\"", state.fetcher.limits.hf_bytes()),
            ("source=\"local\"", get(&m.bytes_local)),
        ],
    );
    family(
        &mut out,
        "mesh_bytes_served_total",
        "counter",
        "Bytes served, by destination: peers (blob data) and HF clients of the HF endpoint.",
        &[
            ("to=\"peers\"", get(&m.bytes_sent)),
            ("to=\"hf_endpoint\"", get(&m.bytes_served_hf_endpoint)),
        ],
    );
    family(
        &mut out,
        "mesh_verification_failures_total",
        "counter",
        "Data that failed verification: received from peers, found while serving, found by mesh verify.",
        &[
            ("where=\"received\"", get(&m.verify_failures)),
            ("where=\"served\"", get(&m.source_corrupt)),
            ("where=\"store\"", get(&m.store_verify_failures)),
        ],
    );
    // Live counters (the peer table's totals are a second old).
    let peer_set = &state.fetcher.peers;
    let mut peers: Vec<(String, u64, u64)> = peer_set
        .addrs()
        .into_iter()
        .map(|addr| {
            let c = peer_set.counters(addr);
            (format!("peer=\"{addr}\""), get(&c.received), get(&c.sent))
        })
        .collect();
    peers.sort_by_key(|p| std::cmp::Reverse(p.1 + p.2));
    peers.truncate(MAX_PEER_SERIES);
    let received: Vec<_> = peers.iter().map(|p| (p.0.clone(), p.1)).collect();
    let sent: Vec<_> = peers.iter().map(|p| (p.0.clone(), p.2)).collect();
    family(
        &mut out,
        "mesh_peer_received_bytes_total",
        "counter",
        "Verified bytes received from each peer.",
        &as_refs(&received),
    );
    family(
        &mut out,
        "mesh_peer_sent_bytes_total",
        "counter",
        "Blob bytes sent to each peer.",
        &as_refs(&sent),
    );
    let transfers = state.fetcher.transfers.list();
    let files: usize = transfers
        .iter()
        .filter_map(|t| t.progress())
        .flat_map(|(_, p)| p.files.iter())
        .filter(|f| f.done.load(Ordering::Relaxed) < f.size)
        .count();
    family(
        &mut out,
        "mesh_transfers_in_progress",
        "gauge",
        "Fetches running in this node.",
        &[("", transfers.len() as u64)],
    );
    family(
        &mut out,
        "mesh_transfer_files_in_progress",
        "gauge",
        "Files of running fetches not yet complete.",
        &[("", files as u64)],
    );
    let (store_bytes, disk_free) = state.rates.disk();
    family(
        &mut out,
        "mesh_store_bytes",
        "gauge",
        "Disk bytes the store folder uses.",
        &[("", store_bytes)],
    );
    family(
        &mut out,
        "mesh_disk_free_bytes",
        "gauge",
        "Free bytes on the store's disk.",
        &[("", disk_free)],
    );
    let limits: Vec<(String, u64)> = state
        .fetcher
        .limits
        .status()
        .iter()
        .map(|l| (format!("limit=\"{}\"", l.name), u64::from(l.binding)))
        .collect();
    family(
        &mut out,
        "mesh_limit_binding",
        "gauge",
        "1 while a configured limit holds transfers back.",
        &as_refs(&limits),
    );
    out
}

fn as_refs(v: &[(String, u64)]) -> Vec<(&str, u64)> {
    v.iter().map(|(l, n)| (l.as_str(), *n)).collect()
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, series: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in series {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}
