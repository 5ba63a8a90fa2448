//! One rollout on its way: wave after wave, pushed through the push step,
//! baked, judged by its gates, paused for a person where pde.toml says so,
//! and sent back as a whole when anything fails.
//!
//! Every change of state is saved to the state backend before the next
//! action, so `pde rollout status` on another machine sees the same
//! rollout, and `pde rollout resume` can pick it up after this process dies.

use std::time::Duration;

use serde_json::json;

use crate::audit::Event;
use crate::config::Rollout;
use crate::engine::Engine;
use crate::error::Error;
use crate::http::Target;
use crate::report::RolloutReport;
use crate::steps::audit::Recorder;
use crate::steps::push::{self, Observer, Outcome, PushReport, TargetReport, TargetState};
use crate::steps::waves::{self, GateResult, RolloutObserver, Vars, WaveStatus};

/// What a rollout works on.
pub(crate) struct Run<'a> {
    pub engine: &'a Engine,
    pub policy_id: &'a str,
    pub env_name: &'a str,
    pub rollout: &'a Rollout,
    pub bundle: &'a pde_core::bundle::Bundle,
    pub version: &'a str,
    /// The routed services, in pde.toml order.
    pub routed: Vec<Target>,
    pub audit: Recorder<'a>,
    pub observer: &'a dyn Observer,
    pub watch: &'a dyn RolloutObserver,
    /// Its id in the state.
    pub id: i64,
    pub report: RolloutReport,
    /// Every pushed target's result so far, for the deployment record.
    pub targets: Vec<TargetReport>,
    /// Audit records of waves with no bake and no pause that passed, held
    /// back to share the next append (see [`Run::record`]).
    pub held: Vec<(Event, serde_json::Value)>,
}

/// What each of `targets` holds of `policy_id` now, by service; a service
/// that does not answer is left out (its push fails too, and its record
/// then says what it held, if anything).
pub(crate) async fn previous_holdings(
    engine: &Engine,
    policy_id: &str,
    targets: &[Target],
) -> std::collections::BTreeMap<String, Option<String>> {
    let held = futures::future::join_all(
        targets
            .iter()
            .map(|t| push::get_active(&engine.http, t, policy_id, &engine.config.push)),
    )
    .await;
    targets
        .iter()
        .zip(held)
        .filter_map(|(t, held)| Some((t.service.clone(), held.ok()?.map(|a| a.digest))))
        .collect()
}

/// Why a rollout stopped before its end.
enum Stop {
    /// A gate failed, a push failed, or a person aborted: send everything back.
    Halt(serde_json::Value, String),
}

