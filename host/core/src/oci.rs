//! OCI registry delivery (issue 23): the one registry client that `pde
//! deploy` publishes through and `pde agent --pull` reads through, and the
//! media types of what pde stores in a registry.
//!
//! The distribution API is `oci-client`'s (the ORAS project); this module only
//! decides what pde puts there and what it accepts back:
//! - a **policy bundle** is an OCI artifact: an image manifest whose
//!   `artifactType` is [`BUNDLE_ARTIFACT_TYPE`], a small JSON config
//!   ([`BUNDLE_CONFIG_MEDIA_TYPE`], informational) and exactly one layer
//!   ([`BUNDLE_LAYER_MEDIA_TYPE`]): the bundle document itself, as `pde
//!   package` writes it, signatures and approvals inside;
//! - a **plugin** follows the CNCF Wasm OCI artifact layout that `wkg` uses:
//!   config [`WASM_CONFIG_MEDIA_TYPE`], one [`WASM_LAYER_MEDIA_TYPE`] layer;
//!   pde adds its plugin manifest and signature as manifest annotations.
//!
//! A registry is a transport, not a source of trust (DESIGN §11): a tag only
//! says where to look. Readers resolve it to a manifest digest, fetch by
//! digest, and `oci-client` checks every blob against its descriptor's
//! digest; the bundle's own signature and digest are checked by whoever
//! activates it. Manifests pde pushes carry no time stamp, so pushing the
//! same bundle again gives the same manifest digest: re-pointing a tag to an
//! earlier release is a push of that release.
//!
//! Credentials are a [`Secret`]; nothing here formats them, and
//! [`Credentials`]' `Debug` shows only the user name.

use std::collections::BTreeMap;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use secrecy::ExposeSecret;
use sha2::{Digest as _, Sha256};

use crate::secret::Secret;

/// `artifactType` of a pde policy bundle's manifest.
pub const BUNDLE_ARTIFACT_TYPE: &str = "application/vnd.pde.bundle.v1";
/// Media type of the bundle's config blob: `{"policy_id", "version",
/// "digest", "format"}`, for people browsing a registry; never trusted.
pub const BUNDLE_CONFIG_MEDIA_TYPE: &str = "application/vnd.pde.bundle.config.v1+json";
/// Media type of the one layer: the bundle document (`pde.bundle/v1` or `/v2`).
pub const BUNDLE_LAYER_MEDIA_TYPE: &str = "application/vnd.pde.bundle.layer.v1+json";
/// Manifest annotation: the policy id of the bundle.
pub const ANNOTATION_POLICY_ID: &str = "dev.pde.policy.id";
/// Manifest annotation: the bundle's own digest (`sha256:` of its payload).
pub const ANNOTATION_BUNDLE_DIGEST: &str = "dev.pde.bundle.digest";
/// Manifest annotation: the policy version (OCI's standard key).
pub const ANNOTATION_VERSION: &str = "org.opencontainers.image.version";

/// Config media type of a Wasm component (CNCF Wasm OCI artifact layout, as `wkg` writes it).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Layer media type of a Wasm component.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// The `created` time of every Wasm config pde writes: the Unix epoch
/// (reproducible; see [`Registry::push_plugin`]).
pub const WASM_CONFIG_CREATED: &str = "1970-01-01T00:00:00Z";
/// Manifest annotation holding the plugin's `<name>.toml`.
pub const ANNOTATION_PLUGIN_MANIFEST: &str = "dev.pde.plugin.manifest";
/// Manifest annotation holding the plugin's `<name>.wasm.sig`.
pub const ANNOTATION_PLUGIN_SIGNATURE: &str = "dev.pde.plugin.signature";
/// A plugin annotation whose value starts with this is the standard base64
/// of the text (what a tool that cannot write a multi-line annotation, such
/// as `wkg`, can carry); pde itself writes the text.
pub const BASE64_ANNOTATION_PREFIX: &str = "base64:";

