//! Compiled components cached on disk, so a CLI run does not recompile.
//!
//! Compiling a component takes tens of milliseconds; loading a serialized one
//! a fraction of one. Entries live under `plugins/` of the per-user cache
//! and of the workspace's `<state>/cache/` (see "Two directories, one
//! cache" below), named by
//! the wasm's sha256 and a hash of the engine's identity (pde's version and
//! `Engine::precompile_compatibility_hash`), so a new pde or different engine
//! settings simply miss.
//!
//! An entry is two files: `<key>.cwasm`, exactly what `Component::serialize`
//! wrote, so that it can be memory-mapped (`Component::deserialize_file`)
//! instead of read and copied; and `<key>.cwasm.sum`, its record: the sha256
//! of the `.cwasm`, once the digest has been checked the file's stamp (size,
//! modification and change times in nanoseconds, inode, device), and a MAC.
//!
//! # Caches hold no trust (DESIGN §11)
//!
//! `Component::deserialize_file` is `unsafe`: it maps machine code as-is, so
//! whoever can write an entry that pde deserializes runs native code as pde,
//! outside the sandbox, under any plugin's name. A digest in the record only
//! says the `.cwasm` is the one the record describes; anyone who can write
//! the directory (a CI cache restored from another branch, a shared
//! workspace, a copied state dir) can write a matching record too. So every
//! record carries an HMAC-SHA256 keyed by a per-user secret, the cache key
//! ([`CacheKey`], kept outside the workspace and every cache directory, see
//! [`cache_key_path`]). For an entry it covers:
//! - the sha256 of the `.cwasm` bytes (so, through SHA-256, the bytes);
//! - the sha256 of the verified `.wasm` it was compiled from, which is what
//!   the entry is looked up by: another plugin's entry, with its own valid
//!   record, does not authenticate under this plugin's name;
//! - the engine's identity (pde's version and wasmtime's compatibility hash);
//! - the stamp, when one is recorded.
//!
//! The MAC is checked before anything is deserialized. A record that fails it
//! (forged, or written by another machine or user: a different key) deletes
//! the entry with a warning and the plugin is compiled again from its `.wasm`,
//! whose digest was checked against the manifest's pin. A cache restored
//! from elsewhere therefore costs a recompile, never trust. What the MAC
//! cannot stop is code running as this user: it can read the key, as it
//! could rewrite the pde binary itself.
//!
//! Hashing megabytes of machine code on every CLI run was 13% of a warm
//! `pde validate`, so the digest is checked on the first use after the file
//! changed, not on every use:
//! - the stamp matches the (authenticated) record: the file is the one whose
//!   digest was checked, and it is mapped as is. Rewriting a file, in place
//!   or by replacing it, changes its change time (`ctime`), which no user can
//!   set back, or its inode; restoring `mtime` (`touch -r`) does not hide an
//!   edit;
//! - otherwise the file is read and hashed; a digest that differs from the
//!   record (corrupt, truncated, edited or foreign) deletes the entry and it
//!   is rebuilt; one that matches is used, and the new stamp is recorded;
//! - no record: a miss (the entry is rebuilt and both files rewritten).
//!
//! A stamp is only recorded once the file is older than [`RACY_WINDOW`]:
//! file times have a coarse clock (a few milliseconds), so an edit in the
//! same tick as the stamp could leave every time unchanged (git's "racily
//! clean" index entries). Such a file is hashed again on its next use.
//! Writes go to a temporary file in the same directory and are renamed into
//! place, so a reader never sees half an entry.
//!
//! The same check guards the plugin files themselves. pde compares every
//! `.wasm` with the sha256 its manifest pins (and its signature covers); an
//! 18 MB Python component took 12 ms to hash on every load. The cache keeps
//! a digest index, `digests/<sha256 of the file's path>.sum`: the file's
//! sha256, its stamp, recorded once settled exactly as above, and a MAC over
//! the file's absolute path, digest and stamp. A matching stamp on an
//! authenticated record gives the digest without reading the file, and with
//! a cache hit the file is never read at all; any other stamp, or a record
//! that fails its MAC, reads and hashes it. A miss that must compile reads
//! the file then, and refuses it unless its bytes still have that digest
//! ([`Cache::file_digest`]).
//!
//! Without a usable cache key (none can be created, or the file is readable
//! by others or owned by someone else) nothing is cached: every run compiles,
//! with a warning saying why.
//!
//! # Two directories, one cache (issue 24)
//!
//! A fresh clone has no state directory, and a read-only command must not
//! create one; recompiling every plugin on every such command (1.8 s for the
//! six example plugins, over a minute for an 18 MB Python one) is what a CI
//! job checking a pull request paid. So every command that compiles uses
//! the per-user cache, [`user_cache_dir`], and, where the workspace's state
//! directory exists (or the command may create it), the workspace's cache
//! too ([`Cache::with_dirs`]):
//! - a lookup tries the workspace's directory first, then the per-user one;
//!   the first sound entry wins, and an unsound one in either is deleted;
//! - a compile writes the entry into both, so either serves the other's
//!   later runs (an entry served from one is not copied into the other);
//! - the digest index lives in the first directory.
//!
//! Entries are keyed the same way in both (the wasm's sha256 and the engine
//! identity) and authenticated by the same key, so sharing the per-user
//! cache between workspaces, pde builds or engine settings is safe: an entry
//! of another build or engine is simply a miss, and one written under
//! another key is discarded and rebuilt.

