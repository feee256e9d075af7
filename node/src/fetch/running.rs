//! The fetches running in a node, for the fleet page and `/metrics`: each one's model, its
//! per-file progress, and where its bytes came from (peers by address, HuggingFace).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Instant,
};

use super::FetchProgress;
use crate::{discovery::Peers, limits::Limits};

/// The running fetches. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Transfers {
    map: Arc<Mutex<BTreeMap<u64, Arc<Transfer>>>>,
    next: Arc<AtomicU64>,
}

/// One running fetch.
#[derive(Debug)]
pub struct Transfer {
    /// Its number in this node.
    pub id: u64,
    /// What was asked for.
    pub model: String,
    /// When it started.
    pub started: Instant,
    /// Set once the model is resolved: its name and per-file counters.
    progress: OnceLock<(String, Arc<FetchProgress>)>,
    /// Bytes received from each peer before it started.
    peers_at_start: HashMap<SocketAddr, u64>,
    /// Bytes received from HuggingFace before it started.
    hf_at_start: u64,
}

/// Removes its transfer from the list when dropped.
#[derive(Debug)]
pub struct Running {
    transfers: Transfers,
    /// The transfer.
    pub transfer: Arc<Transfer>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.transfers
            .map
            .lock()
            .expect("transfers lock")
            .remove(&self.transfer.id);
    }
}

impl Transfers {
    /// Lists a fetch of `model` until the returned guard drops.
    pub fn start(&self, model: String, peers: &Peers, limits: &Limits) -> Running {
        let transfer = Arc::new(Transfer {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            model,
            started: Instant::now(),
            progress: OnceLock::new(),
            peers_at_start: received_by_peer(peers),
            hf_at_start: limits.hf_bytes(),
        });
        self.map
            .lock()
            .expect("transfers lock")
            .insert(transfer.id, transfer.clone());
        Running {
            transfers: self.clone(),
            transfer,
        }
    }

    /// The running fetches, oldest first.
    pub fn list(&self) -> Vec<Arc<Transfer>> {
        self.map
            .lock()
            .expect("transfers lock")
            .values()
            .cloned()
            .collect()
    }

    /// Whether any fetch runs.
    pub fn is_empty(&self) -> bool {
        self.map.lock().expect("transfers lock").is_empty()
    }
}

impl Transfer {
    /// Records the resolved model's name and progress counters.
    pub fn set_progress(&self, name: &str, progress: Arc<FetchProgress>) {
        let _ = self.progress.set((name.to_string(), progress));
    }

    /// The resolved name and progress, once known.
    pub fn progress(&self) -> Option<(&str, &Arc<FetchProgress>)> {
        self.progress.get().map(|(n, p)| (n.as_str(), p))
    }

    /// Bytes received since it started, by source: each peer's address, and `huggingface`.
    /// (Two fetches running at once share these counters.)
    pub fn sources(&self, peers: &Peers, hf_bytes: u64) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = received_by_peer(peers)
            .into_iter()
            .map(|(addr, received)| {
                let before = self.peers_at_start.get(&addr).copied().unwrap_or(0);
                (addr.to_string(), received.saturating_sub(before))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let hf = hf_bytes.saturating_sub(self.hf_at_start);
        if hf > 0 {
            out.push(("huggingface".into(), hf));
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.1));
        out
    }
}

/// Verified bytes received so far from every peer known or connected, read live.
fn received_by_peer(peers: &Peers) -> HashMap<SocketAddr, u64> {
    let mut addrs: Vec<SocketAddr> = peers.addrs();
    addrs.extend(peers.connections().borrow().keys().copied());
    addrs
        .into_iter()
        .map(|a| (a, peers.counters(a).received.load(Ordering::Relaxed)))
        .collect()
}
