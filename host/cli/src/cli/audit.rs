//! `pde audit verify | show [--policy ID] | export`.

use pde::ExitCode;

use super::deploy::open_read_only;
use super::{CmdResult, Ctx};

/// Audit log commands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain of the whole log; exit 6 naming the first bad record.
    Verify,
    /// Show records, oldest first.
    Show {
        /// Only records of this policy.
        #[arg(long)]
        policy: Option<String>,
    },
    /// Write every record as JSON lines on stdout, exactly as stored.
    Export,
}

pub fn run(ctx: &Ctx, cmd: AuditCmd) -> CmdResult {
    let engine = open_read_only(ctx)?;
    match cmd {
        AuditCmd::Verify => {
            let report = engine
                .verify_audit()
                .map_err(|e| super::Failure::engine(ctx, e))?;
            if ctx.json {
                ctx.print_json(&report);
            } else {
                println!(
                    "audit log intact: {} record(s), head {}\n  release tags matched: {}\n  head signature: {}",
                    report.records, report.last_hash, report.anchors_checked, report.head_signature
                );
            }
        }
        AuditCmd::Show { policy } => {
            let records: Vec<_> = engine
                .audit()
                .records()?
                .into_iter()
                .filter(|r| policy.as_ref().is_none_or(|p| &r.policy_id == p))
                .collect();
            if ctx.json {
                ctx.print_json(&records);
            } else {
                for r in records {
                    println!(
                        "{:>5} {} {:<10} {:<18} {:<8} {:<12} {}",
                        r.seq,
                        r.ts,
                        r.actor,
                        super::print::label(&r.event),
                        r.policy_id,
                        r.env,
                        r.data
                    );
                }
            }
        }
        AuditCmd::Export => {
            // Verified first, then copied byte for byte: an export is evidence.
            // The shared chain's lines are the file log's, so both export alike.
            engine
                .verify_audit()
                .map_err(|e| super::Failure::engine(ctx, e))?;
            let bytes = engine
                .audit()
                .export()
                .map_err(|e| super::Failure::engine(ctx, e.into()))?;
            std::io::Write::write_all(&mut std::io::stdout(), &bytes)
                .map_err(super::Failure::usage)?;
        }
    }
    Ok(ExitCode::Ok)
}
