//! Small static files kept in memory, per serving thread, so that a hot
//! file is answered without leaving the thread: no blocking task, no
//! syscall but one.
//!
//! A `static` request otherwise costs a hop to tokio's blocking threads
//! (its `stat`s and reads may wait on a disk or a network filesystem, and
//! must not stall the serving thread's other connections), and the hop,
//! two thread wake-ups, costs more than the rest of the request.
//!
//! The cache is exact, not a cache with a lifetime as nginx's
//! `open_file_cache` (60 s by default): every serving thread has an inotify
//! instance, and whatever a cached answer depends on is watched before the
//! file is read (each directory along the request's path, the directory the
//! file really is in, the file and its precompressed sibling). Before each
//! answer from memory, the thread reads its inotify descriptor without
//! blocking (the one syscall); the kernel queues an event within the
//! `write`, `rename` or `unlink` that causes it, so a change finished before
//! the request was read is always seen, and any event empties the thread's
//! cache. A thread without inotify (its limit of instances reached) or a
//! file on a network filesystem (NFS, SMB, FUSE and the like, whose remote
//! changes inotify does not see) is never cached: it is served as before.
//!
//! Each thread holds at most [`BUDGET`] bytes in at most [`ENTRIES`] files
//! (files up to 256 KB, read whole); when full, a quarter is dropped.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::Validators;
use crate::config::Encoding;

/// The bytes of file content one serving thread keeps at most.
const BUDGET: usize = 16 << 20;
/// The files one serving thread keeps at most.
const ENTRIES: usize = 4096;

/// A file answered from memory: its content (or its precompressed
/// sibling's), its type and validators.
pub(super) struct Cached {
    pub(super) content: Bytes,
    pub(super) mime: HeaderValue,
    pub(super) validators: Validators,
    /// The content is the file's sibling in the request's encoding; with
    /// the variant's ETag.
    pub(super) sibling: Option<Option<HeaderValue>>,
}

/// Which cache a request's answer lives in: its route and the encoding it
/// was asked in (none, or the one `compress` chose).
type Slot = (u64, Option<Encoding>);

struct Cache {
    inotify: Arc<Inotify>,
    files: HashMap<Slot, HashMap<Box<str>, Arc<Cached>>>,
    bytes: usize,
    entries: usize,
}

thread_local! {
    /// `None` until first used; `Some(None)` where inotify is unavailable.
    static CACHE: RefCell<Option<Option<Cache>>> = const { RefCell::new(None) };
}

fn with<T>(f: impl FnOnce(&mut Cache) -> T) -> Option<T> {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let cache = c.get_or_insert_with(|| {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
            Some(Cache {
                inotify: Arc::new(inotify),
                files: HashMap::new(),
                bytes: 0,
                entries: 0,
            })
        });
        cache.as_mut().map(f)
    })
}

impl Cache {
    /// Reads every event queued, without blocking; if there was one, the
    /// cache is emptied. Returns whether it was.
    fn drain(&mut self) -> bool {
        // Room for at least one event with the longest name.
        let mut buf = [0u8; 4096];
        let mut changed = false;
        while let Ok(n) = nix::unistd::read(self.inotify.as_ref(), &mut buf) {
            if n == 0 {
                break;
            }
            changed = true;
        }
        if changed {
            self.files.clear();
            self.bytes = 0;
            self.entries = 0;
        }
        changed
    }

    /// Makes room for `size` more bytes: drops about a quarter of the
    /// files when either bound would be passed.
    fn room(&mut self, size: usize) {
        if self.bytes + size <= BUDGET && self.entries < ENTRIES {
            return;
        }
        let mut drop = (self.entries / 4).max(1);
        let (mut bytes, mut entries) = (self.bytes, self.entries);
        for files in self.files.values_mut() {
            files.retain(|name, f| {
                if drop == 0 {
                    return true;
                }
                drop -= 1;
                bytes -= cost(name, f);
                entries -= 1;
                false
            });
        }
        self.files.retain(|_, files| !files.is_empty());
        (self.bytes, self.entries) = (bytes, entries);
        if self.bytes + size > BUDGET {
            self.room(size);
        }
    }
}

