//! `policy_deploy._native`: the pde engine for Python, built with PyO3.
//!
//! A thin layer: each function opens the workspace with the blocking engine,
//! runs one operation with the GIL released (so threads deploy in parallel),
//! and hands back the same JSON document `--output json` prints. Failures
//! raise `NativeError(exit_code, message, detail_json)`; the Python package
//! turns that into the exception class of the exit code and the JSON into
//! dataclasses and dicts. The wrapping lives in Python, where Python users
//! read it; this file only crosses the boundary.

use std::path::Path;

use pde::blocking::Engine;
use pde::pipeline::DeployOptions;
use pde::push::{Observer, PushEvent};
use pde_core::HasExitCode;
use pyo3::create_exception;
use pyo3::prelude::*;

create_exception!(
    _native,
    NativeError,
    pyo3::exceptions::PyException,
    "A pde failure: (exit_code, message, detail as JSON)."
);

/// A policy id given as an int (`42`) or a str (`"42"`).
fn policy_id_of(obj: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(n) = obj.extract::<i64>() {
        return Ok(n.to_string());
    }
    obj.extract::<String>()
}

/// The message and the causes it does not already say, as the CLI prints.
fn explain(e: &(dyn std::error::Error + 'static)) -> (String, Vec<String>) {
    let message = e.to_string();
    let mut said = message.clone();
    let mut causes = Vec::new();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !said.contains(&text) {
            said.push_str(&text);
            causes.push(text);
        }
        source = cause.source();
    }
    (message, causes)
}

fn fail(e: pde::Error) -> PyErr {
    let code = e.exit_code();
    let (message, causes) = explain(&e);
    let detail = serde_json::json!({
        "error": message,
        "causes": causes,
        "exit_code": code.code(),
        "kind": code,
        "report": e.report(),
    });
    NativeError::new_err((code.code(), message, detail.to_string()))
}

fn to_json<T: serde::Serialize>(value: &T) -> PyResult<String> {
    serde_json::to_string(value).map_err(|e| NativeError::new_err((2u8, e.to_string(), "{}")))
}

/// Forwards push progress to a Python callable `(service, event, detail_json)`.
struct Progress(Py<PyAny>);

impl Observer for Progress {
    fn on_event(&self, service: &str, event: &PushEvent) {
        let detail = serde_json::to_value(event).unwrap_or_default();
        let name = match event {
            PushEvent::Retrying { .. } => "retried".to_string(),
            _ => detail["event"].as_str().unwrap_or("unknown").to_string(),
        };
        Python::attach(|py| {
            if let Err(e) = self.0.call1(py, (service, name, detail.to_string())) {
                // A broken callback must not break a deploy; Python reports it.
                e.write_unraisable(py, None);
            }
        });
    }
}

/// Forwards a rollout's wave and gate events to the same callable, as
/// `(wave, event, detail_json)`: `wave-started`, `wave-pushed`, `baking`,
/// `gate`, `paused`, `promoted`, `wave-passed`, `halted`, `rolled-back`.
impl pde::steps::waves::RolloutObserver for Progress {
    fn on_rollout(&self, event: &str, detail: &serde_json::Value) {
        let wave = detail["wave"].as_str().unwrap_or("").to_string();
        Python::attach(|py| {
            if let Err(e) = self.0.call1(py, (wave, event, detail.to_string())) {
                e.write_unraisable(py, None);
            }
        });
    }
}

/// Deploys `policy_id` to `target_env`; the deploy report as JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, target_env, workspace = String::from("."), dry_run = false, progress = None))]
fn deploy_policy(
    py: Python<'_>,
    policy_id: &Bound<'_, PyAny>,
    target_env: String,
    workspace: String,
    dry_run: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let observer = progress.map(Progress);
    let report = py.detach(|| {
        let engine = Engine::open(Path::new(&workspace))?;
        let opts = DeployOptions {
            dry_run,
            observer: match &observer {
                Some(o) => o,
                None => &(),
            },
            rollout_observer: match &observer {
                Some(o) => o,
                None => &(),
            },
            ..DeployOptions::default()
        };
        engine.deploy(&policy_id, &target_env, &opts)
    });
    to_json(&report.map_err(fail)?)
}

