//! Ed25519 keys: generation, loading, key ids and trust sets.
//!
//! Keys are stored as text so they survive copy-paste into secret managers:
//! a signing key file holds the 32-byte seed in hex, a public key file the
//! 32-byte public key in hex. Secret material never appears in an error or a
//! log line; errors name the file or variable it came from instead.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::exit::{ExitCode, HasExitCode};

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The key environment variable is not set.
    #[error("signing key variable {0} is not set")]
    MissingEnv(String),
    /// The text is not a 64-hex-digit key.
    #[error("{origin} does not hold an ed25519 key (expected 64 hex digits)")]
    Malformed {
        /// Where the text came from (a path or a variable name, never the text).
        origin: String,
    },
    /// Refusing to overwrite an existing key.
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    /// The operating system's random source failed.
    #[error("no randomness available for key generation: {0}")]
    Random(String),
}

impl HasExitCode for KeyError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

/// The id of a public key: the first 16 hex digits of the sha256 of its bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Parses 64 hex digits (surrounding whitespace ignored) into 32 bytes.
fn parse_hex32(text: &str, origin: &str) -> Result<[u8; 32], KeyError> {
    let malformed = || KeyError::Malformed {
        origin: origin.to_string(),
    };
    let bytes = hex::decode(text.trim()).map_err(|_| malformed())?;
    bytes.try_into().map_err(|_| malformed())
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a signing key (hex seed) from a file.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let seed = parse_hex32(&read(path)?, &path.display().to_string())?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a signing key (hex seed) from an environment variable.
pub fn load_signing_key_env(var: &str) -> Result<SigningKey, KeyError> {
    let text = std::env::var(var).map_err(|_| KeyError::MissingEnv(var.to_string()))?;
    let seed = parse_hex32(&text, &format!("variable {var}"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a public key (hex) from a file.
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let bytes = parse_hex32(&read(path)?, &path.display().to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Malformed {
        origin: path.display().to_string(),
    })
}

/// The files written by [`generate`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct GeneratedKey {
    /// The secret signing key (hex seed), created with mode 0600.
    pub secret_path: PathBuf,
    /// The public key (hex), safe to distribute.
    pub public_path: PathBuf,
    /// The key id that signatures made with this key carry.
    pub key_id: String,
}

/// Creates a new key pair in `dir` as `<name>` and `<name>.pub`.
pub fn generate(dir: &Path, name: &str) -> Result<GeneratedKey, KeyError> {
    let secret_path = dir.join(name);
    let public_path = dir.join(format!("{name}.pub"));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(KeyError::Exists(p.clone()));
        }
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    write_secret(&secret_path, &hex::encode(seed)).map_err(io(&secret_path))?;
    std::fs::write(
        &public_path,
        hex::encode(key.verifying_key().as_bytes()) + "\n",
    )
    .map_err(io(&public_path))?;
    Ok(GeneratedKey {
        secret_path,
        public_path,
        key_id: key_id(&key.verifying_key()),
    })
}

fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// An ed25519 signature over a message, as it travels in bundles and `.sig` files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Signature {
    /// [`key_id`] of the signing key.
    pub keyid: String,
    /// Always `"ed25519"`.
    pub alg: String,
    /// The 64-byte signature, standard base64.
    pub sig: String,
}

/// Signs `message` with `key`.
pub fn sign(key: &SigningKey, message: &[u8]) -> Signature {
    Signature {
        keyid: key_id(&key.verifying_key()),
        alg: "ed25519".to_string(),
        sig: base64::engine::general_purpose::STANDARD.encode(key.sign(message).to_bytes()),
    }
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Nothing was signed, or no signature was present.
    #[error("no signature")]
    Missing,
    /// The signature is for a key that is not trusted here.
    #[error("signed by untrusted key {0}")]
    UntrustedKey(String),
    /// The algorithm is not ed25519.
    #[error("unsupported signature algorithm {0:?}")]
    Algorithm(String),
    /// The signature is not valid base64 of 64 bytes.
    #[error("malformed signature")]
    Malformed,
    /// The signature does not match the message.
    #[error("signature by key {0} does not match")]
    Invalid(String),
    /// The key was trusted once but has been revoked (`[trust] revoked`).
    #[error("signed by revoked key {0}")]
    Revoked(String),
}

