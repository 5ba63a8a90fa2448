//! Logging through the host's `log` import.
//!
//! Inside the sandbox a plugin's only sanctioned channel to the operator is
//! the host's `log` function (stdout/stderr are captured but bounded). In
//! native builds (unit tests) there is no host, so lines are kept in a
//! thread-local buffer that tests can drain with [`take_native_logs`].

/// Log levels, most to least severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something looks wrong.
    Warn,
    /// Normal progress.
    Info,
    /// Details for debugging.
    Debug,
    /// Very fine-grained details.
    Trace,
}

/// Writes `message` to the host's log at `level`, attributed to this plugin.
#[cfg(target_arch = "wasm32")]
pub fn log(level: Level, message: &str) {
    use crate::bindings::validator::pde::plugin::host;
    let level = match level {
        Level::Error => host::Level::Error,
        Level::Warn => host::Level::Warn,
        Level::Info => host::Level::Info,
        Level::Debug => host::Level::Debug,
        Level::Trace => host::Level::Trace,
    };
    host::log(level, message);
}

/// Writes `message` to the host's log at `level`, attributed to this plugin.
///
/// Native build: there is no host, so the line is kept for
/// [`take_native_logs`].
#[cfg(not(target_arch = "wasm32"))]
pub fn log(level: Level, message: &str) {
    NATIVE_LOG.with(|l| l.borrow_mut().push((level, message.to_string())));
}

#[cfg(not(target_arch = "wasm32"))]
thread_local! {
    static NATIVE_LOG: std::cell::RefCell<Vec<(Level, String)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Native builds only: drains the lines this thread logged, oldest first.
#[cfg(not(target_arch = "wasm32"))]
pub fn take_native_logs() -> Vec<(Level, String)> {
    NATIVE_LOG.with(|l| std::mem::take(&mut *l.borrow_mut()))
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn native_log_is_captured_per_thread() {
        log(Level::Warn, "first");
        log(Level::Debug, "second");
        let got = take_native_logs();
        assert_eq!(
            got,
            vec![
                (Level::Warn, "first".to_string()),
                (Level::Debug, "second".to_string())
            ]
        );
        assert!(take_native_logs().is_empty());
    }
}
