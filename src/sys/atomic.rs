//! Files written whole or not at all.

use std::path::{Path, PathBuf};

/// Writes `path` through a temporary file renamed over it, so a reader never
/// sees half of it; the temporary file is removed if anything fails (a full
/// disk leaves no empty files behind).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_mode(path, bytes, 0o666)
}

/// [`write_atomically`], the file created with `mode` (before the umask)
/// from its first byte: a secret written with 0600 is never readable by
/// others, not even between its creation and a `chmod`.
pub(crate) fn write_atomically_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // A file left by an earlier process of this pid would keep its mode.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
