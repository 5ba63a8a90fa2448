//! Compiled components cached on disk, so a CLI run does not recompile.
//!
//! Compiling a component takes tens of milliseconds; loading a serialized one
//! a fraction of one. Entries live under `<state>/cache/plugins/`, named by
//! the wasm's sha256 and a hash of `Engine::precompile_compatibility_hash`, so
//! a new pde or different engine settings simply miss.
//!
//! An entry is two files: `<key>.cwasm`, exactly what `Component::serialize`
//! wrote, so that it can be memory-mapped (`Component::deserialize_file`)
//! instead of read and copied; and `<key>.cwasm.sum`, its record: the sha256
//! of the `.cwasm` and, once the digest has been checked, the file's stamp
//! (size, modification and change times in nanoseconds, inode, device).
//!
//! `Component::deserialize_file` is `unsafe` because it maps machine code
//! as-is, so an entry is never trusted as found. Hashing megabytes of machine
//! code on every CLI run was 13% of a warm `pde validate`, so the digest is
//! checked on the first use after the file changed, not on every use:
//! - the stamp matches the record: the file is the one whose digest was
//!   checked, and it is mapped as is. Rewriting a file, in place or by
//!   replacing it, changes its change time (`ctime`), which no user can set
//!   back, or its inode; restoring `mtime` (`touch -r`) does not hide an edit;
//! - otherwise the file is read and hashed; a digest that differs from the
//!   record (corrupt, truncated, edited or foreign) deletes the entry and it is
//!   rebuilt; one that matches is used, and the new stamp is recorded;
//! - no record: a miss (the entry is rebuilt and both files rewritten).
//!
//! A stamp is only recorded once the file is older than [`RACY_WINDOW`]:
//! file times have a coarse clock (a few milliseconds), so an edit in the
//! same tick as the stamp could leave every time unchanged (git's "racily
//! clean" index entries). Such a file is hashed again on its next use.
//! Writes go to a temporary file in the same directory and are renamed into
//! place, so a reader never sees half an entry. Someone able to rewrite the
//! state directory can also rewrite the record; the state directory is as
//! trusted as the binary.
//!
//! The same check guards the plugin files themselves. pde compares every
//! `.wasm` with the sha256 its manifest pins (and its signature covers); an
//! 18 MB Python component took 12 ms to hash on every load. The cache keeps
//! a digest index, `digests/<sha256 of the file's path>.sum`: the file's
//! sha256 and its stamp, recorded once settled exactly as above. A matching
//! stamp gives the digest without reading the file, and with a cache hit
//! the file is never read at all; any other stamp reads and hashes it. A
//! miss that must compile reads the file then, and refuses it unless its
//! bytes still have that digest ([`Cache::file_digest`]).
//!
//! Outside a workspace there is no state directory, and recompiling a large
//! component (an 18 MB Python one takes over a minute) on every
//! `pde plugin test PATH` is what made authors wait; so those commands use a
//! per-user cache, [`user_cache_dir`], with exactly the same entries and
//! checks. Its entries are keyed the same way, so sharing it between pde
//! builds or engine settings is safe: a foreign entry is simply a miss.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::PluginError;

/// First line of an entry's record.
const RECORD_MAGIC: &str = "PDECACHE2";
/// First line of a plugin file's record in the digest index.
const DIGEST_MAGIC: &str = "PDEDIGEST1";

/// A plugin file's sha256, and its bytes when they were read to get it.
#[derive(Debug)]
pub struct FileDigest {
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// The bytes hashed; `None` when the digest index vouched for the file.
    pub bytes: Option<Vec<u8>>,
}

/// A file modified less than this long ago is hashed on every use (see the
/// module docs): far longer than any file system's time granularity.
pub const RACY_WINDOW: Duration = Duration::from_secs(1);

/// The per-user directory for compiled plugins used outside a workspace:
/// `$PDE_CACHE_DIR/plugins`, else `$XDG_CACHE_HOME/pde/plugins`, else
/// `~/.cache/pde/plugins`; `None` when none of them is set (no caching).
/// Empty or relative values are ignored, as the XDG spec asks, so that a
/// stray `PDE_CACHE_DIR=` never scatters entries into the working directory.
pub fn user_cache_dir() -> Option<PathBuf> {
    let absolute = |var: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    let root = absolute("PDE_CACHE_DIR")
        .or_else(|| absolute("XDG_CACHE_HOME").map(|d| d.join("pde")))
        .or_else(|| absolute("HOME").map(|d| d.join(".cache").join("pde")))?;
    Some(root.join("plugins"))
}

/// How a cache entry was found to be sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Its stamp matched the record of an earlier digest check; mapped as is.
    Stamp,
    /// Its sha256 was computed and matched the record.
    Digest,
}

