//! A folder nothing is written outside of ([`Root`]): every path below it is resolved one
//! component at a time with `openat(O_NOFOLLOW)`, so a symlink planted inside the folder can't
//! send a write elsewhere.
//!
//! The root itself is taken as the user named it (symlinks in that path are followed, as `cp`
//! and `rsync` do with a destination); below it, a symlink is followed only while it stays
//! inside the root (the bundle links mesh creates do), and a component that leads outside is
//! refused with [`RootError::Escapes`]. Every operation then works on the open folder
//! descriptors (`linkat`, `renameat`, `symlinkat`), never on a path that could be swapped
//! for a link after it was checked.

use std::{
    collections::VecDeque,
    fs, io,
    os::{
        fd::OwnedFd,
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Component, Path, PathBuf},
};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, CWD};

/// Symlinks followed while resolving one path (as Linux's `ELOOP` limit).
const MAX_HOPS: usize = 40;

/// Why a path under a root could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootError {
    /// A component is a symlink that leads outside the root.
    #[error("refusing to write {path}: {link} is a symlink to {target}, outside {root}")]
    Escapes {
        /// The root folder.
        root: PathBuf,
        /// The path that was to be written (under the root).
        path: String,
        /// The symlink.
        link: PathBuf,
        /// Where it points.
        target: PathBuf,
    },
    /// A file system error.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// A folder nothing is written outside of.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    fd: OwnedFd,
}

/// A folder resolved under a [`Root`], held open.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// Its absolute path (through no symlink, at the time it was resolved).
    path: PathBuf,
    /// Its components below the root.
    comps: Vec<String>,
}

/// What [`Dir::place`] found at the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Nothing: the file was created.
    Created,
    /// Another file (or a symlink): it was replaced atomically.
    Replaced,
    /// The very same file (a hard link to the source): nothing done.
    Same,
}

impl Root {
    /// Opens `path`, creating it (and its parents) if needed.
    pub fn open(path: &Path) -> Result<Self, RootError> {
        let io = |source| RootError::Io {
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(path).map_err(io)?;
        let path = fs::canonicalize(path).map_err(io)?;
        let fd = open_dir(CWD, &path).map_err(io)?;
        Ok(Self { path, fd })
    }

    /// The root's absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder `rel` (`/`-separated, `""` for the root itself), creating missing folders
    /// when `create`.
    pub fn dir(&self, rel: &str, create: bool) -> Result<Dir, RootError> {
        let mut queue: VecDeque<String> = split(rel).map(str::to_string).collect();
        let mut stack: Vec<(String, OwnedFd)> = Vec::new();
        let mut hops = 0;
        let io = |stack: &[(String, OwnedFd)], name: &str, source| RootError::Io {
            path: self.below(stack.iter().map(|(n, _)| n.as_str()).chain([name])),
            source,
        };
        while let Some(name) = queue.pop_front() {
            match name.as_str() {
                "" | "." => continue,
                ".." => {
                    if stack.pop().is_none() {
                        return Err(self.escapes(rel, self.path.clone(), self.path.join("..")));
                    }
                    continue;
                }
                _ => {}
            }
            let cur = stack.last().map_or(&self.fd, |(_, fd)| fd);
            match open_dir(cur, &name) {
                Ok(fd) => {
                    stack.push((name, fd));
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    match rustix::fs::mkdirat(cur, name.as_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(io(&stack, &name, e.into())),
                    }
                    let fd = open_dir(cur, &name).map_err(|e| io(&stack, &name, e))?;
                    stack.push((name, fd));
                    continue;
                }
                Err(e) if !is_symlink(cur, &name) => return Err(io(&stack, &name, e)),
                Err(_) => {}
            }
            // A symlink: follow it only while it stays inside the root.
            hops += 1;
            let link = self.below(stack.iter().map(|(n, _)| n.as_str()).chain([name.as_str()]));
            let target = rustix::fs::readlinkat(cur, name.as_str(), Vec::new())
                .map_err(|e| io(&stack, &name, e.into()))?;
            let target = PathBuf::from(std::ffi::OsStr::from_bytes(target.as_bytes()));
            if hops > MAX_HOPS {
                let loops = io::Error::from_raw_os_error(rustix::io::Errno::LOOP.raw_os_error());
                return Err(io(&stack, &name, loops));
            }
            let rest: Vec<String> = if target.is_absolute() {
                let Ok(inside) = target.strip_prefix(&self.path) else {
                    return Err(self.escapes(rel, link, target));
                };
                stack.clear();
                components(inside).ok_or_else(|| self.escapes(rel, link.clone(), target.clone()))?
            } else {
                components(&target)
                    .ok_or_else(|| self.escapes(rel, link.clone(), target.clone()))?
            };
            // `..` popping past the root is an escape; checked when it is popped.
            for (i, c) in rest.into_iter().enumerate() {
                queue.insert(i, c);
            }
            let depth = stack.len();
            let ups = queue.iter().take_while(|c| *c == "..").count();
            if ups > depth {
                return Err(self.escapes(rel, link, target));
            }
        }
        let comps: Vec<String> = stack.iter().map(|(n, _)| n.clone()).collect();
        let fd = match stack.pop() {
            Some((_, fd)) => fd,
            None => rustix::io::dup(&self.fd).map_err(|e| RootError::Io {
                path: self.path.clone(),
                source: e.into(),
            })?,
        };
        Ok(Dir {
            fd,
            path: self.below(comps.iter().map(String::as_str)),
            comps,
        })
    }

    /// The folder holding the file `rel` and the file's name in it.
    pub fn parent_of(&self, rel: &str, create: bool) -> Result<(Dir, String), RootError> {
        let (dir, name) = match rel.rsplit_once('/') {
            Some((dir, name)) => (dir, name),
            None => ("", rel),
        };
        if name.is_empty() || name == "." || name == ".." {
            return Err(RootError::Io {
                path: self.path.join(rel),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
            });
        }
        let dir = self.dir(dir, create).map_err(|e| match e {
            RootError::Escapes {
                root, link, target, ..
            } => RootError::Escapes {
                root,
                path: rel.to_string(),
                link,
                target,
            },
            e => e,
        })?;
        Ok((dir, name.to_string()))
    }

    /// Creates (or replaces) the symlink `rel` -> `target`, which must point inside the root.
    pub fn symlink(&self, rel: &str, target: &Path) -> Result<(), RootError> {
        let (dir, name) = self.parent_of(rel, true)?;
        let escapes = || self.escapes(rel, dir.join(&name), target.to_path_buf());
        if target.is_absolute() {
            target.strip_prefix(&self.path).map_err(|_| escapes())?;
        } else {
            let mut depth = dir.comps.len();
            for c in components(target).ok_or_else(escapes)? {
                if c == ".." {
                    depth = depth.checked_sub(1).ok_or_else(escapes)?;
                } else {
                    depth += 1;
                }
            }
        }
        dir.symlink(&name, target).map_err(|source| RootError::Io {
            path: dir.join(&name),
            source,
        })
    }

    fn below<'a>(&self, comps: impl IntoIterator<Item = &'a str>) -> PathBuf {
        let mut out = self.path.clone();
        out.extend(comps);
        out
    }

