//! The chain in files under the state directory: `audit.jsonl` holds the
//! lines, `audit.head` the head (replaced atomically after each append:
//! temp file, fsync, rename) and `audit.sink-cursor` the sink's cursor.
//!
//! Each append writes its lines with one write and fsyncs them before the
//! head is replaced, so a crash leaves at most a torn tail (which the next
//! append and `verify` detect) or a head one append behind (a still valid
//! anchor, which is why the head's directory entry is not fsynced: one
//! fsync fewer per append). Appends are serialized within a process by a
//! mutex and across processes by an exclusive OS lock on the log file.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::error::AuditError;
use super::store::{ChainStore, Extend, Tail};

/// The log file name under the state directory.
pub const LOG_FILE: &str = "audit.jsonl";
/// The head file name under the state directory.
pub const HEAD_FILE: &str = "audit.head";
/// The sink's cursor file under the state directory.
pub const CURSOR_FILE: &str = "audit.sink-cursor";

/// A workspace's chain in its state directory.
#[derive(Debug)]
pub struct FileChain {
    dir: PathBuf,
    path: PathBuf,
    head_path: PathBuf,
    cursor_path: PathBuf,
    /// The log opened for read + append (read only for
    /// [`FileChain::open_read_only`]; `None` while there is no log); the
    /// mutex serializes appends in-process, which the OS lock cannot (it
    /// is per open file).
    file: Mutex<Option<File>>,
    writable: bool,
}

/// Releases the OS lock on the log when dropped.
struct FileLockGuard<'a>(&'a File);

impl Drop for FileLockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError {
    let path = path.to_path_buf();
    move |source| AuditError::Io { path, source }
}

/// What `opened` gave, `None` when `path` does not exist.
fn if_present<T>(opened: std::io::Result<T>, path: &Path) -> Result<Option<T>, AuditError> {
    match opened {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io(path)(source)),
    }
}

impl FileChain {
    fn at(state_dir: &Path, file: Option<File>, writable: bool) -> FileChain {
        FileChain {
            dir: state_dir.to_path_buf(),
            path: state_dir.join(LOG_FILE),
            head_path: state_dir.join(HEAD_FILE),
            cursor_path: state_dir.join(CURSOR_FILE),
            file: Mutex::new(file),
            writable,
        }
    }

    /// Opens (creating if needed) `<state_dir>/audit.jsonl` for appending.
    pub fn open(state_dir: &Path) -> Result<FileChain, AuditError> {
        fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let path = state_dir.join(LOG_FILE);
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path))?;
        if created {
            // Make the new file's directory entry durable once; later
            // appends only change its content.
            File::open(state_dir)
                .and_then(|d| d.sync_all())
                .map_err(io(state_dir))?;
        }
        Ok(FileChain::at(state_dir, Some(file), true))
    }

    /// Opens `<state_dir>/audit.jsonl` for reading only, creating nothing:
    /// a missing log reads as empty. Appends are refused.
    pub fn open_read_only(state_dir: &Path) -> Result<FileChain, AuditError> {
        let chain = FileChain::at(state_dir, None, false);
        *chain.file.lock().unwrap_or_else(|p| p.into_inner()) = chain.open_existing()?;
        Ok(chain)
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log for reading, if it exists.
    fn open_existing(&self) -> Result<Option<File>, AuditError> {
        if_present(File::open(&self.path), &self.path)
    }

    /// Runs `f` on the log (`None`: there is none) under the in-process
    /// mutex and the OS lock, shared or `exclusive`.
    fn locked<T>(
        &self,
        exclusive: bool,
        f: impl FnOnce(Option<&File>) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let mut slot = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            // A read-only handle opened before the log existed sees it
            // once another process has created it.
            *slot = self.open_existing()?;
        }
        let Some(file) = slot.as_ref() else {
            return f(None);
        };
        match exclusive {
            true => file.lock(),
            false => file.lock_shared(),
        }
        .map_err(io(&self.path))?;
        let _guard = FileLockGuard(file);
        f(Some(file))
    }

    fn read_head(&self) -> Result<Option<Vec<u8>>, AuditError> {
        if_present(fs::read(&self.head_path), &self.head_path)
    }

    fn read_tail(&self, file: Option<&File>) -> Result<Tail, AuditError> {
        let line = match file {
            Some(f) => last_line(f).map_err(io(&self.path))?,
            None => None,
        };
        Ok(Tail {
            line,
            head: self.read_head()?,
            db_role: None,
        })
    }
}

impl ChainStore for FileChain {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn head_location(&self) -> String {
        self.head_path.display().to_string()
    }

    fn snapshot(&self) -> Result<(Vec<u8>, Option<Vec<u8>>), AuditError> {
        self.locked(false, |file| {
            let mut bytes = Vec::new();
            if let Some(mut file) = file {
                file.seek(SeekFrom::Start(0))
                    .and_then(|_| file.read_to_end(&mut bytes))
                    .map_err(io(&self.path))?;
            }
            Ok((bytes, self.read_head()?))
        })
    }

    fn head(&self) -> Result<Option<Vec<u8>>, AuditError> {
        self.read_head()
    }

    fn tail(&self) -> Result<Tail, AuditError> {
        self.locked(false, |file| self.read_tail(file))
    }

    fn append(&self, extend: Extend<'_>) -> Result<(), AuditError> {
        if !self.writable {
            return Err(AuditError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.locked(true, |file| {
            let tail = self.read_tail(file)?;
            let file = file.ok_or_else(|| AuditError::ReadOnly {
                path: self.path.clone(),
            })?;
            let extension = extend(tail)?;
            let mut bytes = Vec::new();
            for (_, line) in extension.lines {
                bytes.extend(line);
                bytes.push(b'\n');
            }
            // One write: a crash leaves at most a torn tail.
            (&*file).write_all(&bytes).map_err(io(&self.path))?;
            file.sync_all().map_err(io(&self.path))?;
            pde_core::fsutil::atomic_write(&self.head_path, &extension.head)
                .map_err(io(&self.head_path))
        })
    }

    /// The cursor file is read and replaced (atomically, fsynced) for each
    /// claim. It takes no lock: two processes forwarding at once may both
    /// send a record, which the sink drops by its `Idempotency-Key`.
    fn with_sink_cursor(
        &self,
        forward: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<Option<u64>, AuditError> {
        let cursor = fs::read_to_string(&self.cursor_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let moved = forward(cursor);
        if moved != cursor {
            pde_core::fsutil::atomic_write(&self.cursor_path, format!("{moved}\n").as_bytes())
                .map_err(io(&self.cursor_path))?;
        }
        Ok(Some(moved))
    }

    fn reopen(&self) -> Result<Arc<dyn ChainStore>, AuditError> {
        Ok(Arc::new(match self.writable {
            true => FileChain::open(&self.dir)?,
            false => FileChain::open_read_only(&self.dir)?,
        }))
    }
}

/// The last line of `file` including its `\n` (if it has one). Reads
/// backwards in growing chunks, so an append costs the same on a long log.
fn last_line(file: &File) -> std::io::Result<Option<Vec<u8>>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut chunk = 8 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = vec![0u8; (len - start) as usize];
        let mut reader = file;
        reader.seek(SeekFrom::Start(start))?;
        reader.read_exact(&mut buf)?;
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if let Some(pos) = body.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(buf[pos + 1..].to_vec()));
        }
        if start == 0 {
            return Ok(Some(buf));
        }
        chunk *= 4;
    }
}