use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::PluginError;

/// First line of an entry's record.
const RECORD_MAGIC: &str = "PDECACHE3";
/// First line of a plugin file's record in the digest index.
const DIGEST_MAGIC: &str = "PDEDIGEST2";

/// The variable naming the cache key file, overriding the default location
/// (see [`cache_key_path`]).
pub const KEY_FILE_ENV: &str = "PDE_CACHE_KEY_FILE";

type HmacSha256 = Hmac<Sha256>;

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

/// An absolute path from the environment variable `var`. Empty or relative
/// values are ignored, as the XDG spec asks, so that a stray `VAR=` never
/// puts files in the working directory.
fn absolute_var(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// The per-user directory for compiled plugins used outside a workspace:
/// `$PDE_CACHE_DIR/plugins`, else `$XDG_CACHE_HOME/pde/plugins`, else
/// `~/.cache/pde/plugins`; `None` when none of them is set (no caching).
/// Empty or relative values are ignored, as the XDG spec asks, so that a
/// stray `PDE_CACHE_DIR=` never scatters entries into the working directory.
pub fn user_cache_dir() -> Option<PathBuf> {
    let root = absolute_var("PDE_CACHE_DIR")
        .or_else(|| absolute_var("XDG_CACHE_HOME").map(|d| d.join("pde")))
        .or_else(|| absolute_var("HOME").map(|d| d.join(".cache").join("pde")))?;
    Some(root.join("plugins"))
}

/// Where the cache key lives: `$PDE_CACHE_KEY_FILE`, else
/// `$XDG_CONFIG_HOME/pde/cache.key`, else `~/.config/pde/cache.key`; `None`
/// when none of them is set. A configuration directory, not a cache one: a
/// restored or shared cache must never bring its own key.
pub fn cache_key_path() -> Option<PathBuf> {
    absolute_var(KEY_FILE_ENV)
        .or_else(|| absolute_var("XDG_CONFIG_HOME").map(|d| d.join("pde").join("cache.key")))
        .or_else(|| absolute_var("HOME").map(|d| d.join(".config").join("pde").join("cache.key")))
}

/// Why the cache key cannot be used (the cache is then off).
#[derive(Debug, thiserror::Error)]
pub enum CacheKeyError {
    /// No variable names a place for it.
    #[error("no place for the compile cache key: set ${KEY_FILE_ENV}, $XDG_CONFIG_HOME or $HOME")]
    NoLocation,
    /// It cannot be read or created.
    #[error("cannot use the compile cache key {}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Others may read it, so others could forge cache entries.
    #[error(
        "the compile cache key {} is readable by other users (mode {mode:03o}); \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It belongs to another user, who could forge cache entries.
    #[error(
        "the compile cache key {} belongs to uid {owner}, not to this user (uid {uid})",
        path.display()
    )]
    NotOwned {
        /// The key file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The user running pde.
        uid: u32,
    },
    /// Not a regular file.
    #[error("the compile cache key {} is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Not what pde writes (64 hex digits).
    #[error(
        "the compile cache key {} is not 64 hex digits; delete it and pde makes a new one \
         (the cache is then rebuilt)",
        path.display()
    )]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
    /// Inside the cache it would authenticate: whoever restores or shares
    /// the cache would bring the key along.
    #[error(
        "the compile cache key {} is inside the cache directory {}; keep it elsewhere \
         (by default ~/.config/pde/cache.key)",
        path.display(),
        cache.display()
    )]
    InsideCache {
        /// The key file.
        path: PathBuf,
        /// The cache directory.
        cache: PathBuf,
    },
}

