//! A closed output pipe (`pde plugin inspect x | head -1`) ends pde quietly.
//!
//! Rust ignores SIGPIPE, so `println!` panics with "failed printing to
//! stdout: Broken pipe" when the reader has gone, and the process would
//! exit 101 with a panic message. Restoring SIGPIPE's default would instead
//! let a child process (git, an `--on-activate` hook) kill pde mid-deploy by
//! closing its stdin, so pde keeps ignoring the signal and turns only this
//! one panic into the exit a shell expects from a command whose reader left.

use std::panic;

/// What a shell reports for a process ended by SIGPIPE (128 + 13), which is
/// what `cat`, `git` and friends end with in the same pipeline.
pub const CLOSED_PIPE_EXIT: i32 = 141;

/// Installs a panic hook that exits with [`CLOSED_PIPE_EXIT`], printing
/// nothing, when a panic is a failed write to a closed stdout or stderr;
/// every other panic goes to the default hook unchanged.
pub fn exit_quietly_on_closed_pipe() {
    let default = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_closed_pipe(message) {
            std::process::exit(CLOSED_PIPE_EXIT);
        }
        default(info);
    }));
}

fn is_closed_pipe(message: &str) -> bool {
    (message.starts_with("failed printing to stdout")
        || message.starts_with("failed printing to stderr"))
        && message.contains("Broken pipe")
}

#[cfg(test)]
mod tests {
    use super::is_closed_pipe;

    #[test]
    fn only_a_failed_print_to_a_closed_pipe_counts() {
        assert!(is_closed_pipe(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(!is_closed_pipe(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!is_closed_pipe("index out of bounds: Broken pipe"));
    }
}
