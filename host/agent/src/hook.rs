//! The `--on-activate` hook: lets the service beside the agent reload after an
//! activation.
//!
//! The command runs through `sh -c` with the bundle path appended as its last
//! argument, so `--on-activate "systemctl reload hms-api"` and
//! `--on-activate ./reload.sh` both work. It runs after the activation is
//! durable and never undoes it: a failing hook is reported (in `/active` as
//! `hook_failed`) and logged, because the bundle is valid and active either
//! way, and an operator can re-run the reload. A hook that hangs is killed
//! after [`HOOK_TIMEOUT`], so it cannot block the deploys queued behind it.

use std::path::Path;
use std::time::Duration;

use tracing::info;

use super::store::ActiveRecord;

/// Longest time a hook may run before it is killed and counted as failed.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of the hook's output kept for the log.
const OUTPUT_LOG_BYTES: usize = 2048;

/// Runs `cmd` with `bundle` as its argument. `Err` says why it failed.
pub async fn run(cmd: &str, bundle: &Path, record: &ActiveRecord) -> Result<(), String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} \"$1\""))
        .arg("pde-agent-hook")
        .arg(bundle)
        .env("PDE_DIGEST", &record.digest)
        .env("PDE_POLICY_ID", &record.policy_id)
        .env("PDE_VERSION", &record.version)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(HOOK_TIMEOUT, child).await {
        Err(_) => {
            return Err(format!(
                "timed out after {}s and was killed",
                HOOK_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) => return Err(format!("could not be started: {e}")),
        Ok(Ok(output)) => output,
    };
    let tail = |bytes: &[u8]| {
        let start = bytes.len().saturating_sub(OUTPUT_LOG_BYTES);
        String::from_utf8_lossy(&bytes[start..]).trim().to_string()
    };
    info!(
        digest = %record.digest,
        status = %output.status,
        stdout = %tail(&output.stdout),
        stderr = %tail(&output.stderr),
        "activation hook finished"
    );
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("exited with {}", output.status))
    }
}
