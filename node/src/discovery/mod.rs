//! Where peer addresses come from, and the connections kept to them.
//!
//! Addresses have several sources ([`AddrSource`]): mDNS on the LAN ([`mdns`]), `--peer`
//! addresses named on a command line, and bootstrap peers from the config file (for peers on
//! another subnet, which mDNS doesn't reach). Each source adds and withdraws its own
//! addresses in one [`Discovery`]; the [`Peers`] set follows the merged view and keeps one
//! authenticated connection to every address in it. A new way to find peers (a tracker, DNS)
//! is one more source writing into [`Discovery`].

pub mod mdns;
mod peers;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::peers::{ask_models, Connections, PeerCounters, PeerInfo, Peers};

/// How an address became known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddrSource {
    /// The config file's `peers` (or `mesh node --peer`).
    Bootstrap,
    /// Named for one command (`mesh fetch --peer`).
    Explicit,
    /// Found on the LAN by mDNS.
    Mdns,
}

/// Every source's addresses.
pub type Sources = BTreeMap<AddrSource, BTreeSet<SocketAddr>>;

/// The merged stream of peer addresses. Cheap to clone; every clone writes to the same view.
#[derive(Clone, Debug)]
pub struct Discovery {
    sources: watch::Sender<Sources>,
}

impl Discovery {
    /// A view that starts with the bootstrap peers.
    pub fn new(bootstrap: &[SocketAddr]) -> Self {
        let mut sources = Sources::new();
        if !bootstrap.is_empty() {
            sources.insert(AddrSource::Bootstrap, bootstrap.iter().copied().collect());
        }
        Self {
            sources: watch::channel(sources).0,
        }
    }

    /// Adds one address from `source`.
    pub fn add(&self, source: AddrSource, addr: SocketAddr) {
        self.sources
            .send_if_modified(|s| s.entry(source).or_default().insert(addr));
    }

    /// Replaces every address `source` knows.
    pub fn set(&self, source: AddrSource, addrs: BTreeSet<SocketAddr>) {
        self.sources.send_if_modified(|s| {
            let old = s.entry(source).or_default();
            let changed = *old != addrs;
            *old = addrs;
            changed
        });
    }

    /// Follows every change.
    pub fn watch(&self) -> watch::Receiver<Sources> {
        self.sources.subscribe()
    }
}

/// Every known address, with the source it is shown under (mDNS first, then explicit, then
/// bootstrap).
pub fn merged(sources: &Sources) -> BTreeMap<SocketAddr, AddrSource> {
    let mut out = BTreeMap::new();
    for (source, addrs) in sources {
        for addr in addrs {
            out.insert(*addr, *source);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_merge_into_one_view_and_withdraw_their_own_addresses() {
        let a: SocketAddr = "10.0.0.1:7341".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7341".parse().unwrap();
        let d = Discovery::new(&[a]);
        let mut rx = d.watch();
        d.set(AddrSource::Mdns, [a, b].into());
        assert!(rx.has_changed().unwrap());
        let view = merged(&rx.borrow_and_update());
        assert_eq!(view[&a], AddrSource::Mdns);
        assert_eq!(view[&b], AddrSource::Mdns);
        // mDNS expires both: the bootstrap address stays.
        d.set(AddrSource::Mdns, BTreeSet::new());
        let view = merged(&rx.borrow_and_update());
        assert_eq!(
            view.into_iter().collect::<Vec<_>>(),
            vec![(a, AddrSource::Bootstrap)]
        );
        d.add(AddrSource::Explicit, b);
        d.add(AddrSource::Explicit, b);
        assert_eq!(merged(&rx.borrow_and_update())[&b], AddrSource::Explicit);
        assert!(
            !rx.has_changed().unwrap(),
            "adding a known address changes nothing"
        );
    }
}