/// Validates `policy_id` (against `env` when given); the report as JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, env = None, workspace = String::from(".")))]
fn validate(
    py: Python<'_>,
    policy_id: &Bound<'_, PyAny>,
    env: Option<String>,
    workspace: String,
) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let report = py.detach(|| {
        Engine::open_read_only(Path::new(&workspace))?.validate_policy(&policy_id, env.as_deref())
    });
    to_json(&report.map_err(fail)?)
}

/// What a deploy would do; the plan as JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, env, workspace = String::from(".")))]
fn plan(
    py: Python<'_>,
    policy_id: &Bound<'_, PyAny>,
    env: String,
    workspace: String,
) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let report =
        py.detach(|| Engine::open_read_only(Path::new(&workspace))?.plan(&policy_id, &env));
    to_json(&report.map_err(fail)?)
}

/// What is active where (one environment, or all); JSON.
#[pyfunction]
#[pyo3(signature = (env = None, workspace = String::from(".")))]
fn status(py: Python<'_>, env: Option<String>, workspace: String) -> PyResult<String> {
    let entries = py.detach(|| {
        let engine = Engine::open_read_only(Path::new(&workspace))?;
        if let Some(env) = &env {
            engine.environment(env)?;
        }
        Ok::<_, pde::Error>(engine.state().status(env.as_deref())?)
    });
    to_json(&entries.map_err(fail)?)
}

/// Every deploy of `policy_id`, newest first; JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, workspace = String::from(".")))]
fn history(py: Python<'_>, policy_id: &Bound<'_, PyAny>, workspace: String) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let records = py.detach(|| {
        let engine = Engine::open_read_only(Path::new(&workspace))?;
        Ok::<_, pde::Error>(engine.state().history_checked(&policy_id)?)
    });
    to_json(&records.map_err(fail)?)
}

/// Returns `env` to an earlier version of `policy_id`; the report as JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, env, to = None, workspace = String::from(".")))]
fn rollback(
    py: Python<'_>,
    policy_id: &Bound<'_, PyAny>,
    env: String,
    to: Option<String>,
    workspace: String,
) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let report = py
        .detach(|| Engine::open(Path::new(&workspace))?.rollback(&policy_id, &env, to.as_deref()));
    to_json(&report.map_err(fail)?)
}

/// The latest rollout of `policy_id` in `env`: waves, gate results, bake
/// left; JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, env, workspace = String::from(".")))]
fn rollout_status(
    py: Python<'_>,
    policy_id: &Bound<'_, PyAny>,
    env: String,
    workspace: String,
) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let status = py
        .detach(|| Engine::open_read_only(Path::new(&workspace))?.rollout_status(&policy_id, &env));
    to_json(&status.map_err(fail)?)
}

/// Lets a paused rollout go on; its status as JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, env, workspace = String::from(".")))]
fn rollout_promote(
    py: Python<'_>,
    policy_id: &Bound<'_, PyAny>,
    env: String,
    workspace: String,
) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let status =
        py.detach(|| Engine::open(Path::new(&workspace))?.rollout_promote(&policy_id, &env));
    to_json(&status.map_err(fail)?)
}

/// Stops a rollout and sends back every service it pushed; its status as JSON.
#[pyfunction]
#[pyo3(signature = (policy_id, env, workspace = String::from(".")))]
fn rollout_abort(
    py: Python<'_>,
    policy_id: &Bound<'_, PyAny>,
    env: String,
    workspace: String,
) -> PyResult<String> {
    let policy_id = policy_id_of(policy_id)?;
    let status = py.detach(|| Engine::open(Path::new(&workspace))?.rollout_abort(&policy_id, &env));
    to_json(&status.map_err(fail)?)
}

/// Verifies the audit log (chain, head, release tags); the report as JSON.
#[pyfunction]
#[pyo3(signature = (workspace = String::from(".")))]
fn audit_verify(py: Python<'_>, workspace: String) -> PyResult<String> {
    let report = py.detach(|| Engine::open_read_only(Path::new(&workspace))?.verify_audit());
    to_json(&report.map_err(fail)?)
}

/// The native module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(deploy_policy, m)?)?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(status, m)?)?;
    m.add_function(wrap_pyfunction!(history, m)?)?;
    m.add_function(wrap_pyfunction!(rollback, m)?)?;
    m.add_function(wrap_pyfunction!(audit_verify, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_status, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_promote, m)?)?;
    m.add_function(wrap_pyfunction!(rollout_abort, m)?)?;
    Ok(())
}