/// The on-disk cache of compiled components.
pub struct Cache {
    dir: Option<PathBuf>,
    compat: String,
}

impl Cache {
    /// A cache in `dir`, or no caching at all with `None`.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Cache {
        // DefaultHasher::new() uses fixed keys: stable across runs of one binary.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Cache {
            dir,
            compat: format!("{:016x}", h.finish()),
        }
    }

    /// Whether entries are read and written at all.
    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// The file an entry for `sha256` lives in (its record is beside it,
    /// see [`record_path`]).
    pub fn entry_path(&self, sha256: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{sha256}-{}.cwasm", self.compat)))
    }

    /// Loads the compiled `wasm` from the cache, or compiles and stores it.
    /// The flag is true when the cache served it.
    pub fn load_or_compile(
        &self,
        engine: &Engine,
        plugin: &str,
        sha256: &str,
        wasm: &[u8],
    ) -> Result<(Component, bool), PluginError> {
        if let Some(component) = self.lookup(engine, plugin, sha256) {
            return Ok((component, true));
        }
        Ok((self.compile(engine, plugin, sha256, wasm)?, false))
    }

    /// The cached component for a wasm with `sha256`, if a sound entry exists;
    /// an unsound one is deleted (and the caller compiles).
    pub fn lookup(&self, engine: &Engine, plugin: &str, sha256: &str) -> Option<Component> {
        let path = self.entry_path(sha256)?;
        match read_entry(engine, &path) {
            Ok(Some((component, how))) => {
                tracing::debug!(plugin, path = %path.display(), ?how, "compiled plugin loaded from cache");
                Some(component)
            }
            Ok(None) => None,
            Err(why) => {
                tracing::warn!(plugin, path = %path.display(), "discarding cache entry: {why}");
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(record_path(&path));
                None
            }
        }
    }

    /// Compiles `wasm` (whose digest is `sha256`) and stores it, if caching.
    pub fn compile(
        &self,
        engine: &Engine,
        plugin: &str,
        sha256: &str,
        wasm: &[u8],
    ) -> Result<Component, PluginError> {
        let component = Component::new(engine, wasm).map_err(|e| PluginError::BadComponent {
            plugin: plugin.to_string(),
            message: format!("it does not compile as a WebAssembly component: {e:#}"),
        })?;
        if let Some(path) = self.entry_path(sha256)
            && let Err(e) = write_entry(&component, &path)
        {
            // A cache that cannot be written costs time, not correctness.
            tracing::warn!(plugin, path = %path.display(), "cannot write plugin cache: {e}");
        }
        Ok(component)
    }

    /// The sha256 of the plugin file at `path`: from the digest index when
    /// the file's stamp is the one recorded when it was last hashed (see the
    /// module docs), otherwise read and hashed, and recorded once settled.
    pub fn file_digest(&self, path: &Path) -> std::io::Result<FileDigest> {
        let index = self.digest_record_path(path);
        let meta = std::fs::metadata(path)?;
        if let Some(index) = &index
            && let Some(stamp) = Stamp::of(&meta)
            && let Ok(text) = std::fs::read_to_string(index)
            && let Some(record) = Record::parse(DIGEST_MAGIC, &text)
            && record.stamp == Some(stamp)
        {
            return Ok(FileDigest {
                sha256: record.sha256,
                bytes: None,
            });
        }
        let bytes = std::fs::read(path)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if let Some(index) = &index
            && let Ok(now) = std::fs::metadata(path)
            && Stamp::of(&now) == Stamp::of(&meta)
            && let Some(settled) = Stamp::settled(&now)
        {
            let record = Record {
                sha256: sha256.clone(),
                stamp: Some(settled),
            };
            if let Err(e) = record.write(DIGEST_MAGIC, index) {
                tracing::debug!(path = %path.display(), "cannot update the digest index: {e}");
            }
        }
        Ok(FileDigest {
            sha256,
            bytes: Some(bytes),
        })
    }

    /// Where the digest index keeps the record of the file at `path`.
    fn digest_record_path(&self, path: &Path) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let absolute = std::path::absolute(path).ok()?;
        let key = hex::encode(Sha256::digest(absolute.as_os_str().as_encoded_bytes()));
        Some(dir.join("digests").join(format!("{key}.sum")))
    }
}

/// Where the record (digest and stamp) of the entry at `entry` lives.
pub fn record_path(entry: &Path) -> PathBuf {
    let mut name = entry.as_os_str().to_owned();
    name.push(".sum");
    PathBuf::from(name)
}

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(String);