impl Run<'_> {
    /// Appends the records held back, then `records`, in one durable step.
    ///
    /// Why hold any back: a wave with no bake and no pause that passes is
    /// not saved on its own either (a process killed before the next write
    /// resumes by pushing and judging it again, and records it then), so
    /// its records can wait for the rollout's next append: one fsync per
    /// rollout instead of one per wave. Every other record flushes them
    /// first, in order, and a halt flushes them before anything is sent
    /// back, so the audit log never tells a story out of order.
    fn record(
        &mut self,
        records: impl IntoIterator<Item = (Event, serde_json::Value)>,
    ) -> Result<(), Error> {
        let mut all = std::mem::take(&mut self.held);
        all.extend(records);
        if !all.is_empty() {
            self.audit.record_each(all)?;
        }
        Ok(())
    }

    fn save(&mut self) -> Result<(), Error> {
        // A person's promote or abort adds to the stored log while this
        // process runs: keep their entries.
        if let Some(stored) = self.engine.state.rollout(self.id)?
            && let Some(log) = stored.doc["log"].as_array()
            && log.len() > self.report.log.len()
        {
            self.report.log = log.clone();
        }
        let doc = serde_json::to_value(&self.report).unwrap_or_default();
        Ok(self
            .engine
            .state
            .rollout_save(self.id, &self.report.status, &doc)?)
    }

    /// The routed targets among `services`, in pde.toml order.
    fn targets_of(&self, services: &[String]) -> Vec<Target> {
        self.routed
            .iter()
            .filter(|t| services.contains(&t.service))
            .cloned()
            .collect()
    }

    fn note(&self, event: &str, detail: serde_json::Value) {
        self.watch.on_rollout(event, &detail);
    }

    /// Runs every wave not passed yet; returns the combined push report.
    pub async fn run(&mut self) -> Result<PushReport, Error> {
        let stopped = match self.waves().await {
            Ok(stopped) => stopped,
            Err(e) => {
                // The records held back describe pushes that happened: they
                // reach the log whatever stopped the rollout.
                if let Err(lost) = self.record([]) {
                    tracing::error!(rollout = self.id, error = %lost, "could not record the waves held back");
                }
                return Err(e);
            }
        };
        let outcome = match stopped {
            None => {
                self.report.status = "deployed".into();
                Outcome::Deployed
            }
            Some(Stop::Halt(halted, why)) => {
                tracing::warn!(policy_id = self.policy_id, env = self.env_name, %why, "rollout halted");
                self.report.halted = Some(halted);
                self.note("halted", json!({"why": why}));
                // What passed before the halt is on record before anything
                // is sent back.
                self.record([])?;
                let outcome = self.send_back().await;
                let aborted = self
                    .report
                    .halted
                    .as_ref()
                    .is_some_and(|h| h["aborted_by"].is_string());
                self.report.status = match (outcome, aborted) {
                    (Outcome::NeedsAttention, _) => "needs-attention".into(),
                    (_, true) => "aborted".into(),
                    _ => "rolled-back".into(),
                };
                outcome
            }
        };
        self.save()?;
        let finished = json!({"rollout": self.id, "outcome": self.report.status,
               "halted": self.report.halted,
               "waves": self.report.waves.iter().map(|w| json!({"wave": w.name, "status": w.status})).collect::<Vec<_>>()});
        self.record([(Event::RolloutFinished, finished)])?;
        Ok(PushReport {
            outcome,
            digest: self.bundle.digest.clone(),
            targets: std::mem::take(&mut self.targets),
            registry: None,
        })
    }

    async fn waves(&mut self) -> Result<Option<Stop>, Error> {
        for i in 0..self.report.waves.len() {
            if self.report.waves[i].status == WaveStatus::Passed {
                // Passed before a resume: its services must still hold the digest.
                let wave = &self.report.waves[i];
                if !wave
                    .services
                    .iter()
                    .all(|s| self.targets.iter().any(|t| &t.service == s))
                {
                    let name = wave.name.clone();
                    let targets = self.targets_of(&wave.services);
                    if let Some(stop) = self.reverify(&targets, &name).await {
                        return Ok(Some(stop));
                    }
                }
                continue;
            }
            if let Some(stop) = self.wave(i).await? {
                return Ok(Some(stop));
            }
        }
        Ok(None)
    }

    async fn wave(&mut self, i: usize) -> Result<Option<Stop>, Error> {
        let wave = self.report.waves[i].clone();
        let targets = self.targets_of(&wave.services);
        if targets.is_empty() {
            self.report.waves[i].status = WaveStatus::Passed;
            self.save()?;
            return Ok(None);
        }
        // Pushed before a resume (baking or paused): verified again, not re-sent.
        if wave.status == WaveStatus::Pending {
            self.note(
                "wave-started",
                json!({"wave": wave.name, "number": wave.number, "services": wave.services}),
            );
            self.remember_previous(&targets).await?;
            let pushed = self
                .engine
                .push_stage(
                    self.bundle,
                    self.env_name,
                    &targets,
                    self.observer,
                    self.audit.lock(),
                )
                .await?;
            for t in &pushed.targets {
                self.report
                    .previous
                    .entry(t.service.clone())
                    .or_insert_with(|| t.previous_digest.clone());
            }
            self.targets.extend(pushed.targets.iter().cloned());
            let record = json!({"rollout": self.id, "wave": wave.name, "number": wave.number,
                                "digest": self.bundle.digest, "outcome": pushed.outcome,
                                "targets": pushed.targets});
            if pushed.outcome == Outcome::Deployed && wave.is_quick() {
                // Held back with the wave's gate results (see `record`):
                // with no bake, nothing happens between the two that a
                // record of the push alone would serve.
                self.held.push((Event::WavePushed, record));
            } else {
                self.record([(Event::WavePushed, record)])?;
            }
            if pushed.outcome != Outcome::Deployed {
                self.report.waves[i].status = WaveStatus::Failed;
                let why = format!(
                    "wave {} ({}) push ended {}",
                    wave.number, wave.name, pushed.outcome
                );
                return Ok(Some(Stop::Halt(
                    json!({"wave": wave.name, "push": pushed.outcome}),
                    why,
                )));
            }
            let until = jiff::Timestamp::now()
                + jiff::SignedDuration::from_millis(
                    i64::try_from(wave.bake_ms).unwrap_or(i64::MAX),
                );
            self.report.waves[i].status = WaveStatus::Baking;
            self.report.waves[i].bake_until = Some(until.to_string());
            // A bake to resume is saved; with none, a process killed before
            // the wave passes leaves it pending, and a resume pushes it
            // again (idempotent) and judges it then: one durable write
            // fewer per wave.
            if !wave.is_quick() {
                self.save()?;
            }
            self.note(
                "wave-pushed",
                json!({"wave": wave.name, "bake_ms": wave.bake_ms}),
            );
        } else if let Some(stop) = self.reverify(&targets, &wave.name).await {
            return Ok(Some(stop));
        }
        if self.report.waves[i].status == WaveStatus::Baking {
            if let Some(stop) = self.bake(i).await? {
                return Ok(Some(stop));
            }
            if let Some(stop) = self.judge(i).await? {
                return Ok(Some(stop));
            }
            if wave.pause {
                self.report.waves[i].status = WaveStatus::Paused;
                self.report.status = "paused".into();
                self.save()?;
                self.record([(
                    Event::RolloutPaused,
                    json!({"rollout": self.id, "wave": wave.name, "number": wave.number}),
                )])?;
                self.note("paused", json!({"wave": wave.name}));
            }
        }
        if self.report.waves[i].status == WaveStatus::Paused
            && let Some(stop) = self.wait_for_promotion(&wave.name).await?
        {
            return Ok(Some(stop));
        }
        self.report.waves[i].status = WaveStatus::Passed;
        self.report.status = "running".into();
        // A wave with a bake or a pause is saved as passed, so a resume
        // starts after it (a quick one waits for the next write).
        if !wave.is_quick() {
            self.save()?;
        }
        self.note(
            "wave-passed",
            json!({"wave": wave.name, "number": wave.number}),
        );
        Ok(None)
    }

    /// Saves what each of `targets` holds before its wave is pushed, where
    /// the rollout's start could not read it (a service unreachable then).
    /// The push step reads it too, but only a process that lives to the end
    /// of the push keeps it: one killed mid-push leaves services that
    /// already hold the new digest, and a rollback after the resume (or an
    /// abort) must still send them back to what they held before.
    async fn remember_previous(&mut self, targets: &[Target]) -> Result<(), Error> {
        let unknown: Vec<Target> = targets
            .iter()
            .filter(|t| !self.report.previous.contains_key(&t.service))
            .cloned()
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let held = previous_holdings(self.engine, self.policy_id, &unknown).await;
        self.report.previous.extend(held);
        self.save()
    }

    /// After a resume: the wave's services must still hold the digest.
    async fn reverify(&mut self, targets: &[Target], wave: &str) -> Option<Stop> {
        for t in targets {
            let held = push::get_active(
                &self.engine.http,
                t,
                self.policy_id,
                &self.engine.config.push,
            )
            .await;
            let ok = matches!(&held, Ok(Some(a)) if a.digest == self.bundle.digest);
            self.targets.push(TargetReport {
                service: t.service.clone(),
                url: t.url.clone(),
                previous_digest: self.report.previous.get(&t.service).cloned().flatten(),
                state: if ok {
                    TargetState::Delivered
                } else {
                    TargetState::Failed
                },
                attempts: 0,
                detail: if ok {
                    "verified again on resume".into()
                } else {
                    format!("on resume: {held:?}")
                },
                http_status: None,
                error_code: None,
            });
            if !ok {
                let why = format!(
                    "on resume, service {} of wave {wave} no longer holds {}",
                    t.service, self.bundle.digest
                );
                return Some(Stop::Halt(json!({"wave": wave, "service": t.service}), why));
            }
        }
        None
    }

    /// The control a person set (`promote`, `abort`), if any.
    fn control(&self) -> Result<Option<String>, Error> {
        Ok(self.engine.state.rollout(self.id)?.and_then(|r| r.control))
    }

    fn aborted(&self, by: &str, wave: &str) -> Stop {
        let why = format!("aborted by {by} at wave {wave}");
        Stop::Halt(json!({"wave": wave, "aborted_by": by}), why)
    }

    fn last_actor(&self, action: &str) -> String {
        self.engine
            .state
            .rollout(self.id)
            .ok()
            .flatten()
            .and_then(|r| {
                r.doc["log"].as_array().and_then(|l| {
                    l.iter()
                        .rev()
                        .find(|e| e["action"] == action)
                        .and_then(|e| e["by"].as_str().map(str::to_string))
                })
            })
            .unwrap_or_else(|| "unknown".into())
    }

    async fn bake(&mut self, i: usize) -> Result<Option<Stop>, Error> {
        let name = self.report.waves[i].name.clone();
        let until: Option<jiff::Timestamp> = self.report.waves[i]
            .bake_until
            .as_deref()
            .and_then(|t| t.parse().ok());
        let poll = Duration::from_millis(self.rollout.poll_ms);
        self.note(
            "baking",
            json!({"wave": name, "until": self.report.waves[i].bake_until}),
        );
        loop {
            if self.control()?.as_deref() == Some("abort") {
                return Ok(Some(self.aborted(&self.last_actor("abort"), &name)));
            }
            let left = until.map_or(Duration::ZERO, |u| {
                Duration::try_from(u.duration_since(jiff::Timestamp::now()))
                    .unwrap_or(Duration::ZERO)
            });
            if left.is_zero() {
                return Ok(None);
            }
            tokio::time::sleep(left.min(poll)).await;
        }
    }

    /// Evaluates wave `i`'s gates and records each result (after whatever
    /// is held back, this wave's push record among them when it had no bake).
    async fn judge(&mut self, i: usize) -> Result<Option<Stop>, Error> {
        let wave = self.report.waves[i].clone();
        let results = self.evaluate_gates(i, &wave).await?;
        // One durable append for the wave's results: a gate evaluated per
        // service makes one record per service, and an fsync each would
        // cost more than the gates themselves.
        let records = results
            .iter()
            .map(|r| {
                (
                    Event::GateEvaluated,
                    json!({"rollout": self.id, "wave": wave.name, "number": wave.number, "gate": r.gate,
                           "kind": r.kind, "service": r.service, "query": r.query, "values": r.values,
                           "baseline": r.baseline, "verdict": r.verdict, "passed": r.passed,
                           "detail": r.detail, "statistics": r.statistics}),
                )
            })
            .collect::<Vec<_>>();
        if wave.is_quick() && results.iter().all(|r| r.passed) {
            self.held.extend(records);
        } else {
            self.record(records)?;
        }
        self.settle(i, &wave, results)
    }

    /// Every gate of wave `i`, evaluated.
    async fn evaluate_gates(
        &self,
        i: usize,
        wave: &waves::WaveReport,
    ) -> Result<Vec<GateResult>, Error> {
        let later: Vec<&str> = self.report.waves[i + 1..]
            .iter()
            .flat_map(|w| w.services.iter().map(String::as_str))
            .collect();
        let vars = Vars {
            policy_id: self.policy_id,
            version: self.version,
            digest: &self.bundle.digest,
            wave: &wave.name,
            services: self
                .routed
                .iter()
                .filter(|t| wave.services.contains(&t.service))
                .map(|t| (t.service.as_str(), t.url.as_str()))
                .collect(),
            baseline: later,
        };
        let timeout = self.engine.config.push.timeout();
        let plugins = self.engine.gate_plugins(self.rollout)?;
        let judge = plugins.as_deref().map(|plugins| waves::PluginJudge {
            plugins,
            policy: crate::plugin::PolicyInput {
                id: self.policy_id.to_string(),
                version: self.version.to_string(),
                document: self.bundle.payload.policy.clone(),
            },
            environment: self.env_name,
            bake: Duration::from_millis(wave.bake_ms),
        });
        let mut results: Vec<GateResult> = Vec::new();
        for gate in waves::gates_of(self.rollout, i) {
            results.extend(
                waves::evaluate(&self.engine.http, gate, &vars, timeout, judge.as_ref()).await?,
            );
        }
        Ok(results)
    }

    /// Takes wave `i`'s recorded gate results: a stop if one failed.
    fn settle(
        &mut self,
        i: usize,
        wave: &waves::WaveReport,
        results: Vec<GateResult>,
    ) -> Result<Option<Stop>, Error> {
        for r in &results {
            self.note("gate", serde_json::to_value(r).unwrap_or_default());
        }
        let failed = results.iter().find(|r| !r.passed).cloned();
        self.report.waves[i].results.extend(results);
        if let Some(r) = failed {
            self.report.waves[i].status = WaveStatus::Failed;
            let seen = if r.statistics.is_empty() {
                format!("{:?}", r.values)
            } else {
                r.statistics
                    .iter()
                    .map(|s| format!("{} = {}", s.name, s.value))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let why = format!(
                "wave {} ({}): gate {:?} {}: query {} gave {}: {}",
                wave.number,
                wave.name,
                r.gate,
                serde_json::to_value(r.verdict)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                r.query,
                seen,
                r.detail
            );
            let halted = json!({"wave": wave.name, "number": wave.number, "gate": r.gate,
                                "query": r.query, "values": r.values, "baseline": r.baseline,
                                "verdict": r.verdict, "detail": r.detail,
                                "statistics": r.statistics});
            return Ok(Some(Stop::Halt(halted, why)));
        }
        self.save()?;
        Ok(None)
    }

    async fn wait_for_promotion(&mut self, wave: &str) -> Result<Option<Stop>, Error> {
        let poll = Duration::from_millis(self.rollout.poll_ms);
        loop {
            match self.control()?.as_deref() {
                Some("promote") => {
                    self.engine.state.rollout_control(self.id, None)?;
                    // The promoter's log entry is kept: reread it.
                    if let Some(r) = self.engine.state.rollout(self.id)?
                        && let Some(log) = r.doc["log"].as_array()
                    {
                        self.report.log = log.clone();
                    }
                    self.note("promoted", json!({"wave": wave}));
                    return Ok(None);
                }
                Some("abort") => return Ok(Some(self.aborted(&self.last_actor("abort"), wave))),
                _ => tokio::time::sleep(poll).await,
            }
        }
    }

    /// Sends every service this rollout changed back to what it held
    /// before, and verifies it; the outcome of the whole rollout.
    pub async fn send_back(&mut self) -> Outcome {
        let signer = self.engine.rollback_signer().ok().flatten();
        let policy_id = self.policy_id;
        let env = self.env_name;
        let engine = self.engine;
        let digest = self.bundle.digest.clone();
        // The fence of the lock this rollout runs under (push protocol v4).
        let fence = self.audit.lock().map(|l| l.fence());
        let calls = self
            .targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.state == TargetState::Delivered)
            .map(|(i, t)| {
                let target = self.routed.iter().find(|r| r.service == t.service).cloned();
                let prev = self.report.previous.get(&t.service).cloned().flatten();
                let signer = signer.clone();
                let digest = digest.clone();
                async move {
                    let Some(target) = target else {
                        return (i, Err("not among the routed services".to_string()));
                    };
                    if prev.as_deref() == Some(digest.as_str()) {
                        return (i, Ok(()));
                    }
                    let request = push::RollbackRequest {
                        policy_id,
                        to: prev.as_deref(),
                        env,
                        signer: signer.as_ref(),
                        fence,
                    };
                    let sent =
                        push::rollback(&engine.http, &target, request, &engine.config.push).await;
                    let held = match sent {
                        Err(e) => Err(e.to_string()),
                        Ok(()) => {
                            push::get_active(&engine.http, &target, policy_id, &engine.config.push)
                                .await
                                .map_err(|e| e.to_string())
                        }
                    };
                    let result = match held {
                        Ok(a) if a.as_ref().map(|a| a.digest.as_str()) == prev.as_deref() => Ok(()),
                        Ok(a) => Err(format!(
                            "verify failed: active is {}",
                            a.map_or("nothing".to_string(), |a| a.digest)
                        )),
                        Err(e) => Err(e),
                    };
                    (i, result)
                }
            });
        let done = futures::future::join_all(calls).await;
        let mut outcome = Outcome::RolledBack;
        for (i, result) in done {
            let t = &mut self.targets[i];
            match result {
                Ok(()) => {
                    t.state = TargetState::RolledBack;
                    t.detail = "rolled back with the rest of the rollout".into();
                }
                Err(why) => {
                    outcome = Outcome::NeedsAttention;
                    t.state = TargetState::RollbackFailed;
                    t.detail = format!("rollback failed: {why}");
                }
            }
            self.observer.on_event(
                &t.service,
                &match t.state {
                    TargetState::RolledBack => push::PushEvent::RolledBack,
                    _ => push::PushEvent::RollbackFailed {
                        reason: t.detail.clone(),
                    },
                },
            );
        }
        for w in &mut self.report.waves {
            if matches!(
                w.status,
                WaveStatus::Baking | WaveStatus::Paused | WaveStatus::Passed | WaveStatus::Failed
            ) && w.bake_until.is_some()
            {
                w.status = WaveStatus::RolledBack;
            }
        }
        self.note("rolled-back", json!({"outcome": outcome}));
        outcome
    }
}
