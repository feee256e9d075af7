//! The stand-in Hub's repos: folders loaded once, each revision a commit.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use sha1::Digest as _;

/// Files above this size are LFS files, as on the Hub for weights.
const LFS_THRESHOLD: u64 = 10 * 1024;

/// What a request's token is worth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// No token.
    Anonymous,
    /// A token, but not one the gated and private repos accept.
    Valid,
    /// The token gated and private repos accept.
    Approved,
}

/// One file of a commit.
pub(crate) struct RepoFile {
    pub(crate) path: String,
    pub(crate) size: u64,
    pub(crate) disk: PathBuf,
    pub sha256: String,
    pub(crate) git_oid: String,
}

impl RepoFile {
    pub(crate) fn is_lfs(&self) -> bool {
        self.size > LFS_THRESHOLD
    }

    /// Its `siblings` entry in the revision info.
    pub(crate) fn sibling(&self, blobs: bool) -> serde_json::Value {
        let mut s = serde_json::json!({ "rfilename": self.path });
        if blobs {
            s["size"] = self.size.into();
            s["blobId"] = self.git_oid.clone().into();
            if self.is_lfs() {
                s["lfs"] = serde_json::json!({ "sha256": self.sha256, "size": self.size, "pointerSize": 134 });
            }
        }
        s
    }

    /// Its entry in a tree or paths-info listing.
    pub(crate) fn entry(&self, xet: bool) -> serde_json::Value {
        let mut v = serde_json::json!({ "type": "file", "oid": self.git_oid, "size": self.size, "path": self.path });
        if self.is_lfs() {
            v["lfs"] =
                serde_json::json!({ "oid": self.sha256, "size": self.size, "pointerSize": 134 });
            if xet {
                v["xetHash"] = self.xet_hash().into();
            }
        }
        v
    }

    /// A Xet hash, as the Hub advertises for files stored in Xet.
    pub(crate) fn xet_hash(&self) -> String {
        hex::encode(sha2::Sha256::digest(format!("xet:{}", self.sha256)))
    }
}

/// A repo: its commits, the revisions naming them, and who may see it.
pub(crate) struct Repo {
    /// Commit -> files by path.
    commits: BTreeMap<String, BTreeMap<String, RepoFile>>,
    /// Branch or tag -> commit.
    refs: BTreeMap<String, String>,
    pub(crate) gated: bool,
    pub(crate) private: bool,
}

impl Repo {
    /// The commit `rev` names: a branch or tag, or a commit sha of this repo.
    pub(crate) fn commit_for(&self, rev: &str) -> Option<&str> {
        if let Some(c) = self.refs.get(rev) {
            return Some(c);
        }
        self.commits.get_key_value(rev).map(|(c, _)| c.as_str())
    }

    pub(crate) fn files(&self, commit: &str) -> impl Iterator<Item = &RepoFile> {
        self.commits[commit].values()
    }

    pub(crate) fn file(&self, commit: &str, path: &str) -> Option<&RepoFile> {
        self.commits[commit].get(path)
    }

    /// Every file of any commit with this sha256.
    pub(crate) fn by_sha256(&self, sha: &str) -> Option<&RepoFile> {
        self.commits
            .values()
            .flat_map(|files| files.values())
            .find(|f| f.sha256 == sha)
    }

    /// The listing of `dir` (`""`: the root): files, then folders, as the Hub sends them;
    /// `None` if there is no such folder.
    pub(crate) fn tree(
        &self,
        commit: &str,
        dir: &str,
        recursive: bool,
        xet: bool,
    ) -> Option<Vec<serde_json::Value>> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{}/", dir.trim_end_matches('/'))
        };
        let mut out = Vec::new();
        let mut dirs = BTreeSet::new();
        for f in self.files(commit) {
            let Some(rest) = f.path.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((sub, _)) if !recursive => {
                    dirs.insert(format!("{prefix}{sub}"));
                }
                Some(_) => {
                    let mut parts: Vec<&str> = rest.split('/').collect();
                    parts.pop();
                    let mut acc = prefix.clone();
                    for p in parts {
                        acc.push_str(p);
                        dirs.insert(acc.clone());
                        acc.push('/');
                    }
                    out.push(f.entry(xet));
                }
                None => out.push(f.entry(xet)),
            }
        }
        if !dir.is_empty() && out.is_empty() && dirs.is_empty() {
            return None;
        }
        for d in dirs {
            let oid = hex::encode(sha1::Sha1::digest(format!("tree:{commit}:{d}")));
            out.push(serde_json::json!({ "type": "directory", "oid": oid, "size": 0, "path": d }));
        }
        Some(out)
    }
}

/// Every repo by id.
pub(crate) struct Repos(BTreeMap<String, Repo>);

impl Repos {
    /// Loads `org/name[@rev]=DIR` specs.
    pub(crate) fn load(
        specs: &[String],
        gated: &[String],
        private: &[String],
    ) -> anyhow::Result<Self> {
        let mut repos = BTreeMap::new();
        for spec in specs {
            let (id, dir) = spec
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--repo org/name[@rev]=DIR"))?;
            let (id, rev) = id.split_once('@').unwrap_or((id, "main"));
            let files = load_files(dir.into())?;
            let commit = commit_of(rev, &files);
            let repo = repos.entry(id.to_string()).or_insert_with(|| Repo {
                commits: BTreeMap::new(),
                refs: BTreeMap::new(),
                gated: gated.iter().any(|g| g == id),
                private: private.iter().any(|p| p == id),
            });
            repo.refs.insert(rev.to_string(), commit.clone());
            repo.commits.insert(commit, files);
        }
        Ok(Self(repos))
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Repo> {
        self.0.get(id)
    }

    /// The file with this sha256, and its repo id.
    pub(crate) fn by_sha256(&self, sha: &str) -> Option<(&str, &RepoFile)> {
        self.0
            .iter()
            .find_map(|(id, r)| r.by_sha256(sha).map(|f| (id.as_str(), f)))
    }
}

fn load_files(dir: PathBuf) -> anyhow::Result<BTreeMap<String, RepoFile>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let (sha256, git_oid, size) = hashes(&path)?;
            let rel = path
                .strip_prefix(&dir)?
                .to_string_lossy()
                .replace('\\', "/");
            files.insert(
                rel.clone(),
                RepoFile {
                    path: rel,
                    size,
                    disk: path.clone(),
                    sha256,
                    git_oid,
                },
            );
        }
    }
    Ok(files)
}

/// A file's sha256 and git blob id, read in pieces (files can be large).
fn hashes(path: &std::path::Path) -> anyhow::Result<(String, String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut sha = sha2::Sha256::new();
    let mut git = sha1::Sha1::new();
    git.update(format!("blob {size}\0").as_bytes());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        git.update(&buf[..n]);
    }
    Ok((
        hex::encode(sha.finalize()),
        hex::encode(git.finalize()),
        size,
    ))
}

fn commit_of(rev: &str, files: &BTreeMap<String, RepoFile>) -> String {
    let mut commit = sha1::Sha1::new();
    commit.update(rev.as_bytes());
    for f in files.values() {
        commit.update(f.path.as_bytes());
        commit.update(f.sha256.as_bytes());
    }
    hex::encode(commit.finalize())
}
