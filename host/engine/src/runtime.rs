//! Running blocking work that drives a runtime of its own (the plugin
//! sandbox, the PostgreSQL client) from code that may itself be on a tokio
//! runtime.

/// Runs `work`, which calls plugins or the PostgreSQL client, outside any
/// async context.
///
/// The sandbox drives each call on a tokio runtime of its own (its timer
/// bounds the call's wall time, WASI waits included), and tokio refuses to
/// block on a runtime from inside another one. So when the engine runs on the
/// caller's runtime (or the blocking facade's), plugin work moves to a scoped
/// thread for its duration: a thread start per step, not per plugin call.
pub(crate) fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return work();
    }
    std::thread::scope(|s| match s.spawn(work).join() {
        Ok(out) => out,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// A value whose drop shuts down a runtime of its own (a PostgreSQL
/// client), which tokio forbids inside another runtime: it is always
/// dropped through [`off_runtime`].
pub(crate) struct DropOffRuntime<T: Send>(Option<T>);

impl<T: Send> DropOffRuntime<T> {
    /// Wraps `value`.
    pub(crate) fn new(value: T) -> Self {
        DropOffRuntime(Some(value))
    }

    /// The value.
    pub(crate) fn get(&mut self) -> &mut T {
        // Only `drop` empties it.
        self.0
            .as_mut()
            .unwrap_or_else(|| unreachable!("used after drop"))
    }
}

impl<T: Send> Drop for DropOffRuntime<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            off_runtime(move || drop(value));
        }
    }
}