    fn escapes(&self, rel: &str, link: PathBuf, target: PathBuf) -> RootError {
        RootError::Escapes {
            root: self.path.clone(),
            path: rel.to_string(),
            link,
            target,
        }
    }
}

impl Dir {
    /// The folder's absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this folder.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// What is at `name`, without following a symlink; `None` if nothing.
    pub fn stat(&self, name: &str) -> io::Result<Option<Stat>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The size of the regular file at `name`, if there is one (a symlink is not one).
    pub fn file_size(&self, name: &str) -> io::Result<Option<u64>> {
        Ok(self
            .stat(name)?
            .filter(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
            .map(|st| st.st_size as u64))
    }

    /// Whether `name` is the very file at `src` (same device and inode).
    pub fn is_same_file(&self, name: &str, src: &Path) -> io::Result<bool> {
        let Some(st) = self.stat(name)? else {
            return Ok(false);
        };
        let meta = fs::metadata(src)?;
        #[allow(clippy::unnecessary_cast)] // `st_dev` and `st_ino` differ in type by platform
        Ok(st.st_dev as u64 == meta.dev() && st.st_ino as u64 == meta.ino())
    }

    /// Puts the file `src` (or an empty file, for `None`) at `name`, atomically: a hard link
    /// where possible, else a synced copy, under a temporary name first, then renamed over
    /// whatever was there. The file at `name` is always whole.
    pub fn place(&self, name: &str, src: Option<&Path>) -> io::Result<Placed> {
        if let Some(src) = src {
            if self.is_same_file(name, src)? {
                return Ok(Placed::Same);
            }
        }
        let existed = self.stat(name)?.is_some();
        let tmp = format!(".{name}.mesh-tmp");
        let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
        match src {
            Some(src) => self.link_or_copy(src, &tmp)?,
            None => drop(self.create(&tmp)?),
        }
        if let Err(e) = rustix::fs::renameat(&self.fd, tmp.as_str(), &self.fd, name) {
            let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
            return Err(e.into());
        }
        Ok(if existed {
            Placed::Replaced
        } else {
            Placed::Created
        })
    }

    /// Writes `bytes` to `name` atomically (temporary file, fsync, rename, fsync the folder).
    pub fn write_atomic(&self, name: &str, bytes: &[u8], tmp_dir: &Self) -> io::Result<()> {
        use std::io::Write;
        let tmp = format!("{name}.{}.mesh-tmp", rand::random::<u32>());
        let mut file = tmp_dir.create(&tmp)?;
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        let renamed = written.and_then(|()| {
            rustix::fs::renameat(&tmp_dir.fd, tmp.as_str(), &self.fd, name).map_err(Into::into)
        });
        if let Err(e) = renamed {
            let _ = rustix::fs::unlinkat(&tmp_dir.fd, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
        rustix::fs::fsync(&self.fd)?;
        Ok(())
    }

    /// Links (or copies) `src` to the new name `name` in this folder; fails if `name` exists.
    pub fn link_or_copy(&self, src: &Path, name: &str) -> io::Result<()> {
        if rustix::fs::linkat(CWD, src, &self.fd, name, AtFlags::empty()).is_ok() {
            return Ok(());
        }
        let mut out = self.create(name)?;
        let copied = fs::File::open(src)
            .and_then(|mut f| io::copy(&mut f, &mut out))
            .and_then(|_| out.sync_all());
        if let Err(e) = copied {
            let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
            return Err(e);
        }
        Ok(())
    }

    /// Renames `from` in `self` to `to` in `dir`, replacing it.
    pub fn rename_to(&self, from: &str, dir: &Self, to: &str) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.fd, from, &dir.fd, to)?)
    }