/// The per-user secret that authenticates cache records (see the module
/// docs). Never printed.
pub struct CacheKey {
    bytes: [u8; 32],
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(..)")
    }
}

impl CacheKey {
    /// The key in `path`, created (mode 0600, in a 0700 directory) if there
    /// is none. Refused when it is not a regular file, not owned by the user
    /// running pde, or readable or writable by group or others.
    pub fn load_or_create(path: &Path) -> Result<CacheKey, CacheKeyError> {
        if let Some(key) = CacheKey::load(path)? {
            return Ok(key);
        }
        CacheKey::create(path)
    }

    /// `Ok(None)` when there is no file at `path`.
    fn load(path: &Path) -> Result<Option<CacheKey>, CacheKeyError> {
        let io = |source| CacheKeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        // The metadata of the file opened, not of the path: nothing can be
        // swapped in between the check and the read.
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(CacheKeyError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let mode = meta.mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(CacheKeyError::Exposed {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            let uid = rustix::process::geteuid().as_raw();
            if meta.uid() != uid {
                return Err(CacheKeyError::NotOwned {
                    path: path.to_path_buf(),
                    owner: meta.uid(),
                    uid,
                });
            }
        }
        let mut text = String::new();
        file.take(256).read_to_string(&mut text).map_err(io)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| CacheKeyError::Malformed {
            path: path.to_path_buf(),
        })?;
        Ok(Some(CacheKey { bytes }))
    }

    /// Creates the key atomically: written and synced under a temporary
    /// name, then hard-linked into place, which fails rather than replace a
    /// key another pde created meanwhile (that one is then used).
    fn create(path: &Path) -> Result<CacheKey, CacheKeyError> {
        let io = |source| CacheKeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(io)?;
        let mut bytes = [0u8; 32];
        let mut suffix = [0u8; 8];
        getrandom::fill(&mut bytes)
            .and_then(|()| getrandom::fill(&mut suffix))
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let tmp = dir.join(format!(
            "{}cache.key-{}",
            pde_core::fsutil::TMP_PREFIX,
            hex::encode(suffix)
        ));
        let written = (|| {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match written {
            Ok(()) => {
                let _ = pde_core::fsutil::sync_dir(dir);
                tracing::info!(path = %path.display(), "created the compile cache key");
                Ok(CacheKey { bytes })
            }
            // Another pde created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                CacheKey::load(path)?.ok_or_else(|| io(std::io::ErrorKind::NotFound.into()))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// HMAC-SHA256 of `fields` under this key, each length-prefixed so that
    /// no two lists of fields share an encoding.
    fn mac(&self, fields: &[&[u8]]) -> HmacSha256 {
        // HMAC takes a key of any length: this cannot fail.
        let mut mac = match HmacSha256::new_from_slice(&self.bytes) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        for field in fields {
            mac.update(&(field.len() as u64).to_le_bytes());
            mac.update(field);
        }
        mac
    }

    /// The MAC of `fields`, hex.
    fn sign(&self, fields: &[&[u8]]) -> String {
        hex::encode(self.mac(fields).finalize().into_bytes())
    }

    /// Whether `tag` (hex) is the MAC of `fields`, compared in constant time.
    fn verify(&self, fields: &[&[u8]], tag: &str) -> bool {
        match hex::decode(tag) {
            Ok(tag) => self.mac(fields).verify_slice(&tag).is_ok(),
            Err(_) => false,
        }
    }
}

/// How a cache entry was found to be sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Its stamp matched the record of an earlier digest check; mapped as is.
    Stamp,
    /// Its sha256 was computed and matched the record.
    Digest,
}

/// The cache directories and the key that authenticates their records.
struct Store {
    /// In lookup order, never empty; the first also holds the digest index.
    dirs: Vec<PathBuf>,
    key: CacheKey,
}

/// Feeds what `Hash` writes into SHA-256, for a stable engine identity.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }
}

/// The on-disk cache of compiled components.
pub struct Cache {
    store: Option<Store>,
    /// sha256 (hex) of pde's version and the engine's compatibility hash:
    /// what an entry was compiled for.
    engine_id: String,
}

impl Cache {
    /// A cache in `dir`, or no caching at all with `None`, authenticated by
    /// the key at [`cache_key_path`].
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Cache {
        Cache::with_key_file(engine, dir, cache_key_path())
    }

    /// A cache in `dir` authenticated by the key in `key_file`. Without a
    /// usable key nothing is cached (with a warning saying why): an
    /// unauthenticated cache would be a way to run native code as pde.
    pub fn with_key_file(
        engine: &Engine,
        dir: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Cache {
        Cache::with_dirs(engine, dir.into_iter().collect(), key_file)
    }

    /// One cache over several directories (the workspace's and the per-user
    /// one, see the module docs), authenticated by the key in `key_file`:
    /// a lookup tries each in turn, a compile fills them all, and the digest
    /// index lives in the first. No directories: no caching.
    pub fn with_dirs(engine: &Engine, dirs: Vec<PathBuf>, key_file: Option<PathBuf>) -> Cache {
        let mut h = ShaHasher(Sha256::new());
        h.write(b"pde ");
        h.write(env!("CARGO_PKG_VERSION").as_bytes());
        h.write(b"\0");
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_id = hex::encode(h.0.finalize());
        let mut unique: Vec<PathBuf> = Vec::new();
        for dir in dirs {
            let same = |d: &PathBuf| std::path::absolute(d).ok() == std::path::absolute(&dir).ok();
            if !unique.iter().any(same) {
                unique.push(dir);
            }
        }
        let store = if unique.is_empty() {
            None
        } else {
            match open_key(&unique, key_file) {
                Ok(key) => Some(Store { dirs: unique, key }),
                Err(e) => {
                    tracing::warn!(
                        cache = %unique[0].display(),
                        "compile cache off, every plugin is compiled on each run: {e}"
                    );
                    None
                }
            }
        };
        Cache { store, engine_id }
    }

    /// Whether entries are read and written at all.
    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// The cache directories, in lookup order (empty when not caching).
    pub fn dirs(&self) -> &[PathBuf] {
        self.store.as_ref().map_or(&[], |s| &s.dirs)
    }

    /// The file an entry for `sha256` lives in, in the first directory (its
    /// record is beside it, see [`record_path`]).
    pub fn entry_path(&self, sha256: &str) -> Option<PathBuf> {
        self.dirs().first().map(|dir| self.entry_in(dir, sha256))
    }

    /// Every cache directory's entry for `sha256` that is on disk now: where
    /// a compile was cached (empty when nothing was written).
    pub fn entries_on_disk(&self, sha256: &str) -> Vec<PathBuf> {
        self.dirs()
            .iter()
            .map(|dir| self.entry_in(dir, sha256))
            .filter(|p| p.is_file())
            .collect()
    }

    /// The entry for `sha256` in `dir`.
    fn entry_in(&self, dir: &Path, sha256: &str) -> PathBuf {
        dir.join(format!("{sha256}-{}.cwasm", &self.engine_id[..16]))
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
        let store = self.store.as_ref()?;
        for dir in &store.dirs {
            let path = self.entry_in(dir, sha256);
            match self.read_entry(engine, &store.key, &path, sha256) {
                Ok(Some((component, how))) => {
                    tracing::debug!(plugin, path = %path.display(), ?how, "compiled plugin loaded from cache");
                    return Some(component);
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(
                        plugin,
                        path = %path.display(),
                        "discarding cache entry, compiling the plugin again: {why}"
                    );
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(record_path(&path));
                }
            }
        }
        None
    }

    /// Compiles `wasm` (whose digest is `sha256`) and stores it, if caching.
    pub fn compile(
        &self,
        engine: &Engine,
        plugin: &str,
        sha256: &str,
        wasm: &[u8],
    ) -> Result<Component, PluginError> {
        tracing::debug!(plugin, sha256, "compiling plugin");
        let component = Component::new(engine, wasm).map_err(|e| PluginError::BadComponent {
            plugin: plugin.to_string(),
            message: format!("it does not compile as a WebAssembly component: {e:#}"),
        })?;
        let Some(store) = &self.store else {
            return Ok(component);
        };
        let payload = match component.serialize() {
            Ok(payload) => payload,
            Err(e) => {
                tracing::warn!(
                    plugin,
                    "cannot serialize the compiled plugin for the cache: {e:#}"
                );
                return Ok(component);
            }
        };
        for dir in &store.dirs {
            let path = self.entry_in(dir, sha256);
            match self.write_entry(&store.key, &payload, &path, sha256) {
                Ok(()) => tracing::debug!(plugin, path = %path.display(), "compiled plugin cached"),
                // A cache that cannot be written costs time, not correctness.
                Err(e) => {
                    tracing::warn!(plugin, path = %path.display(), "cannot write plugin cache: {e}")
                }
            }
        }
        Ok(component)
    }

    /// The sha256 of the plugin file at `path`: from the digest index when
    /// the file's stamp is the one an authenticated record holds from when it
    /// was last hashed (see the module docs), otherwise read and hashed, and
    /// recorded once settled.
    pub fn file_digest(&self, path: &Path) -> std::io::Result<FileDigest> {
        let index = self.digest_record_path(path);
        let meta = std::fs::metadata(path)?;
        if let Some((store, index, absolute)) = &index
            && let Some(stamp) = Stamp::of(&meta)
            && let Ok(text) = std::fs::read_to_string(index)
            && let Some(record) = Record::parse(DIGEST_MAGIC, &text)
            && record.stamp.as_ref() == Some(&stamp)
        {
            if store.key.verify(
                &digest_fields(absolute, &record.sha256, &stamp),
                &record.mac,
            ) {
                return Ok(FileDigest {
                    sha256: record.sha256,
                    bytes: None,
                });
            }
            tracing::warn!(
                path = %path.display(),
                record = %index.display(),
                "discarding a digest record this machine's pde did not write (forged, or from \
                 another machine); hashing the file"
            );
            let _ = std::fs::remove_file(index);
        }
        let bytes = std::fs::read(path)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if let Some((store, index, absolute)) = &index
            && let Ok(now) = std::fs::metadata(path)
            && Stamp::of(&now) == Stamp::of(&meta)
            && let Some(settled) = Stamp::settled(&now)
        {
            let record = Record {
                mac: store.key.sign(&digest_fields(absolute, &sha256, &settled)),
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

    /// Where the digest index keeps the record of the file at `path`, with
    /// the store and the absolute path (which its MAC covers).
    fn digest_record_path(&self, path: &Path) -> Option<(&Store, PathBuf, PathBuf)> {
        let store = self.store.as_ref()?;
        let absolute = std::path::absolute(path).ok()?;
        let key = hex::encode(Sha256::digest(absolute.as_os_str().as_encoded_bytes()));
        let record = store.dirs[0].join("digests").join(format!("{key}.sum"));
        Some((store, record, absolute))
    }

    /// What an entry's MAC covers (see the module docs).
    fn entry_fields<'a>(
        &'a self,
        source_sha256: &'a str,
        cwasm_sha256: &'a str,
        stamp: Option<&'a Stamp>,
    ) -> [&'a [u8]; 5] {
        [
            RECORD_MAGIC.as_bytes(),
            source_sha256.as_bytes(),
            self.engine_id.as_bytes(),
            cwasm_sha256.as_bytes(),
            stamp.map_or(&[][..], |s| s.0.as_bytes()),
        ]
    }

    /// `Ok(None)`: no usable entry (none, or no record). `Err`: an entry that
    /// must not be used.
    fn read_entry(
        &self,
        engine: &Engine,
        key: &CacheKey,
        path: &Path,
        source_sha256: &str,
    ) -> Result<Option<(Component, Verified)>, String> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let record = match std::fs::read_to_string(record_path(path)) {
            Ok(text) => Record::parse(RECORD_MAGIC, &text)
                .ok_or("its record is not a pde cache record (or an older pde's)")?,
            // An entry of an older pde, or one whose record was never written.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        // Before anything else: a record this machine's pde did not write
        // for this plugin's verified wasm and this engine says nothing.
        let fields = self.entry_fields(source_sha256, &record.sha256, record.stamp.as_ref());
        if !key.verify(&fields, &record.mac) {
            return Err(
                "its record is not authenticated by this machine's cache key \
                        (forged, another plugin's, or written on another machine)"
                    .into(),
            );
        }
        let stamp = Stamp::of(&meta);
        if stamp.is_some() && stamp == record.stamp {
            // SAFETY: the record is authenticated (this pde wrote it for this
            // wasm and engine) and says the file with this stamp had the digest
            // of what `Component::serialize` wrote; replacing or editing the
            // file changes the stamp. It is checked again after mapping, so a
            // swap in between is refused. wasmtime re-checks its own header.
            #[allow(unsafe_code)]
            let component = unsafe { Component::deserialize_file(engine, path) }
                .map_err(|e| format!("{e:#}"))?;
            let after = std::fs::metadata(path).map_err(|e| e.to_string())?;
            if Stamp::of(&after) != stamp {
                return Err("it changed while it was being loaded".into());
            }
            return Ok(Some((component, Verified::Stamp)));
        }
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != record.sha256 {
            return Err("checksum mismatch (corrupt, truncated or edited)".into());
        }
        // SAFETY: the bytes are the ones just hashed, equal to what the
        // authenticated record says `Component::serialize` wrote (see above).
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
                mac: key.sign(&self.entry_fields(source_sha256, &actual, Some(&settled))),
                sha256: actual,
                stamp: Some(settled),
            };
            if let Err(e) = updated.write(RECORD_MAGIC, &record_path(path)) {
                tracing::debug!(path = %path.display(), "cannot update cache record: {e}");
            }
        }
        Ok(Some((component, Verified::Digest)))
    }

    fn write_entry(
        &self,
        key: &CacheKey,
        payload: &[u8],
        path: &Path,
        source_sha256: &str,
    ) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        pde_core::fsutil::atomic_write(path, payload)?;
        // Written after the entry: a reader in between finds no record, which
        // is a miss, never a trusted unverified entry. No stamp yet (just
        // written, so racy); the first use after RACY_WINDOW hashes and
        // records it.
        let cwasm_sha256 = hex::encode(Sha256::digest(payload));
        Record {
            mac: key.sign(&self.entry_fields(source_sha256, &cwasm_sha256, None)),
            sha256: cwasm_sha256,
            stamp: None,
        }
        .write(RECORD_MAGIC, &record_path(path))
    }
}

/// The key for a cache in `dirs` (`plugins` directories), from `key_file`,
/// refused when it lies inside one of the caches (their parent directories).
fn open_key(dirs: &[PathBuf], key_file: Option<PathBuf>) -> Result<CacheKey, CacheKeyError> {
    let key_file = key_file.ok_or(CacheKeyError::NoLocation)?;
    for dir in dirs {
        let cache_root = dir.parent().unwrap_or(dir);
        if let (Ok(key), Ok(root)) = (
            std::path::absolute(&key_file),
            std::path::absolute(cache_root),
        ) && key.starts_with(&root)
        {
            return Err(CacheKeyError::InsideCache {
                path: key_file,
                cache: cache_root.to_path_buf(),
            });
        }
    }
    CacheKey::load_or_create(&key_file)
}

/// What a digest record's MAC covers.
fn digest_fields<'a>(absolute: &'a Path, sha256: &'a str, stamp: &'a Stamp) -> [&'a [u8]; 4] {
    [
        DIGEST_MAGIC.as_bytes(),
        absolute.as_os_str().as_encoded_bytes(),
        sha256.as_bytes(),
        stamp.0.as_bytes(),
    ]
}

/// Where the record (digest, stamp and MAC) of the entry at `entry` lives.
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

/// A record: the digest of a `.cwasm` (or of a plugin file), the stamp of
/// the file that digest was last checked against, if settled, and the MAC
/// that says this machine's pde wrote it. One field a line; the stamp line
/// is empty when there is none.
struct Record {
    sha256: String,
    stamp: Option<Stamp>,
    mac: String,
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
        let stamp = lines.next()?.to_string();
        let mac = lines.next()?.to_string();
        Some(Record {
            sha256,
            stamp: (!stamp.is_empty()).then_some(Stamp(stamp)),
            mac,
        })
    }

    fn write(&self, magic: &str, record: &Path) -> std::io::Result<()> {
        let stamp = self.stamp.as_ref().map_or("", |s| s.0.as_str());
        let text = format!("{magic}\n{}\n{stamp}\n{}\n", self.sha256, self.mac);
        if let Some(dir) = record.parent() {
            std::fs::create_dir_all(dir)?;
        }
        pde_core::fsutil::atomic_write(record, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_is_private_and_the_same_key_is_read_back() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("config").join("pde").join("cache.key");
        let made = CacheKey::load_or_create(&path).unwrap();
        let again = CacheKey::load_or_create(&path).unwrap();
        assert_eq!(made.bytes, again.bytes);
        assert_ne!(made.bytes, [0u8; 32]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().unwrap()), 0o700);
        }
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cache.key")]);
    }

