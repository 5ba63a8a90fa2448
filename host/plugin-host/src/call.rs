//! Calling: one fresh sandbox per call, then the result bounded and checked
//! against the world's contract, below every WIT version shim.

use crate::diagnostic::{Diagnostic, Severity};
use crate::sandbox::{self, Sandbox};
use crate::wit::{self, WorldCall};
use crate::{
    CallContext, CallReport, GateInput, Judgement, Plugin, PluginError, PluginHost, PolicyInput,
    Route, ServiceInfo,
};

/// At most this many diagnostics (or routes) per call.
pub const MAX_RESULT_ITEMS: usize = 1000;
/// At most this many bytes of strings in one call's result.
pub const MAX_RESULT_BYTES: usize = 1024 * 1024;
/// At most this many named statistics in a gate's judgement.
pub const MAX_GATE_STATISTICS: usize = 32;

impl PluginHost {
    /// Fails the call when `plugin` tried a denied capability and attempts
    /// are refused for it; checked before its result is looked at.
    fn check_attempts(&self, plugin: &Plugin, denied: &[String]) -> Result<(), PluginError> {
        if denied.is_empty() || !(self.deny_attempts || plugin.deny_attempts) {
            return Ok(());
        }
        Err(PluginError::DeniedAttempt {
            plugin: plugin.name.clone(),
            attempts: denied.join("; "),
        })
    }

    /// Calls `plugin` as world `C` in a fresh sandbox within its limits,
    /// waiting for a pool slot first; what every world's call shares: the
    /// wrong world, a denied attempt and the plugin's own `err` become
    /// named errors. The world's own checks of the list are the caller's.
    fn call_world<C: WorldCall>(
        &self,
        plugin: &Plugin,
        policy: &PolicyInput,
        ctx: &CallContext,
        args: &C::Args,
    ) -> Result<(C::Output, sandbox::CallStats), PluginError> {
        let input = Self::input(plugin, policy, ctx);
        let sandbox = Sandbox {
            engine: &self.engine,
            plugin: &plugin.name,
            limits: &plugin.limits,
            options: self.run_options,
        };
        let slot = self.gate.enter();
        let (out, stats) = plugin
            .prepared
            .call::<C>(&sandbox, &input, args)
            .ok_or_else(|| PluginError::WrongWorld {
                plugin: plugin.name.clone(),
                expected: C::KIND,
                found: format!("it is a {}", plugin.kind),
                hint: format!("call it as a {}", plugin.kind),
            })??;
        // The store, and with it the pool slot, is gone once the call returns.
        drop(slot);
        self.check_attempts(plugin, &stats.denied)?;
        let raw = out.map_err(|message| PluginError::PluginFailed {
            plugin: plugin.name.clone(),
            message,
        })?;
        Ok((raw, stats))
    }

    fn input(plugin: &Plugin, policy: &PolicyInput, ctx: &CallContext) -> wit::CallInput {
        // Enforced here, below every WIT shim: a plugin that declared it
        // ignores the environment is given none (nor anything else that
        // comes with one), so reusing its environment-neutral result for an
        // environment is exact, not a promise.
        let neutral = CallContext::default();
        let ctx = if plugin.uses_environment {
            ctx
        } else {
            &neutral
        };
        wit::CallInput {
            id: policy.id.clone(),
            version: policy.version.clone(),
            document: policy.document.to_string(),
            environment: ctx.environment.clone(),
            settings: if plugin.settings.is_null() {
                "{}".to_string()
            } else {
                plugin.settings.to_string()
            },
            // Serialised only for a plugin whose contract carries it.
            active: ctx
                .active
                .as_ref()
                .filter(|_| wit::carries_active_policy(&plugin.wit_version))
                .map(|a| wit::ActiveInput {
                    version: a.version.clone(),
                    digest: a.digest.clone(),
                    deployed_at: a.deployed_at.clone(),
                    document: a.document.to_string(),
                }),
        }
    }

    /// Runs a validator over `policy`. Diagnostics carry `source = plugin name`.
    pub fn validate(
        &self,
        plugin: &Plugin,
        policy: &PolicyInput,
        ctx: &CallContext,
    ) -> Result<CallReport<Vec<Diagnostic>>, PluginError> {
        let (raw, stats) = self.call_world::<wit::Validate>(plugin, policy, ctx, &())?;
        let bytes: usize = raw
            .iter()
            .map(|d| d.path.len() + d.code.len() + d.message.len())
            .sum();
        check_bounds(&plugin.name, "diagnostics", raw.len(), bytes)?;
        let value = raw
            .into_iter()
            .map(|d| {
                let severity = match d.severity {
                    wit::RawSeverity::Error => Severity::Error,
                    wit::RawSeverity::Warning => Severity::Warning,
                    wit::RawSeverity::Info => Severity::Info,
                };
                Diagnostic::new(severity, &plugin.name, &d.code, &d.path, d.message)
            })
            .collect();
        Ok(report(value, stats))
    }