/// Largest manifest read from a registry.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// A registry request that failed, or an answer pde does not accept.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A reference that is not `HOST[:PORT]/REPOSITORY`.
    #[error(
        "registry reference {0:?} is not HOST[:PORT]/REPOSITORY (e.g. registry.example.gov/pde/policies; no scheme, tag or digest)"
    )]
    BadReference(String),
    /// A tag that OCI does not allow (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`).
    #[error(
        "{0:?} is not a valid OCI tag (1 to 128 of A-Z a-z 0-9 . _ -, not starting with . or -)"
    )]
    BadTag(String),
    /// Credentials that are not `USER:PASSWORD`.
    #[error("registry credentials in ${0} must be USER:PASSWORD (or :TOKEN for a bearer token)")]
    BadCredentials(String),
    /// The registry could not be reached or refused the request.
    #[error("registry {registry}: {what}: {reason}")]
    Registry {
        /// The registry host.
        registry: String,
        /// The operation.
        what: String,
        /// What went wrong (oci-client's or the server's words).
        reason: String,
    },
    /// The tag does not exist.
    #[error("registry {registry}: tag {tag} of {repository} does not exist")]
    NoSuchTag {
        /// The registry host.
        registry: String,
        /// The repository.
        repository: String,
        /// The tag.
        tag: String,
    },
    /// What the registry served is not what pde published there.
    #[error("registry {registry}: {reference}: {reason}")]
    Unexpected {
        /// The registry host.
        registry: String,
        /// The reference read.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Registry credentials: a user and a password (or token). `Debug` never
/// shows the password.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: Secret,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"[REDACTED]")
            .finish()
    }
}

impl Credentials {
    /// Parses `USER:PASSWORD` read from the variable `var` (named only in errors).
    pub fn parse(var: &str, value: &Secret) -> Result<Credentials, OciError> {
        let (user, password) = value
            .expose_secret()
            .split_once(':')
            .ok_or_else(|| OciError::BadCredentials(var.to_string()))?;
        if password.is_empty() {
            return Err(OciError::BadCredentials(var.to_string()));
        }
        Ok(Credentials {
            user: user.to_string(),
            password: Secret::from(password.to_string()),
        })
    }

    /// Reads `USER:PASSWORD` from the environment variable `var`.
    pub fn from_env(var: &str) -> Result<Credentials, OciError> {
        let value = crate::secret::from_env(var)
            .ok_or_else(|| OciError::BadCredentials(var.to_string()))?;
        Credentials::parse(var, &value)
    }

    /// The password, for code that must hand it to a server.
    pub fn password(&self) -> &Secret {
        &self.password
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

/// A repository in a registry: `HOST[:PORT]/REPOSITORY`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Repository {
    /// `HOST[:PORT]`.
    pub registry: String,
    /// The repository path, e.g. `pde/policies`.
    pub repository: String,
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)
    }
}

impl std::str::FromStr for Repository {
    type Err = OciError;

    /// Parses `HOST[:PORT]/REPOSITORY` (an `oci://` prefix is allowed).
    fn from_str(s: &str) -> Result<Repository, OciError> {
        let bad = || OciError::BadReference(s.to_string());
        let rest = s.strip_prefix("oci://").unwrap_or(s);
        let (registry, repository) = rest.split_once('/').ok_or_else(bad)?;
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
                    && part.as_bytes()[0].is_ascii_alphanumeric()
            });
        let host_ok = !registry.is_empty()
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !repo_ok || !host_ok {
            return Err(bad());
        }
        Ok(Repository {
            registry: registry.to_string(),
            repository: repository.to_string(),
        })
    }
}

/// The tag pde moves for `policy_id` in `env`: `<policy_id>.<env>`.
pub fn policy_tag(policy_id: &str, env: &str) -> Result<String, OciError> {
    let tag = format!("{policy_id}.{env}");
    check_tag(&tag)?;
    Ok(tag)
}

/// Checks `tag` against the OCI distribution spec's tag grammar.
pub fn check_tag(tag: &str) -> Result<(), OciError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.as_bytes()[0] == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(OciError::BadTag(tag.to_string()))
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Plain HTTP instead of TLS: an explicit opt-in for loopback and test registries.
    pub plain_http: bool,
    /// Credentials, if the registry wants them.
    pub credentials: Option<Credentials>,
    /// Timeout of each request.
    pub timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            plain_http: false,
            credentials: None,
            timeout: Duration::from_secs(30),
        }
    }
}

/// A registry client bound to one repository.
pub struct Registry {
    repo: Repository,
    client: Client,
    auth: RegistryAuth,
    http: reqwest::Client,
    plain_http: bool,
    has_credentials: bool,
    password: Option<Secret>,
    user: Option<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("repo", &self.repo)
            .field("plain_http", &self.plain_http)
            .field("credentials", &self.has_credentials)
            .finish()
    }
}