impl Stamp {
    /// `None` where the platform gives no change time: every use hashes.
    fn of(meta: &std::fs::Metadata) -> Option<Stamp> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            Some(Stamp(format!(
                "{} {}.{:09} {}.{:09} {} {}",
                meta.size(),
                meta.mtime(),
                meta.mtime_nsec(),
                meta.ctime(),
                meta.ctime_nsec(),
                meta.ino(),
                meta.dev()
            )))
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            None
        }
    }

    /// The stamp to record for `meta`, unless the file changed so recently
    /// that an edit in the same clock tick would leave it unchanged.
    fn settled(meta: &std::fs::Metadata) -> Option<Stamp> {
        // The change time, not the modification time: `mtime` can be set
        // back, and the stamp must differ from that of any later edit.
        #[cfg(unix)]
        let changed = {
            use std::os::unix::fs::MetadataExt;
            let secs = u64::try_from(meta.ctime()).ok()?;
            SystemTime::UNIX_EPOCH + Duration::new(secs, u32::try_from(meta.ctime_nsec()).ok()?)
        };
        #[cfg(not(unix))]
        let changed = meta.modified().ok()?;
        let age = SystemTime::now().duration_since(changed).ok()?;
        if age < RACY_WINDOW {
            return None;
        }
        Stamp::of(meta)
    }
}

/// An entry's record: the digest of its `.cwasm`, and the stamp of the file
/// that digest was last checked against, if settled.
struct Record {
    sha256: String,
    stamp: Option<Stamp>,
}

impl Record {
    fn parse(magic: &str, text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != magic {
            return None;
        }
        let sha256 = lines.next()?.to_string();
        if sha256.len() != 64 {
            return None;
        }
        let stamp = lines
            .next()
            .filter(|s| !s.is_empty())
            .map(|s| Stamp(s.to_string()));
        Some(Record { sha256, stamp })
    }

    fn write(&self, magic: &str, record: &Path) -> std::io::Result<()> {
        let stamp = self.stamp.as_ref().map_or("", |s| s.0.as_str());
        let text = format!("{magic}\n{}\n{stamp}\n", self.sha256);
        if let Some(dir) = record.parent() {
            std::fs::create_dir_all(dir)?;
        }
        pde_core::fsutil::atomic_write(record, text.as_bytes())
    }
}

/// `Ok(None)`: no usable entry (none, or no record). `Err`: an entry that
/// must not be used.
fn read_entry(engine: &Engine, path: &Path) -> Result<Option<(Component, Verified)>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let record = match std::fs::read_to_string(record_path(path)) {
        Ok(text) => {
            Record::parse(RECORD_MAGIC, &text).ok_or("its record is not a pde cache record")?
        }
        // An entry of an older pde, or one whose record was never written.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let stamp = Stamp::of(&meta);
    if stamp.is_some() && stamp == record.stamp {
        // SAFETY: the file is the one whose digest matched the record, which
        // is what `Component::serialize` wrote for this engine configuration
        // (compatibility hash in the file name; wasmtime re-checks its own
        // header and version). Replacing or editing it changes the stamp; it
        // is checked again after mapping, so a swap in between is refused.
        #[allow(unsafe_code)]
        let component =
            unsafe { Component::deserialize_file(engine, path) }.map_err(|e| format!("{e:#}"))?;
        let after = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if Stamp::of(&after) != stamp {
            return Err("it changed while it was being loaded".into());
        }
        return Ok(Some((component, Verified::Stamp)));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    if hex::encode(Sha256::digest(&bytes)) != record.sha256 {
        return Err("checksum mismatch (corrupt, truncated or edited)".into());
    }
    // SAFETY: the bytes are the ones just hashed, equal to what
    // `Component::serialize` wrote (see above).
    #[allow(unsafe_code)]
    let component =
        unsafe { Component::deserialize(engine, &bytes) }.map_err(|e| format!("{e:#}"))?;
    // Record the stamp of the bytes that were hashed, if the file is still
    // that one and old enough to be trusted by stamp next time.
    let now = std::fs::metadata(path).ok();
    if let Some(now) = now
        && Stamp::of(&now) == Stamp::of(&meta)
        && let Some(settled) = Stamp::settled(&now)
    {
        let updated = Record {
            sha256: record.sha256,
            stamp: Some(settled),
        };
        if let Err(e) = updated.write(RECORD_MAGIC, &record_path(path)) {
            tracing::debug!(path = %path.display(), "cannot update cache record: {e}");
        }
    }
    Ok(Some((component, Verified::Digest)))
}

fn write_entry(component: &Component, path: &Path) -> std::io::Result<()> {
    let payload = component
        .serialize()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    pde_core::fsutil::atomic_write(path, &payload)?;
    // Written after the entry: a reader in between finds no record, which is
    // a miss, never a trusted unverified entry. No stamp yet (just written,
    // so racy); the first use after RACY_WINDOW hashes and records it.
    Record {
        sha256: hex::encode(Sha256::digest(&payload)),
        stamp: None,
    }
    .write(RECORD_MAGIC, &record_path(path))
}
