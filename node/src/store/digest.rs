//! The hashes publishers name files by: a sha256 (HuggingFace LFS files, OCI and Ollama
//! blobs) or a git blob id (sha1 over `blob <len>\0` and the bytes: HuggingFace's small files).
//! A file from outside the mesh is trusted only once its bytes hash to what its publisher
//! says; the store then records the published hash next to the file's BLAKE3 root.

use std::{io::Read, path::Path};

use sha1::Digest as _;

/// A file's published hash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Published {
    /// A sha256 of the bytes (lowercase hex).
    Sha256(String),
    /// A git blob id (lowercase hex).
    GitBlob(String),
}

impl Published {
    /// The hex digest: what HuggingFace clients key their cache on (the "etag").
    pub fn hex(&self) -> &str {
        match self {
            Self::Sha256(h) | Self::GitBlob(h) => h,
        }
    }

    /// The same kind of hash over the file at `path`, as hex.
    pub fn of_file(&self, path: &Path) -> std::io::Result<String> {
        let mut f = std::fs::File::open(path)?;
        let mut hasher = self.hasher(f.metadata()?.len());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(hasher.finish());
            }
            hasher.update(&buf[..n]);
        }
    }

    /// An incremental hasher of this kind for `size` bytes, fed in order.
    pub fn hasher(&self, size: u64) -> PublishedHasher {
        match self {
            Self::Sha256(_) => PublishedHasher::Sha256(sha2::Sha256::new()),
            Self::GitBlob(_) => {
                let mut git = sha1::Sha1::new();
                git.update(format!("blob {size}\0").as_bytes());
                PublishedHasher::GitBlob(git)
            }
        }
    }
}

/// A published hash computed as the bytes come, in order ([`Published::hasher`]).
#[derive(Clone)]
pub enum PublishedHasher {
    /// sha256.
    Sha256(sha2::Sha256),
    /// sha1 over `blob <len>\0` and the bytes.
    GitBlob(sha1::Sha1),
}

impl PublishedHasher {
    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::GitBlob(h) => h.update(bytes),
        }
    }

    /// The hex digest of everything fed.
    pub fn finish(self) -> String {
        match self {
            Self::Sha256(h) => hex::encode(h.finalize()),
            Self::GitBlob(h) => hex::encode(h.finalize()),
        }
    }
}

impl std::fmt::Debug for PublishedHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sha256(_) => "PublishedHasher::Sha256",
            Self::GitBlob(_) => "PublishedHasher::GitBlob",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_git_blob_ids_match_known_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello\n").unwrap();
        // `printf 'hello\n' | sha256sum` and `git hash-object`.
        let sha = Published::Sha256(String::new()).of_file(&path).unwrap();
        assert_eq!(
            sha,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        let git = Published::GitBlob(String::new()).of_file(&path).unwrap();
        assert_eq!(git, "ce013625030ba8dba906f756967f9e9ca394464a");
    }

    #[test]
    fn fed_in_pieces_the_hasher_gives_the_whole_file_hash() {
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for published in [
            Published::Sha256(String::new()),
            Published::GitBlob(String::new()),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            std::fs::write(&path, &bytes).unwrap();
            let mut hasher = published.hasher(bytes.len() as u64);
            for piece in bytes.chunks(3_333) {
                hasher.update(piece);
            }
            assert_eq!(hasher.finish(), published.of_file(&path).unwrap());
        }
    }
}