/// What a cached file counts against the budget.
fn cost(name: &str, f: &Cached) -> usize {
    f.content.len() + name.len() + 256
}

/// The answer kept for `rel` under route `id` in `encoding`, if nothing it
/// depends on has changed since it was read.
pub(super) fn get(id: u64, rel: &str, encoding: Option<Encoding>) -> Option<Arc<Cached>> {
    with(|c| {
        if c.drain() {
            return None;
        }
        c.files.get(&(id, encoding))?.get(rel).cloned()
    })
    .flatten()
}

/// The inotify instance of this thread's cache, for [`watch`] off the
/// thread; `None` if it has none.
pub(super) fn watcher() -> Option<Arc<Inotify>> {
    with(|c| c.inotify.clone())
}

/// Keeps `file` as the answer for `rel` under route `id` in `encoding`,
/// unless anything changed since `inotify` (this thread's, taken with
/// [`watcher`] before the lookup) began watching.
pub(super) fn put(
    inotify: &Arc<Inotify>,
    id: u64,
    rel: &str,
    encoding: Option<Encoding>,
    file: Cached,
) {
    with(|c| {
        // Another thread's instance (a task moved between threads) does
        // not watch for this one.
        if !Arc::ptr_eq(&c.inotify, inotify) || c.drain() {
            return;
        }
        let size = cost(rel, &file);
        c.room(size);
        let old = c
            .files
            .entry((id, encoding))
            .or_default()
            .insert(rel.into(), Arc::new(file));
        match old {
            Some(old) => c.bytes -= cost(rel, &old),
            None => c.entries += 1,
        }
        c.bytes += size;
    });
}

/// What a watch reports: any change to a directory's entries or to a
/// file's content or attributes (its modification time is its ETag).
fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
}

/// Watches `root` and every directory along `rel` (the request's path,
/// through any symlinks: a change to a link is an event in the directory
/// holding it). Blocking. False if a watch could not be added (the
/// system's limit of watches reached): the answer must not be cached.
pub(super) fn watch_path(inotify: &Inotify, root: &Path, rel: &str) -> bool {
    let mut dir = root.to_path_buf();
    if inotify.add_watch(&dir, mask()).is_err() {
        return false;
    }
    // A path that leaves the root is never served, let alone kept.
    let Some(names) = super::segments(rel) else {
        return false;
    };
    for (i, name) in names.iter().enumerate() {
        dir.push(name);
        match inotify.add_watch(&dir, mask()) {
            Ok(_) => {}
            // The last name is the file, or a directory whose index is
            // served; when it is missing there is nothing to keep, and a
            // file's own watch comes with `watch_file`.
            Err(_) if i + 1 == names.len() => break,
            Err(_) => return false,
        }
    }
    true
}

/// Watches the file served (and the sibling served for it), and the
/// directory it really is in; false if the answer must not be cached (a
/// watch failed, or the file is on a filesystem whose remote changes
/// inotify does not report). Blocking.
pub(super) fn watch_file(inotify: &Inotify, file: &Path, sibling: Option<&PathBuf>) -> bool {
    let local = nix::sys::statfs::statfs(file).is_ok_and(|s| !remote(s.filesystem_type()));
    local
        && file
            .parent()
            .is_some_and(|dir| inotify.add_watch(dir, mask()).is_ok())
        && inotify.add_watch(file, mask()).is_ok()
        && sibling.is_none_or(|s| inotify.add_watch(s, mask()).is_ok())
}

/// Filesystems whose changes made elsewhere inotify never reports.
fn remote(kind: nix::sys::statfs::FsType) -> bool {
    const REMOTE: [i64; 11] = [
        0x6969,     // NFS
        0x517B,     // SMB
        0xFF534D42, // CIFS
        0xFE534D42, // SMB2
        0x65735546, // FUSE (sshfs, virtiofs, Docker Desktop's shares)
        0x00C36400, // Ceph
        0x01021997, // 9P
        0x5346414F, // AFS
        0x01161970, // GFS2
        0x7461636F, // OCFS2
        0x0BD00BD0, // Lustre
    ];
    #[allow(clippy::unnecessary_cast)]
    let kind = kind.0 as i64;
    REMOTE.contains(&kind)
}