    #[test]
    fn concurrent_first_uses_agree_on_one_key() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("cache.key");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| CacheKey::load_or_create(&path).unwrap().bytes))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "two keys in use");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_others_can_read_is_refused_and_not_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("cache.key");
        CacheKey::load_or_create(&path).unwrap();
        let before = std::fs::read(&path).unwrap();
        for mode in [0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = CacheKey::load_or_create(&path).unwrap_err();
            assert!(
                matches!(err, CacheKeyError::Exposed { mode: m, .. } if m == mode),
                "{err}"
            );
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[cfg(unix)]
    #[test]
    fn a_key_owned_by_someone_else_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("cache.key");
        CacheKey::load_or_create(&path).unwrap();
        let me = rustix::process::geteuid().as_raw();
        // Only root can give a file away; elsewhere this case cannot be set up.
        if std::os::unix::fs::chown(&path, Some(me.wrapping_add(4242)), None).is_err() {
            return;
        }
        let err = CacheKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, CacheKeyError::NotOwned { .. }), "{err}");
    }

    #[test]
    fn a_malformed_or_misplaced_key_turns_the_cache_off() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("cache.key");
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        opts.open(&path).unwrap().write_all(b"not hex\n").unwrap();
        let err = CacheKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, CacheKeyError::Malformed { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not hex\n");

        let engine = Engine::default();
        let cache_root = home.path().join("cache");
        let cache = Cache::with_key_file(&engine, Some(cache_root.join("plugins")), Some(path));
        assert!(!cache.enabled());
        // A key inside the cache it would authenticate travels with it.
        let inside = cache_root.join("cache.key");
        let cache = Cache::with_key_file(
            &engine,
            Some(cache_root.join("plugins")),
            Some(inside.clone()),
        );
        assert!(!cache.enabled());
        assert!(!inside.exists());
        let err = open_key(&[cache_root.join("plugins")], Some(inside)).unwrap_err();
        assert!(matches!(err, CacheKeyError::InsideCache { .. }), "{err}");
        // No key location at all: no cache.
        let cache = Cache::with_key_file(&engine, Some(cache_root.join("plugins")), None);
        assert!(!cache.enabled());
    }

    #[test]
    fn macs_bind_every_field_and_their_boundaries() {
        let home = tempfile::tempdir().unwrap();
        let key = CacheKey::load_or_create(&home.path().join("k")).unwrap();
        let tag = key.sign(&[b"ab", b"c"]);
        assert!(key.verify(&[b"ab", b"c"], &tag));
        assert!(!key.verify(&[b"a", b"bc"], &tag));
        assert!(!key.verify(&[b"ab", b"d"], &tag));
        assert!(!key.verify(&[b"ab", b"c"], "zz"));
        let other = CacheKey::load_or_create(&home.path().join("k2")).unwrap();
        assert!(!other.verify(&[b"ab", b"c"], &tag));
        assert_eq!(format!("{key:?}"), "CacheKey(..)");
    }
}