/// A fetched bundle: the manifest digest it was fetched by, and its bytes.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The manifest digest (what the tag pointed at).
    pub manifest_digest: String,
    /// The layer: the bundle document.
    pub bundle: Vec<u8>,
    /// The manifest's `dev.pde.policy.id` annotation (not trusted; the
    /// bundle's signed payload is what counts).
    pub policy_id: Option<String>,
}

/// A fetched Wasm component.
#[derive(Debug, Clone)]
pub struct FetchedPlugin {
    /// The manifest digest it was fetched by.
    pub manifest_digest: String,
    /// The component.
    pub wasm: Vec<u8>,
    /// The pde plugin manifest (`<name>.toml`), when the artifact carries one.
    pub manifest_toml: Option<String>,
    /// The pde plugin signature (`<name>.wasm.sig`), when it carries one.
    pub signature: Option<String>,
}

impl Registry {
    /// A client for `repo`. Builds no connection yet.
    pub fn new(repo: Repository, opts: RegistryOptions) -> Result<Registry, OciError> {
        let protocol = if opts.plain_http {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            read_timeout: Some(opts.timeout),
            connect_timeout: Some(opts.timeout),
            user_agent: concat!("pde/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        });
        let auth = match &opts.credentials {
            None => RegistryAuth::Anonymous,
            Some(c) if c.user.is_empty() => {
                RegistryAuth::Bearer(c.password.expose_secret().to_string())
            }
            Some(c) => RegistryAuth::Basic(c.user.clone(), c.password.expose_secret().to_string()),
        };
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| OciError::Registry {
                registry: repo.registry.clone(),
                what: "client set-up".into(),
                reason: e.to_string(),
            })?;
        Ok(Registry {
            has_credentials: opts.credentials.is_some(),
            user: opts.credentials.as_ref().map(|c| c.user.clone()),
            password: opts.credentials.map(|c| c.password),
            repo,
            client,
            auth,
            http,
            plain_http: opts.plain_http,
        })
    }

    /// The repository.
    pub fn repository(&self) -> &Repository {
        &self.repo
    }

    fn tagged(&self, tag: &str) -> Reference {
        Reference::with_tag(
            self.repo.registry.clone(),
            self.repo.repository.clone(),
            tag.to_string(),
        )
    }

    fn by_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.repo.registry.clone(),
            self.repo.repository.clone(),
            digest.to_string(),
        )
    }

    fn err(&self, what: impl Into<String>, e: impl std::fmt::Display) -> OciError {
        OciError::Registry {
            registry: self.repo.registry.clone(),
            what: what.into(),
            reason: self.scrub(e.to_string()),
        }
    }

    /// Never lets the password into a message, whatever a server echoes.
    fn scrub(&self, text: String) -> String {
        match &self.password {
            Some(p) if !p.expose_secret().is_empty() => {
                text.replace(p.expose_secret(), "[REDACTED]")
            }
            _ => text,
        }
    }

    /// `GET /v2/`: the registry answers the distribution API. 200, or 401
    /// with a bearer challenge (a token registry, whose token exchange
    /// happens per request), is an answer; anything else is not.
    pub async fn ping(&self) -> Result<(), OciError> {
        let scheme = if self.plain_http { "http" } else { "https" };
        let url = format!("{scheme}://{}/v2/", self.repo.registry);
        let mut request = self.http.get(&url);
        if let (Some(user), Some(password)) = (&self.user, &self.password)
            && !user.is_empty()
        {
            request = request.basic_auth(user, Some(password.expose_secret()));
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.err("GET /v2/", format!("no answer: {}", error_chain(&e))))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let bearer = response
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer"));
        if status == reqwest::StatusCode::UNAUTHORIZED && bearer {
            return Ok(());
        }
        let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
            if self.has_credentials {
                ": the registry refused the credentials"
            } else {
                ": the registry wants credentials (set credentials_env)"
            }
        } else {
            ""
        };
        Err(self.err("GET /v2/", format!("answered {status}{hint}")))
    }

    /// The manifest digest `tag` points at, `None` when the tag does not exist.
    pub async fn resolve(&self, tag: &str) -> Result<Option<String>, OciError> {
        let reference = self.tagged(tag);
        match self
            .client
            .fetch_manifest_digest(&reference, &self.auth)
            .await
        {
            Ok(d) => Ok(Some(d)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err(format!("resolve tag {tag}"), e)),
        }
    }

    /// Every tag of the repository (an absent repository has none).
    pub async fn tags(&self) -> Result<Vec<String>, OciError> {
        let reference = self.tagged("latest");
        match self
            .client
            .list_tags(&reference, &self.auth, None, None)
            .await
        {
            Ok(t) => Ok(t.tags),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(self.err("list tags", e)),
        }
    }

    /// Pushes `bundle` (the document's bytes) as a pde bundle artifact and
    /// points `tag` at it. Returns the manifest digest. The manifest holds
    /// no time, so the same bundle always gets the same manifest digest.
    pub async fn push_bundle(
        &self,
        tag: &str,
        bundle: &[u8],
        policy_id: &str,
        version: &str,
        bundle_digest: &str,
        format: &str,
    ) -> Result<String, OciError> {
        check_tag(tag)?;
        let config = serde_json::json!({
            "policy_id": policy_id, "version": version,
            "digest": bundle_digest, "format": format,
        });
        let config = Config::new(
            serde_json::to_vec(&config).unwrap_or_default(),
            BUNDLE_CONFIG_MEDIA_TYPE.to_string(),
            None,
        );
        let layers = [ImageLayer::new(
            bundle.to_vec(),
            BUNDLE_LAYER_MEDIA_TYPE.to_string(),
            None,
        )];
        let mut annotations = BTreeMap::new();
        annotations.insert(ANNOTATION_POLICY_ID.to_string(), policy_id.to_string());
        annotations.insert(
            ANNOTATION_BUNDLE_DIGEST.to_string(),
            bundle_digest.to_string(),
        );
        annotations.insert(ANNOTATION_VERSION.to_string(), version.to_string());
        let mut manifest = OciImageManifest::build(&layers, &config, Some(annotations));
        manifest.artifact_type = Some(BUNDLE_ARTIFACT_TYPE.to_string());
        self.push_artifact(tag, &layers, config, manifest).await
    }

    /// Pushes the blobs, then the manifest as pde serialises it (plain
    /// `serde_json`, so annotations with newlines stay valid JSON; its digest
    /// is the sha256 of exactly these bytes), under `tag`.
    async fn push_artifact(
        &self,
        tag: &str,
        layers: &[ImageLayer],
        config: Config,
        manifest: OciImageManifest,
    ) -> Result<String, OciError> {
        let reference = self.tagged(tag);
        self.client
            .store_auth_if_needed(reference.resolve_registry(), &self.auth)
            .await;
        for layer in layers {
            self.client
                .push_blob(&reference, &layer.data, &layer.sha256_digest())
                .await
                .map_err(|e| self.err(format!("push {tag}"), error_chain(&e)))?;
        }
        self.client
            .push_blob(&reference, &config.data, &manifest.config.digest)
            .await
            .map_err(|e| self.err(format!("push {tag}"), error_chain(&e)))?;
        let body = serde_json::to_vec(&manifest).map_err(|e| self.err(format!("push {tag}"), e))?;
        let digest = sha256_digest(&body);
        self.client
            .push_manifest_raw(
                &reference,
                body,
                reqwest::header::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE),
            )
            .await
            .map_err(|e| self.err(format!("push {tag}"), error_chain(&e)))?;
        Ok(digest)
    }

    /// Points `tag` at the manifest `digest` already in the repository: the
    /// manifest's bytes are read by digest and put under the tag unchanged.
    pub async fn retag(&self, tag: &str, digest: &str) -> Result<(), OciError> {
        check_tag(tag)?;
        let (raw, media_type) = self.manifest_raw(digest).await?;
        let content_type = reqwest::header::HeaderValue::from_str(&media_type)
            .map_err(|e| self.err(format!("re-point {tag}"), e))?;
        self.client
            .push_manifest_raw(&self.tagged(tag), raw, content_type)
            .await
            .map_err(|e| self.err(format!("re-point {tag} to {digest}"), e))?;
        Ok(())
    }

    /// A manifest's bytes by digest, checked against the digest.
    async fn manifest_raw(&self, digest: &str) -> Result<(Vec<u8>, String), OciError> {
        let reference = self.by_digest(digest);
        let (raw, _) = self
            .client
            .pull_manifest_raw(&reference, &self.auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .map_err(|e| match e {
                OciDistributionError::DigestError(e) => self.unexpected(
                    digest,
                    &format!("the manifest served does not match the digest asked for: {e}"),
                ),
                e => self.err(format!("fetch manifest {digest}"), error_chain(&e)),
            })?;
        if raw.len() > MAX_MANIFEST_BYTES {
            return Err(self.unexpected(digest, "the manifest is over 1 MiB"));
        }
        let actual = sha256_digest(&raw);
        if actual != digest {
            return Err(self.unexpected(
                digest,
                &format!("the manifest served hashes to {actual}, not the digest asked for"),
            ));
        }
        Ok((raw, OCI_IMAGE_MEDIA_TYPE.to_string()))
    }

    fn unexpected(&self, reference: &str, reason: &str) -> OciError {
        OciError::Unexpected {
            registry: self.repo.registry.clone(),
            reference: reference.to_string(),
            reason: reason.to_string(),
        }
    }

    async fn manifest(&self, digest: &str) -> Result<OciImageManifest, OciError> {
        let (raw, _) = self.manifest_raw(digest).await?;
        let manifest: OciManifest = serde_json::from_slice(&raw)
            .map_err(|e| self.unexpected(digest, &format!("not an OCI image manifest: {e}")))?;
        match manifest {
            OciManifest::Image(m) => Ok(m),
            OciManifest::ImageIndex(_) => {
                Err(self.unexpected(digest, "an image index, not an artifact manifest"))
            }
        }
    }

    async fn blob(
        &self,
        digest: &str,
        layer: &OciDescriptor,
        max_bytes: usize,
    ) -> Result<Vec<u8>, OciError> {
        if layer.size < 0 || layer.size as u64 > max_bytes as u64 {
            return Err(self.unexpected(
                digest,
                &format!(
                    "its layer is {} bytes, over the limit of {max_bytes}",
                    layer.size
                ),
            ));
        }
        let mut out = Vec::with_capacity(layer.size as usize);
        // oci-client hashes the blob as it arrives and fails on a mismatch
        // with the descriptor's digest.
        self.client
            .pull_blob(&self.by_digest(digest), layer, &mut out)
            .await
            .map_err(|e| match e {
                OciDistributionError::DigestError(e) => self.unexpected(
                    digest,
                    &format!(
                        "blob {} served does not match its digest: {e}",
                        layer.digest
                    ),
                ),
                e => self.err(
                    format!("fetch blob {} of {digest}", layer.digest),
                    error_chain(&e),
                ),
            })?;
        if out.len() as i64 != layer.size || sha256_digest(&out) != layer.digest {
            return Err(self.unexpected(
                digest,
                &format!(
                    "blob {} does not match its descriptor (size or digest)",
                    layer.digest
                ),
            ));
        }
        Ok(out)
    }

    /// Fetches the bundle artifact with manifest `digest`: the manifest by
    /// digest, its one bundle layer (at most `max_bytes`), each checked
    /// against its digest. The bundle itself is not verified here.
    pub async fn fetch_bundle(&self, digest: &str, max_bytes: usize) -> Result<Fetched, OciError> {
        let manifest = self.manifest(digest).await?;
        if manifest.artifact_type.as_deref() != Some(BUNDLE_ARTIFACT_TYPE)
            && manifest.config.media_type != BUNDLE_CONFIG_MEDIA_TYPE
        {
            return Err(self.unexpected(
                digest,
                &format!("not a pde bundle (artifactType {BUNDLE_ARTIFACT_TYPE} expected)"),
            ));
        }
        let [layer] = manifest.layers.as_slice() else {
            return Err(self.unexpected(digest, "a pde bundle has exactly one layer"));
        };
        if layer.media_type != BUNDLE_LAYER_MEDIA_TYPE {
            return Err(self.unexpected(
                digest,
                &format!(
                    "its layer is {}, not {BUNDLE_LAYER_MEDIA_TYPE}",
                    layer.media_type
                ),
            ));
        }
        let bundle = self.blob(digest, layer, max_bytes).await?;
        Ok(Fetched {
            manifest_digest: digest.to_string(),
            bundle,
            policy_id: manifest
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_POLICY_ID).cloned()),
        })
    }

    /// Pushes a Wasm component in the CNCF Wasm OCI layout (`wkg`'s), with
    /// pde's plugin manifest and signature as annotations, under `tag`.
    /// `interface` is the component's top-level `(imports, exports)`, which
    /// the layout's config lists. Returns the manifest digest.
    pub async fn push_plugin(
        &self,
        tag: &str,
        wasm: &[u8],
        interface: (&[String], &[String]),
        manifest_toml: Option<&str>,
        signature: Option<&str>,
    ) -> Result<String, OciError> {
        check_tag(tag)?;
        let layer_digest = sha256_digest(wasm);
        let (imports, exports) = interface;
        // The layout's config (`application/vnd.wasm.config.v0+json`), every
        // member it requires: `created` is the Unix epoch, as reproducible
        // image builders write it, so that pushing the same component again
        // gives the same manifest digest; `component` is required with
        // `os = "wasip2"` (`target` names no WIT package: pde's worlds are
        // checked when the plugin is admitted, not from this config).
        let config = serde_json::json!({
            "created": WASM_CONFIG_CREATED,
            "architecture": "wasm",
            "os": "wasip2",
            "layerDigests": [layer_digest],
            "component": {"exports": exports, "imports": imports, "target": null},
        });
        let config = Config::new(
            serde_json::to_vec(&config).unwrap_or_default(),
            WASM_CONFIG_MEDIA_TYPE.to_string(),
            None,
        );
        let layers = [ImageLayer::new(
            wasm.to_vec(),
            WASM_LAYER_MEDIA_TYPE.to_string(),
            None,
        )];
        let mut annotations = BTreeMap::new();
        if let Some(m) = manifest_toml {
            annotations.insert(ANNOTATION_PLUGIN_MANIFEST.to_string(), m.to_string());
        }
        if let Some(s) = signature {
            annotations.insert(ANNOTATION_PLUGIN_SIGNATURE.to_string(), s.to_string());
        }
        let mut manifest = OciImageManifest::build(
            &layers,
            &config,
            (!annotations.is_empty()).then_some(annotations),
        );
        // The layout (and oci-wasm, wkg's client, which refuses a manifest
        // without it) wants the manifest to name its own media type.
        manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());
        self.push_artifact(tag, &layers, config, manifest).await
    }

    /// Fetches the Wasm component with manifest `digest` (at most `max_bytes`).
    pub async fn fetch_plugin(
        &self,
        digest: &str,
        max_bytes: usize,
    ) -> Result<FetchedPlugin, OciError> {
        let manifest = self.manifest(digest).await?;
        if manifest.config.media_type != WASM_CONFIG_MEDIA_TYPE {
            return Err(self.unexpected(
                digest,
                &format!(
                    "not a Wasm component artifact (config {} instead of {WASM_CONFIG_MEDIA_TYPE})",
                    manifest.config.media_type
                ),
            ));
        }
        let wasm_layers: Vec<&OciDescriptor> = manifest
            .layers
            .iter()
            .filter(|l| l.media_type == WASM_LAYER_MEDIA_TYPE)
            .collect();
        let [layer] = wasm_layers.as_slice() else {
            return Err(self.unexpected(
                digest,
                &format!("a Wasm component artifact has exactly one {WASM_LAYER_MEDIA_TYPE} layer"),
            ));
        };
        let wasm = self.blob(digest, layer, max_bytes).await?;
        let annotation = |k: &str| {
            let value = manifest.annotations.as_ref()?.get(k)?;
            Some(match value.strip_prefix(BASE64_ANNOTATION_PREFIX) {
                // Tools on oci-client (wkg among them) write a manifest in
                // OLPC canonical JSON, which leaves a newline in a string
                // raw, so registries refuse a multi-line annotation from
                // them: they can carry the manifest and signature encoded.
                Some(encoded) => {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(encoded.trim())
                        .ok()?;
                    String::from_utf8(bytes).ok()?
                }
                None => value.clone(),
            })
        };
        Ok(FetchedPlugin {
            manifest_digest: digest.to_string(),
            wasm,
            manifest_toml: annotation(ANNOTATION_PLUGIN_MANIFEST),
            signature: annotation(ANNOTATION_PLUGIN_SIGNATURE),
        })
    }
}

/// An error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                oci_client::errors::OciErrorCode::ManifestUnknown
                    | oci_client::errors::OciErrorCode::NameUnknown
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_tags() {
        let r: Repository = "127.0.0.1:5000/pde/policies".parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "pde/policies");
        assert_eq!(
            "oci://reg.example.gov/a"
                .parse::<Repository>()
                .unwrap()
                .to_string(),
            "reg.example.gov/a"
        );
        for bad in [
            "noslash",
            "https://x/y",
            "host/Upper",
            "host/",
            "host/a:tag",
        ] {
            assert!(bad.parse::<Repository>().is_err(), "{bad}");
        }
        assert_eq!(policy_tag("42", "production").unwrap(), "42.production");
        assert!(policy_tag(&"x".repeat(120), "production").is_err());
    }

    #[test]
    fn credentials_never_in_debug() {
        let c = Credentials::parse("V", &Secret::from("ci:hunter2".to_string())).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(Credentials::parse("V", &Secret::from("nocolon".to_string())).is_err());
    }
}
