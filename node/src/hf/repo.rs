//! What the Hub says a repo is: a reference (`org/name@rev`), the commit a revision names, and
//! its files with the hashes they are published under.

use serde::Deserialize;

use crate::store::digest::Published;

/// A repo reference: `org/name`, optionally `@revision`; `hf://` in front is accepted. With
/// `hf://`, a one-part id (`hf://gpt2`) is accepted too: the Hub moved every such repo under an
/// org, and the fetch follows it there. Without `hf://`, a one-part name is a mesh name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoRef {
    /// `org/name` (or a one-part id, until the Hub names its new id).
    pub repo: String,
    /// Branch, tag or commit (default `main`).
    pub revision: String,
}

impl RepoRef {
    /// Parses `org/name[@rev]`, `hf://org/name[@rev]` or `hf://name[@rev]`; `None` if it is not
    /// of that form.
    pub fn parse(s: &str) -> Option<Self> {
        let (s, explicit) = match s.strip_prefix("hf://") {
            Some(s) => (s, true),
            None => (s, false),
        };
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let ok = |part: &str| {
            !part.is_empty()
                && part.len() <= 96
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !part.starts_with('.')
        };
        let id_ok = match repo.split_once('/') {
            Some((org, name)) => ok(org) && ok(name),
            None => explicit && ok(repo),
        };
        let rev_ok = revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            && !revision.contains("..");
        (id_ok && rev_ok).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// One file of a repo at a commit, as the Hub describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFile {
    /// Path in the repo.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// LFS sha256 (hex), for LFS files.
    pub sha256: Option<String>,
    /// Git blob id (sha1 hex).
    pub git_oid: String,
}

impl HubFile {
    /// The etag HuggingFace clients key their cache on: the sha256 for LFS files, else the git
    /// blob id.
    pub fn etag(&self) -> &str {
        self.sha256.as_deref().unwrap_or(&self.git_oid)
    }

    /// The hash the Hub publishes the file under (what [`HubFile::etag`] names).
    pub fn published(&self) -> Published {
        match &self.sha256 {
            Some(sha) => Published::Sha256(sha.clone()),
            None => Published::GitBlob(self.git_oid.clone()),
        }
    }
}

/// A repo at a resolved commit.
#[derive(Clone, Debug)]
pub struct RepoInfo {
    /// `org/name`.
    pub repo: String,
    /// The commit sha the revision resolved to.
    pub commit: String,
    /// Its files.
    pub files: Vec<HubFile>,
    /// Gated or private: its files may only go to mesh members.
    pub restricted: bool,
}

impl RepoInfo {
    /// Reads the Hub's revision info (`GET /api/models/{repo}/revision/{rev}?blobs=true`).
    /// `None` if it lacks what a download needs (the commit, sizes, blob ids).
    pub fn from_revision_json(repo: &str, json: &serde_json::Value) -> Option<Self> {
        let info: RevisionJson = serde_json::from_value(json.clone()).ok()?;
        let mut files = Vec::new();
        for s in info.siblings {
            files.push(HubFile {
                path: s.rfilename,
                size: s.size?,
                sha256: s.lfs.map(|l| l.sha256.to_ascii_lowercase()),
                git_oid: s.blob_id?.to_ascii_lowercase(),
            });
        }
        let gated = !matches!(
            info.gated,
            serde_json::Value::Bool(false) | serde_json::Value::Null
        );
        is_commit(&info.sha).then(|| Self {
            repo: repo.to_string(),
            commit: info.sha,
            files,
            restricted: info.private || gated,
        })
    }

    /// The file at `path`.
    pub fn file(&self, path: &str) -> Option<&HubFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// Whether `rev` is a full commit sha (40 lowercase hex digits).
pub fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[derive(Deserialize)]
struct RevisionJson {
    sha: String,
    siblings: Vec<SiblingJson>,
    #[serde(default)]
    private: bool,
    /// `false`, or `"auto"`/`"manual"` for gated repos.
    #[serde(default)]
    gated: serde_json::Value,
}

#[derive(Deserialize)]
struct SiblingJson {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<LfsJson>,
}

#[derive(Deserialize)]
struct LfsJson {
    sha256: String,
}

/// Percent-encodes one URL path segment (everything but unreserved characters).
pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_refs() {
        let r = RepoRef::parse("hf://stabilityai/stable-diffusion-3.5-large@main").unwrap();
        assert_eq!(r.repo, "stabilityai/stable-diffusion-3.5-large");
        assert_eq!(r.revision, "main");
        assert_eq!(RepoRef::parse("a/b").unwrap().revision, "main");
        // A one-part id only with hf:// (without, it is a mesh name).
        let one = RepoRef::parse("hf://gpt2@v1").unwrap();
        assert_eq!((one.repo.as_str(), one.revision.as_str()), ("gpt2", "v1"));
        for bad in [
            "sd3.5_large",
            "gpt2",
            "hf://.x",
            "hf://",
            "a/b/c",
            "../x",
            "a/..",
            "a/b@",
            "/b",
            "a/b@x/../y",
        ] {
            assert!(RepoRef::parse(bad).is_none(), "{bad}");
        }
    }
}
