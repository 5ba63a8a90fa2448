//! OCI delivery on the command line (issue 23): the tags `pde status`
//! shows for environments delivered through a registry.

use std::collections::BTreeSet;
use std::path::PathBuf;

use pde::ExitCode;

use super::{CmdResult, Ctx, Failure};

/// Prints what each policy's tag points at in the OCI environments (all, or
/// `env`), for the policies of `entries`. With `--output json`, the list.
pub fn print_tags(
    ctx: &Ctx,
    engine: &pde::blocking::Engine,
    env: Option<&str>,
    entries: &[pde::state::ActiveEntry],
) -> CmdResult {
    let policies: Vec<String> = entries
        .iter()
        .map(|e| e.policy_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let tags = engine
        .registry_tags(env, &policies)
        .map_err(|e| Failure::engine(ctx, e))?;
    if ctx.json {
        ctx.print_json(&serde_json::json!({"tags": tags}));
        return Ok(ExitCode::Ok);
    }
    for t in &tags {
        let at = match (&t.manifest_digest, &t.error) {
            (_, Some(e)) => format!("UNKNOWN ({e})"),
            (Some(d), None) => d.clone(),
            (None, None) => "no such tag".into(),
        };
        println!("registry {} tag {}: {at}", t.repository, t.tag);
    }
    Ok(ExitCode::Ok)
}

/// How to reach the registry of `pde plugin push` / `pull`.
#[derive(Debug, clap::Args)]
pub struct RegistryFlags {
    /// Plain HTTP instead of TLS (loopback and test registries only).
    #[arg(long)]
    pub plain_http: bool,
    /// Registry credentials, `USER:PASSWORD`, read from this variable.
    #[arg(long, value_name = "NAME")]
    pub credentials_env: Option<String>,
}

impl RegistryFlags {
    fn options(&self) -> Result<pde_core::oci::RegistryOptions, Failure> {
        let credentials = match &self.credentials_env {
            None => None,
            Some(var) => Some(pde_core::oci::Credentials::from_env(var).map_err(Failure::usage)?),
        };
        Ok(pde_core::oci::RegistryOptions {
            plain_http: self.plain_http,
            credentials,
            ..Default::default()
        })
    }
}

/// `pde plugin push FILE.wasm oci://HOST[:PORT]/REPO[:TAG]`.
#[derive(Debug, clap::Args)]
pub struct PluginPushArgs {
    /// The component (its manifest `<FILE>.toml` and signature `<FILE>.wasm.sig` go with it).
    pub file: PathBuf,
    /// Where: `oci://HOST[:PORT]/REPOSITORY[:TAG]` (default tag: the manifest's version).
    pub reference: String,
    /// The plugin's manifest (default: FILE with `.toml`).
    #[arg(long, value_name = "M")]
    pub manifest: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

/// `pde plugin pull oci://HOST[:PORT]/REPO@sha256:HEX --out DIR`.
#[derive(Debug, clap::Args)]
pub struct PluginPullArgs {
    /// What: `oci://HOST[:PORT]/REPOSITORY@sha256:<hex>` (pinned by digest).
    pub reference: String,
    /// The plugin directory to write `<name>.wasm`, `.toml` and `.wasm.sig` into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub registry: RegistryFlags,
}

fn registry_failure(e: pde::plugin_registry::PluginRegistryError) -> Failure {
    use pde_core::HasExitCode as _;
    let code = e.exit_code();
    let mut f = Failure::usage_error(anyhow::Error::new(e));
    f.code = code;
    f
}

/// `pde plugin push`.
pub fn plugin_push(ctx: &Ctx, args: PluginPushArgs) -> CmdResult {
    let reference: pde::plugin_registry::PluginRef =
        args.reference.parse().map_err(registry_failure)?;
    let pushed = pde::plugin_registry::push(
        &reference,
        &ctx.dir.join(&args.file),
        args.manifest.map(|m| ctx.dir.join(m)).as_deref(),
        args.registry.options()?,
    )
    .map_err(registry_failure)?;
    if ctx.json {
        ctx.print_json(&pushed);
    } else {
        println!(
            "pushed {} (tag {}, {}); pull it with:\n  pde plugin pull {} --out plugins/",
            args.file.display(),
            pushed.tag,
            if pushed.signed { "signed" } else { "UNSIGNED" },
            pushed.reference
        );
    }
    Ok(ExitCode::Ok)
}

/// The trusted plugin keys and the plugin host of the workspace.
type Trust = (pde::keys::TrustedKeys, pde::plugin::PluginHost);

/// `pde plugin pull`.
pub fn plugin_pull(
    ctx: &Ctx,
    args: PluginPullArgs,
    trust: impl FnOnce(&Ctx, bool) -> Result<Trust, Failure>,
) -> CmdResult {
    let reference: pde::plugin_registry::PluginRef =
        args.reference.parse().map_err(registry_failure)?;
    let (trusted, host) = trust(ctx, true)?;
    if trusted.is_empty() {
        return Err(Failure::usage(
            "no trusted plugin keys: a pulled plugin is verified against [trust] plugin_keys in pde.toml",
        ));
    }
    let pulled = pde::plugin_registry::pull(
        &host,
        &reference,
        &ctx.dir.join(&args.out),
        &trusted,
        args.registry.options()?,
    )
    .map_err(registry_failure)?;
    if ctx.json {
        ctx.print_json(&pulled);
    } else {
        println!(
            "pulled {} ({}, sha256 {}), signed by {}: {}",
            pulled.name,
            pulled.digest,
            pulled.sha256,
            pulled.signer,
            pulled
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ExitCode::Ok)
}
