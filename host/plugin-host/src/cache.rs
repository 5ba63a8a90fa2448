//! Compiled components cached on disk, so a CLI run does not recompile.
//!
//! Compiling a component takes tens of milliseconds; loading a serialized one
//! a fraction of one. Entries live under `<state>/cache/plugins/`, named by
//! the wasm's sha256 and a hash of `Engine::precompile_compatibility_hash`, so
//! a new pde or different engine settings simply miss.
//!
//! `Component::deserialize` is `unsafe` because it maps machine code as-is.
//! So an entry is never trusted as found: each file starts with the sha256 of
//! the serialized bytes that follow, checked before deserializing; a corrupt,
//! truncated or foreign entry is deleted and rebuilt. Writes go to a temporary
//! file in the same directory and are renamed into place, so a reader never
//! sees half an entry. (Someone able to rewrite the state directory can also
//! rewrite the checksum; the state directory is as trusted as the binary.)
//!
//! Outside a workspace there is no state directory, and recompiling a large
//! component (an 18 MB Python one takes over a minute) on every
//! `pde plugin test PATH` is what made authors wait; so those commands use a
//! per-user cache, [`user_cache_dir`], with exactly the same entries and
//! checks. Its entries are keyed the same way, so sharing it between pde
//! builds or engine settings is safe: a foreign entry is simply a miss.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::PluginError;

const MAGIC: &[u8; 10] = b"PDECACHE1\n";

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

    /// The file an entry for `sha256` lives in.
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
        let entry = self.entry_path(sha256);
        if let Some(path) = &entry {
            match read_entry(engine, path) {
                Ok(Some(component)) => {
                    tracing::debug!(plugin, path = %path.display(), "compiled plugin loaded from cache");
                    return Ok((component, true));
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(plugin, path = %path.display(), "discarding cache entry: {why}");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let component = Component::new(engine, wasm).map_err(|e| PluginError::BadComponent {
            plugin: plugin.to_string(),
            message: format!("it does not compile as a WebAssembly component: {e:#}"),
        })?;
        if let Some(path) = &entry
            && let Err(e) = write_entry(&component, path)
        {
            // A cache that cannot be written costs time, not correctness.
            tracing::warn!(plugin, path = %path.display(), "cannot write plugin cache: {e}");
        }
        Ok((component, false))
    }
}

/// `Ok(None)`: no entry. `Err`: an entry that must not be used.
fn read_entry(engine: &Engine, path: &Path) -> Result<Option<Component>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a pde cache entry")?;
    if rest.len() < 32 {
        return Err("truncated".into());
    }
    let (sum, payload) = rest.split_at(32);
    if Sha256::digest(payload).as_slice() != sum {
        return Err("checksum mismatch (corrupt or edited)".into());
    }
    // SAFETY: the payload is byte-for-byte what `Component::serialize` wrote
    // for this engine configuration (checksum above, compatibility hash in the
    // file name, and wasmtime re-checks its own header and version).
    #[allow(unsafe_code)]
    unsafe { Component::deserialize(engine, payload) }
        .map(Some)
        .map_err(|e| format!("{e:#}"))
}

fn write_entry(component: &Component, path: &Path) -> std::io::Result<()> {
    let payload = component
        .serialize()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = Vec::with_capacity(MAGIC.len() + 32 + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&Sha256::digest(&payload));
    bytes.extend_from_slice(&payload);
    pde_core::fsutil::atomic_write(path, &bytes)
}
