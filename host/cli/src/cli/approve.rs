//! `pde approve ID --key FILE [--role ROLE] [--note TEXT]`.

use std::path::PathBuf;

use pde::ExitCode;
use pde::policy::approvals::Signoff;

use super::{CmdResult, Ctx, Failure};

/// `pde approve ID --key FILE [--role ROLE] [--note TEXT] [--by NAME]`.
#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    /// The policy id.
    pub id: String,
    /// The approver's private key (from `pde keygen`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The role you approve in (e.g. legal); credited only if pde.toml
    /// trusts your key for it.
    #[arg(long)]
    pub role: Option<String>,
    /// A note for the record.
    #[arg(long)]
    pub note: Option<String>,
    /// Your name as it should appear in the audit log (default: your user name).
    #[arg(long)]
    pub by: Option<String>,
}

pub fn approve(ctx: &Ctx, args: ApproveArgs) -> CmdResult {
    let engine = super::deploy::open_read_only(ctx)?;
    let signoff = Signoff {
        by: args.by.unwrap_or_else(pde::audit::default_actor),
        role: args.role,
        note: args.note,
    };
    let approved = engine
        .approve(&args.id, &args.key, signoff)
        .map_err(|e| Failure::engine(ctx, e))?;
    if ctx.json {
        ctx.print_json(&approved);
        return Ok(ExitCode::Ok);
    }
    println!(
        "approved  policy {} {} ({}) with key {}",
        args.id, approved.version, approved.policy_digest, approved.keyid
    );
    println!("wrote     {}", approved.path.display());
    if !approved.trusted {
        eprintln!(
            "warning: key {} is not in [trust] approver_keys of this workspace; the approval \
             counts only once it is listed there",
            approved.keyid
        );
    }
    println!(
        "next      commit it with the policy: git add {} && git commit",
        approved.path.display()
    );
    Ok(ExitCode::Ok)
}