    /// Runs a router; every route must name one of `services`.
    pub fn route(
        &self,
        plugin: &Plugin,
        policy: &PolicyInput,
        ctx: &CallContext,
        services: &[ServiceInfo],
    ) -> Result<CallReport<Vec<Route>>, PluginError> {
        let raw_services: Vec<wit::RawService> = services
            .iter()
            .map(|s| wit::RawService {
                name: s.name.clone(),
                tags: s.tags.clone(),
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
            .collect();
        let (raw, stats) = self.call_world::<wit::Route>(plugin, policy, ctx, &raw_services)?;
        let bytes: usize = raw.iter().map(|r| r.service.len() + r.reason.len()).sum();
        check_bounds(&plugin.name, "routes", raw.len(), bytes)?;
        for r in &raw {
            if !services.iter().any(|s| s.name == r.service) {
                return Err(PluginError::UnknownService {
                    plugin: plugin.name.clone(),
                    service: r.service.clone(),
                    known: services
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let value = raw
            .into_iter()
            .map(|r| Route {
                service: r.service,
                reason: r.reason,
            })
            .collect();
        Ok(report(value, stats))
    }
}

impl PluginHost {
    /// Runs a gate plugin (`pde:plugin@0.3.0`, world `gate`) on one wave:
    /// its judgement, with at most [`MAX_GATE_STATISTICS`] statistics, each
    /// named, and its strings within [`MAX_RESULT_BYTES`].
    pub fn gate(
        &self,
        plugin: &Plugin,
        policy: &PolicyInput,
        ctx: &CallContext,
        input: &GateInput,
    ) -> Result<CallReport<Judgement>, PluginError> {
        let (judgement, stats) = self.call_world::<wit::Gate>(plugin, policy, ctx, input)?;
        let bytes = judgement.reason.len()
            + judgement
                .statistics
                .iter()
                .map(|(n, _)| n.len())
                .sum::<usize>();
        if judgement.statistics.len() > MAX_GATE_STATISTICS {
            return Err(PluginError::ResultTooLarge {
                plugin: plugin.name.clone(),
                what: format!(
                    "{} statistics, at most {MAX_GATE_STATISTICS} are accepted",
                    judgement.statistics.len()
                ),
            });
        }
        check_bounds(&plugin.name, "judgement", 1, bytes)?;
        if let Some((name, _)) = judgement
            .statistics
            .iter()
            .find(|(n, _)| n.trim().is_empty())
        {
            return Err(PluginError::PluginFailed {
                plugin: plugin.name.clone(),
                message: format!("it returned a statistic with no name ({name:?})"),
            });
        }
        Ok(report(judgement, stats))
    }
}

fn check_bounds(plugin: &str, what: &str, count: usize, bytes: usize) -> Result<(), PluginError> {
    if count > MAX_RESULT_ITEMS {
        return Err(PluginError::ResultTooLarge {
            plugin: plugin.to_string(),
            what: format!("{count} {what}, at most {MAX_RESULT_ITEMS} are accepted"),
        });
    }
    if bytes > MAX_RESULT_BYTES {
        return Err(PluginError::ResultTooLarge {
            plugin: plugin.to_string(),
            what: format!("{bytes} bytes of {what}, at most {MAX_RESULT_BYTES} are accepted"),
        });
    }
    Ok(())
}

fn report<T>(value: T, stats: sandbox::CallStats) -> CallReport<T> {
    CallReport {
        value,
        fuel_used: stats.fuel_used,
        peak_memory_bytes: stats.peak_memory_bytes,
        elapsed: stats.elapsed,
        log: stats.log,
        denied: stats.denied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_plugins_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<PluginHost>();
        shareable::<Plugin>();
    }

    #[test]
    fn results_are_bounded_by_count_and_bytes() {
        assert!(check_bounds("p", "diagnostics", MAX_RESULT_ITEMS, 10).is_ok());
        assert!(matches!(
            check_bounds("p", "diagnostics", MAX_RESULT_ITEMS + 1, 10),
            Err(PluginError::ResultTooLarge { .. })
        ));
        assert!(matches!(
            check_bounds("p", "routes", 1, MAX_RESULT_BYTES + 1),
            Err(PluginError::ResultTooLarge { .. })
        ));
    }
}