    /// Removes the empty folder `name`, if it is empty.
    pub fn remove_empty_dir(&self, name: &str) {
        let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR);
    }

    /// Removes the file (or symlink) `name`, if there is one.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The names in this folder.
    pub fn names(&self) -> io::Result<Vec<String>> {
        let fd = open_dir(&self.fd, ".")?;
        let mut out = Vec::new();
        for entry in rustix::fs::Dir::read_from(&fd)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// The open folder, for ownership changes and syncs.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Creates `name` (0644, never following a symlink); fails if it exists.
    fn create(&self, name: &str) -> io::Result<fs::File> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        Ok(fs::File::from(fd))
    }

    /// Creates (or atomically replaces) the symlink `name` -> `target`.
    fn symlink(&self, name: &str, target: &Path) -> io::Result<()> {
        if let Ok(current) = rustix::fs::readlinkat(&self.fd, name, Vec::new()) {
            if current.as_bytes() == target.as_os_str().as_encoded_bytes() {
                return Ok(());
            }
        }
        let tmp = format!(".{name}.mesh-tmp");
        let _ = rustix::fs::unlinkat(&self.fd, tmp.as_str(), AtFlags::empty());
        rustix::fs::symlinkat(target, &self.fd, tmp.as_str())?;
        Ok(rustix::fs::renameat(
            &self.fd,
            tmp.as_str(),
            &self.fd,
            name,
        )?)
    }
}

/// Opens a folder below `dir` without following a symlink at its last component.
fn open_dir<Fd: std::os::fd::AsFd>(dir: Fd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
}

fn is_symlink(dir: &OwnedFd, name: &str) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

fn split(rel: &str) -> impl Iterator<Item = &str> {
    rel.split('/').filter(|c| !c.is_empty())
}

/// The plain components of a relative path (`..` kept); `None` for anything else.
fn components(path: &Path) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_str()?.to_string()),
            Component::ParentDir => out.push("..".into()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn symlinks_inside_the_root_are_followed_and_those_leaving_it_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (root_path, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(root_path.join("a/b")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink("a/b", root_path.join("in")).unwrap();
        symlink(&outside, root_path.join("out")).unwrap();
        symlink("../../..", root_path.join("a/b/up")).unwrap();
        symlink(root_path.join("a"), root_path.join("abs")).unwrap();
        let root = Root::open(&root_path).unwrap();

        let dir = root.dir("in/c", true).unwrap();
        assert_eq!(dir.path(), root.path().join("a/b/c"));
        assert!(root_path.join("a/b/c").is_dir());
        assert_eq!(
            root.dir("abs/b", false).unwrap().path(),
            root.path().join("a/b")
        );
        for bad in ["out", "out/x", "a/b/up", "a/b/up/x", "..", "a/../.."] {
            match root.dir(bad, true) {
                Err(RootError::Escapes { .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(fs::read_dir(&outside).unwrap().next().is_none());

        // Links mesh creates must point inside.
        root.symlink("a/link", Path::new("b")).unwrap();
        assert!(root.symlink("a/bad", Path::new("../../x")).is_err());
        assert!(root.symlink("a/bad", &outside).is_err());
    }

    #[test]
    fn place_replaces_atomically_and_reports_what_it_found() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::write(&src, b"data").unwrap();
        let root = Root::open(&tmp.path().join("root")).unwrap();
        let (dir, name) = root.parent_of("x/y/f", true).unwrap();
        assert_eq!(dir.place(&name, Some(&src)).unwrap(), Placed::Created);
        assert_eq!(dir.place(&name, Some(&src)).unwrap(), Placed::Same);
        fs::remove_file(dir.join(&name)).unwrap();
        fs::write(dir.join(&name), b"other").unwrap();
        assert_eq!(dir.place(&name, Some(&src)).unwrap(), Placed::Replaced);
        assert_eq!(fs::read(dir.join(&name)).unwrap(), b"data");
        // A symlink at the final name is replaced, not followed.
        let victim = tmp.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        symlink(&victim, dir.join("g")).unwrap();
        assert_eq!(dir.place("g", Some(&src)).unwrap(), Placed::Replaced);
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
    }
}
