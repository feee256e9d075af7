//! Model manifests: what a model is (named files with sizes and BLAKE3 roots), its canonical
//! encoding, and its id (the BLAKE3 hash of that encoding).
//!
//! A manifest can come from any peer, so decoding is where untrusted paths are checked: a
//! [`RelPath`] can only be built from a relative path of plain components, and a manifest can
//! only hold a set of paths that fits into one folder without clashes.

use std::{
    fmt,
    path::{Component, Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::Hash;

/// The longest relative path a manifest may carry, in bytes.
const MAX_PATH_BYTES: usize = 4096;
/// The longest single path component, in bytes (the usual file system limit).
const MAX_COMPONENT_BYTES: usize = 255;
/// The longest model name, in bytes.
const MAX_NAME_BYTES: usize = 256;

/// Why a manifest, a path or a name was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The bytes are not a manifest.
    #[error("manifest does not decode: {0}")]
    Decode(#[from] postcard::Error),
    /// Two files share a path, or one file's path is a folder of another.
    #[error("manifest lists {0:?} twice or as both a file and a folder")]
    PathClash(String),
    /// A path is absolute, has `..`/`.`/empty parts, or is otherwise unsafe to join.
    #[error("unsafe path in manifest: {path:?} ({why})")]
    UnsafePath {
        /// The offending path, as received.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The model name is empty, too long or has control characters.
    #[error("bad model name {0:?}: use 1-256 printable characters")]
    BadName(String),
    /// The files are not in canonical (sorted) order.
    #[error("manifest is not in canonical order")]
    NotCanonical,
}

/// A relative path of plain components joined by `/`, safe to join under any target folder.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RelPath(String);

impl RelPath {
    /// The path as `/`-separated text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This path under `root`. Always a descendant of `root`: the components were checked.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut out = root.to_path_buf();
        out.extend(self.0.split('/'));
        out
    }

    /// Builds a `RelPath` from a path relative to a folder being added.
    pub fn from_path(path: &Path) -> Result<Self, ManifestError> {
        let mut parts = Vec::new();
        for component in path.components() {
            match component {
                Component::Normal(part) => match part.to_str() {
                    Some(part) => parts.push(part),
                    None => {
                        return Err(ManifestError::UnsafePath {
                            path: path.to_string_lossy().into_owned(),
                            why: "not UTF-8",
                        })
                    }
                },
                _ => {
                    return Err(ManifestError::UnsafePath {
                        path: path.to_string_lossy().into_owned(),
                        why: "not a plain relative path",
                    })
                }
            }
        }
        parts.join("/").parse()
    }
}

impl FromStr for RelPath {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| {
            Err(ManifestError::UnsafePath {
                path: s.to_string(),
                why,
            })
        };
        if s.is_empty() {
            return bad("empty");
        }
        if s.len() > MAX_PATH_BYTES {
            return bad("too long");
        }
        if s.starts_with('/') {
            return bad("absolute");
        }
        if s.contains('\\') {
            return bad("backslash");
        }
        if s.chars().any(char::is_control) {
            return bad("control character");
        }
        for part in s.split('/') {
            match part {
                "" => return bad("empty component"),
                "." => return bad("'.' component"),
                ".." => return bad("'..' component"),
                _ if part.len() > MAX_COMPONENT_BYTES => return bad("component too long"),
                // `C:` would be a drive prefix on Windows.
                _ if part.contains(':') && s.split('/').next() == Some(part) => {
                    return bad("drive prefix")
                }
                _ => {}
            }
        }
        Ok(Self(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Where a model came from, when it came from somewhere other than a local folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Source {
    /// A HuggingFace repo pinned to a commit.
    HuggingFace {
        /// `org/name`.
        repo: String,
        /// The resolved commit sha.
        commit: String,
    },
    /// A folder on the machine that added it.
    Local,
    /// An Ollama model: its manifest and blobs, as in an Ollama store.
    Ollama {
        /// `host/namespace/model:tag`.
        name: String,
        /// The sha256 (hex) of its manifest's bytes: Ollama's model id.
        digest: String,
    },
}

/// One file of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Where the file goes, relative to the model's folder.
    pub path: RelPath,
    /// Its length in bytes.
    pub size: u64,
    /// The BLAKE3 root of its bytes.
    pub hash: Hash,
    /// HuggingFace's LFS sha256 (hex), where known.
    pub sha256: Option<String>,
    /// HuggingFace's etag, where known.
    pub etag: Option<String>,
}

/// A model: a name and a set of files. Its id is the BLAKE3 hash of [`Manifest::encode`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    name: String,
    source: Source,
    files: Vec<FileEntry>,
}

/// A model named by its id or by a name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelRef {
    /// The manifest hash.
    Id(Hash),
    /// A human name, e.g. `sd3.5_large`.
    Name(String),
}

impl Manifest {
    /// A manifest with `files` put in canonical order; fails on a bad name or clashing paths.
    pub fn new(
        name: String,
        source: Source,
        mut files: Vec<FileEntry>,
    ) -> Result<Self, ManifestError> {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let manifest = Self {
            name,
            source,
            files,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// Decodes and checks a manifest received from anywhere.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Self = postcard::from_bytes(bytes)?;
        manifest.check()?;
        Ok(manifest)
    }

    /// The canonical encoding; [`Manifest::id`] hashes it.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("encoding to a Vec cannot fail")
    }

    /// The model id: the BLAKE3 hash of the canonical encoding.
    pub fn id(&self) -> Hash {
        Hash::of(&self.encode())
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the model came from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The files, sorted by path.
    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// The sum of all file sizes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    fn check(&self) -> Result<(), ManifestError> {
        check_name(&self.name)?;
        for pair in self.files.windows(2) {
            let (a, b) = (pair[0].path.as_str(), pair[1].path.as_str());
            if a >= b {
                return Err(if a == b {
                    ManifestError::PathClash(a.to_string())
                } else {
                    ManifestError::NotCanonical
                });
            }
        }
        // In sorted order, a folder `a` sorts before `a/...` but `a.txt` or `a-b` may sit in
        // between, so compare every path with the set of all folder prefixes.
        let files: std::collections::BTreeSet<&str> =
            self.files.iter().map(|f| f.path.as_str()).collect();
        for file in &self.files {
            let path = file.path.as_str();
            for (i, _) in path.match_indices('/') {
                if files.contains(&path[..i]) {
                    return Err(ManifestError::PathClash(path[..i].to_string()));
                }
            }
        }
        Ok(())
    }
}

/// Checks a model name: 1-256 bytes, no control characters, not 64 hex digits (that is an id).
pub fn check_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.trim().is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.chars().any(char::is_control)
        && name.parse::<Hash>().is_err();
    if ok {
        Ok(())
    } else {
        Err(ManifestError::BadName(name.to_string()))
    }
}

impl FromStr for ModelRef {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = s.parse::<Hash>() {
            return Ok(Self::Id(id));
        }
        check_name(s)?;
        Ok(Self::Name(s.to_string()))
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> FileEntry {
        FileEntry {
            path: RelPath(path.to_string()),
            size: 1,
            hash: Hash::of(path.as_bytes()),
            sha256: None,
            etag: None,
        }
    }

    #[test]
    fn rejects_traversal_and_absolute_paths() {
        for bad in [
            "../x",
            "a/../../x",
            "a/..",
            "/etc/passwd",
            "a//b",
            "./a",
            "a/.",
            "",
            "a\\..\\b",
            "C:/x",
            "a\0b",
            "a/",
        ] {
            assert!(bad.parse::<RelPath>().is_err(), "{bad:?} was accepted");
        }
        for good in [
            "a",
            "a/b.safetensors",
            "text_encoder/model-00001.bin",
            "..a",
            "a..b",
        ] {
            assert!(good.parse::<RelPath>().is_ok(), "{good:?} was rejected");
        }
    }

    #[test]
    fn decode_rejects_hostile_paths_smuggled_past_the_constructor() {
        // A peer can send any bytes: build the manifest by hand, bypassing `RelPath`'s checks.
        for bad in [
            "../../etc/cron.d/x",
            "/root/.ssh/authorized_keys",
            "a/../../b",
        ] {
            let manifest = Manifest {
                name: "evil".into(),
                source: Source::Local,
                files: vec![entry(bad)],
            };
            let bytes = postcard::to_allocvec(&manifest).unwrap();
            let err = Manifest::decode(&bytes).unwrap_err();
            assert!(matches!(err, ManifestError::Decode(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn under_stays_inside_root() {
        let p: RelPath = "a/b/c.bin".parse().unwrap();
        let root = Path::new("/tmp/target");
        assert_eq!(p.under(root), Path::new("/tmp/target/a/b/c.bin"));
        assert!(p.under(root).starts_with(root));
    }

    #[test]
    fn rejects_clashes_and_non_canonical_order() {
        let clash = Manifest::new("m".into(), Source::Local, vec![entry("a"), entry("a")]);
        assert!(matches!(clash, Err(ManifestError::PathClash(_))));
        let dir_clash = Manifest::new(
            "m".into(),
            Source::Local,
            vec![entry("a"), entry("a.txt"), entry("a/b")],
        );
        assert!(matches!(dir_clash, Err(ManifestError::PathClash(_))));
        let unsorted = Manifest {
            name: "m".into(),
            source: Source::Local,
            files: vec![entry("b"), entry("a")],
        };
        let bytes = postcard::to_allocvec(&unsorted).unwrap();
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::NotCanonical)
        ));
    }

    #[test]
    fn id_is_hash_of_canonical_encoding_and_order_independent() {
        let a = Manifest::new("m".into(), Source::Local, vec![entry("b"), entry("a")]).unwrap();
        let b = Manifest::new("m".into(), Source::Local, vec![entry("a"), entry("b")]).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.id(), Hash::of(&a.encode()));
        assert_eq!(Manifest::decode(&a.encode()).unwrap(), a);
        assert_eq!(a.total_size(), 2);
    }

    #[test]
    fn model_ref_parses_ids_and_names() {
        let id = Hash::of(b"x");
        assert_eq!(
            id.to_string().parse::<ModelRef>().unwrap(),
            ModelRef::Id(id)
        );
        assert_eq!(
            "sd3.5_large".parse::<ModelRef>().unwrap(),
            ModelRef::Name("sd3.5_large".into())
        );
        assert!("".parse::<ModelRef>().is_err());
        assert!("a\nb".parse::<ModelRef>().is_err());
    }
}
