//! A HuggingFace file at a commit as an origin of byte ranges, so that nodes fetching it at
//! once split its pieces (`swarm::origin`).

use super::{Hub, HubError, HubFile};
use crate::swarm::origin::{OriginFile, RangeOrigin, SplitError};

/// One file at one commit, as a range origin for the fleet split.
#[derive(Clone, Debug)]
pub struct HubRange {
    /// The client.
    pub hub: Hub,
    /// `org/name`.
    pub repo: String,
    /// The commit.
    pub commit: String,
    /// The file.
    pub file: HubFile,
}

impl HubRange {
    /// The file as the fleet split sees it.
    pub fn origin_file(&self) -> OriginFile {
        OriginFile {
            name: self.file.path.clone(),
            size: self.file.size,
            published: self.file.published(),
        }
    }
}

impl RangeOrigin for HubRange {
    type Error = HubError;

    async fn fetch_range(&self, start: u64, len: u64) -> Result<Vec<u8>, HubError> {
        self.hub
            .download_range(&self.repo, &self.commit, &self.file, start, len)
            .await
    }
}

impl From<SplitError<Self>> for HubError {
    fn from(e: SplitError<Self>) -> Self {
        match e {
            SplitError::Origin(e) => e,
            SplitError::Io { path, source } => Self::Io { path, source },
            SplitError::Mismatch {
                name,
                expected,
                actual,
            } => Self::Mismatch {
                path: name,
                expected,
                actual,
            },
        }
    }
}
