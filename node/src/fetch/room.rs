//! Making room before a fetch moves bytes: evict least recently used unpinned models to stay
//! under `max_store`, then check the disks have space for what is missing.

use std::collections::HashSet;

use mesh_proto::Hash;

use super::{target::check_space, FetchError, Fetcher, Target};
use crate::store::blocking;

impl Fetcher {
    /// Evicts models (never the fetch's own blobs, `keep`) until `missing` more bytes fit
    /// `max_store`, then checks that the store's disk and every target have room.
    pub(super) async fn make_room(
        &self,
        targets: &[Target],
        missing: u64,
        total: u64,
        keep: HashSet<Hash>,
    ) -> Result<(), FetchError> {
        let store = self.store.clone();
        blocking(move || {
            store.ensure_reserve();
            Ok(())
        })
        .await?;
        if let Some(max) = self.max_store {
            // Outboards take about 1/256 of the data.
            let need = missing + missing / 256;
            let store = self.store.clone();
            blocking(move || store.evict_for(need, max, &keep)).await?;
        }
        check_space(&self.store, targets, missing, total)
    }
}
