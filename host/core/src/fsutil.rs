//! The one way pde replaces a file: atomically and durably.
//!
//! Every file whose loss or tearing matters (bundles, the agent's state, the
//! audit head, the outbox cursor) is written here: a temp file with a random
//! name in the same directory, written and fsynced, renamed over the target,
//! then the directory fsynced. After a crash at any moment the target holds
//! either its old content or its new content, never a mix, and a rename that
//! returned is not undone by a power cut.

use std::io::Write;
use std::path::Path;

/// Prefix of temp files: anything in a directory pde writes that carries it
/// is debris of an interrupted write and may be deleted.
pub const TMP_PREFIX: &str = ".tmp-";

/// Writes `bytes` to `path` atomically and durably (see the module docs).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!("{TMP_PREFIX}{name}-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is debris, removed on next open.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Fsyncs a directory, so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        atomic_write(&path, b"one").unwrap();
        atomic_write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("f");
        assert!(atomic_write(&path, b"x").is_err());
    }
}