/// A set of public keys whose signatures are accepted.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
    revoked: Vec<String>,
    /// Key id → what the workspace calls the key (its file, or the name a
    /// trust file gives it), so that a signature is attributed to a key a
    /// person recognises and not only to a hex id.
    names: std::collections::BTreeMap<String, String>,
}

impl TrustedKeys {
    /// An empty set: trusts nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key to the set.
    pub fn add(&mut self, key: VerifyingKey) -> &mut Self {
        self.keys.push(key);
        self
    }

    /// Adds a key under `name` (its file, or a configured name): the name
    /// [`TrustedKeys::name_of`] gives its signatures.
    pub fn add_named(&mut self, key: VerifyingKey, name: impl Into<String>) -> &mut Self {
        self.names.insert(key_id(&key), name.into());
        self.add(key)
    }

    /// Loads every public key file given, each named by its path as given.
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, KeyError> {
        let mut set = Self::new();
        for p in paths {
            set.add_named(
                load_public_key(p.as_ref())?,
                p.as_ref().display().to_string(),
            );
        }
        Ok(set)
    }

    /// What the key with `keyid` is called here (see
    /// [`TrustedKeys::add_named`]); `None` for an unnamed or unknown key.
    pub fn name_of(&self, keyid: &str) -> Option<&str> {
        self.names.get(keyid).map(String::as_str)
    }

    /// Stops trusting the keys with these ids, even when they are also
    /// listed as trusted: a signature by one is reported as revoked.
    pub fn revoke<S: AsRef<str>>(&mut self, key_ids: &[S]) -> &mut Self {
        self.revoked
            .extend(key_ids.iter().map(|k| k.as_ref().trim().to_string()));
        self
    }

    /// True when no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The ids of the trusted keys.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(key_id).collect()
    }

    /// Checks one signature: it must be ed25519, by a trusted key, and valid.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        if signature.alg != "ed25519" {
            return Err(SignatureError::Algorithm(signature.alg.clone()));
        }
        // Checked first: a revoked key is refused whatever else holds.
        if self.revoked.contains(&signature.keyid) {
            return Err(SignatureError::Revoked(signature.keyid.clone()));
        }
        let key = self
            .keys
            .iter()
            .find(|k| key_id(k) == signature.keyid)
            .ok_or_else(|| SignatureError::UntrustedKey(signature.keyid.clone()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&signature.sig)
            .map_err(|_| SignatureError::Malformed)?;
        let sig =
            ed25519_dalek::Signature::from_slice(&bytes).map_err(|_| SignatureError::Malformed)?;
        key.verify(message, &sig)
            .map_err(|_| SignatureError::Invalid(signature.keyid.clone()))
    }

    /// Accepts when at least one of `signatures` verifies; otherwise reports
    /// the most telling failure (an invalid signature beats an unknown key).
    pub fn verify_any(
        &self,
        message: &[u8],
        signatures: &[Signature],
    ) -> Result<(), SignatureError> {
        let mut worst = SignatureError::Missing;
        for s in signatures {
            match self.verify(message, s) {
                Ok(()) => return Ok(()),
                Err(e @ SignatureError::Invalid(_)) => worst = e,
                Err(e) if worst == SignatureError::Missing => worst = e,
                Err(_) => {}
            }
        }
        Err(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_and_reject_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let k = generate(dir.path(), "k").unwrap();
        let sk = load_signing_key(&k.secret_path).unwrap();
        let trusted = TrustedKeys::from_files(&[&k.public_path]).unwrap();
        let sig = sign(&sk, b"sha256:abc");
        assert_eq!(sig.keyid, k.key_id);
        trusted.verify(b"sha256:abc", &sig).unwrap();
        assert_eq!(
            trusted.verify(b"sha256:abd", &sig),
            Err(SignatureError::Invalid(k.key_id.clone()))
        );
        assert!(matches!(
            TrustedKeys::new().verify_any(b"x", &[sig]),
            Err(SignatureError::UntrustedKey(_))
        ));
        assert!(matches!(
            generate(dir.path(), "k"),
            Err(KeyError::Exists(_))
        ));
    }

    #[test]
    fn malformed_key_error_does_not_echo_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad");
        std::fs::write(&p, "supersecretbutnothex").unwrap();
        let msg = load_signing_key(&p).unwrap_err().to_string();
        assert!(!msg.contains("supersecret"), "{msg}");
    }
}
