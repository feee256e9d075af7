//! [`Hash`]: a BLAKE3 root hash, the name of every blob.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A 32-byte BLAKE3 root hash. Blobs are named by it; model ids are one too.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hash([u8; 32]);

/// A string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a hash: expected 64 hex digits")]
pub struct ParseHashError;

impl Hash {
    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 10 hex digits, for logs and tables.
    pub fn fmt_short(&self) -> String {
        hex::encode(&self.0[..5])
    }
}

impl From<[u8; 32]> for Hash {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<blake3::Hash> for Hash {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl From<Hash> for blake3::Hash {
    fn from(hash: Hash) -> Self {
        Self::from_bytes(hash.0)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.fmt_short())
    }
}

impl FromStr for Hash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| ParseHashError)?;
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = Hash::of(b"mesh");
        assert_eq!(h.to_string().parse::<Hash>().unwrap(), h);
        assert_eq!(h, Hash::from(blake3::hash(b"mesh")));
        assert!("zz".parse::<Hash>().is_err());
        assert!(h.to_string()[..63].parse::<Hash>().is_err());
    }
}
