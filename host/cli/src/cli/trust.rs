//! `pde trust sign FILE --key KEY --signer NAME`: the security team signs the
//! workspace's trust file (`pde-trust.toml`), which then may live in the
//! repository; the machine floor's `[trust_file] keys` verify it.

use std::path::PathBuf;

use pde::ExitCode;

use super::{CmdResult, Ctx};

/// The trust file commands.
#[derive(Debug, clap::Subcommand)]
pub enum TrustCmd {
    /// Sign a trust file (its gates and inline keys) with the security team's key.
    Sign(SignArgs),
}

/// `pde trust sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The trust file (default: pde-trust.toml in the workspace).
    pub file: Option<PathBuf>,
    /// The security team's private key (from `pde keygen`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Who signs (a person or team), recorded in the signature.
    #[arg(long, value_name = "NAME")]
    pub signer: String,
}

/// Runs a `pde trust` command.
pub fn run(ctx: &Ctx, cmd: TrustCmd) -> CmdResult {
    let TrustCmd::Sign(args) = cmd;
    let file = ctx
        .dir
        .join(args.file.unwrap_or_else(|| pde::floor::TRUST_FILE.into()));
    let key = pde::keys::load_signing_key(&args.key)?;
    let (path, sig) = pde::floor::sign_trust_file(&file, &key, &args.signer)?;
    if ctx.json {
        ctx.print_json(&serde_json::json!({"path": path, "signature": sig}));
    } else {
        println!(
            "signed    {} (sha256 {}) as {:?} with key {}",
            file.display(),
            sig.sha256,
            sig.signer,
            sig.keyid
        );
        println!("wrote     {}", path.display());
    }
    Ok(ExitCode::Ok)
}
