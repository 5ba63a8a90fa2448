//! Progressive rollouts (issue 22): step 5 in waves, and the commands a
//! person drives a rollout with (`pde rollout status|promote|abort|resume`).
//!
//! Without a `rollout` in the environment, step 5 is one push to every
//! routed service, as it always was. With one, each wave goes through the
//! same push step (its verification and per-wave compensation), is baked,
//! and is judged by its gates ([`crate::steps::waves`]); a failing gate, a
//! failed push or an abort sends every service of every wave pushed so far
//! back to what it held, and nothing is tagged. Progress lives in the state
//! backend (`rollouts`), so a teammate on the shared PostgreSQL sees it and
//! a resumed process continues it. The deploy lock is held by the process
//! running the rollout for its whole length, pauses included.

mod run;

use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::audit::Event;
use crate::bookkeeping::Deployment;
use crate::config::Environment;
use crate::engine::Engine;
use crate::error::Error;
use crate::http::Target;
use crate::report::{DeployOptions, DeployOutcome, DeployReport, RolloutReport};
use crate::state::RolloutRecord;
use crate::steps::audit::Recorder;
use crate::steps::push::{self, Outcome, PushReport, TargetReport, TargetState};
use crate::steps::waves::{self, RolloutError, Vars, WaveStatus};
use run::Run;

pub use crate::steps::waves::{GateResult, Verdict, WaveReport};

/// What step 5 is given by the pipeline.
pub(crate) struct Delivery<'a> {
    pub policy_id: &'a str,
    pub env_name: &'a str,
    pub env: &'a Environment,
    pub version: &'a str,
    pub bundle: &'a pde_core::bundle::Bundle,
    pub routed: Vec<Target>,
    pub audit: &'a Recorder<'a>,
    pub opts: &'a DeployOptions<'a>,
}

/// `pde rollout status`: the latest rollout of a policy in an environment.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutStatus {
    /// The rollout's id.
    pub id: i64,
    /// The policy.
    pub policy_id: String,
    /// The environment.
    pub env: String,
    /// The version rolled out.
    pub version: String,
    /// Its digest.
    pub digest: String,
    /// Who started it.
    pub actor: String,
    /// When it started and last changed.
    pub started_at: String,
    /// When it last changed.
    pub updated_at: String,
    /// A pending request (`promote`, `abort`).
    pub control: Option<String>,
    /// Whether a live process holds its lock now.
    pub live: bool,
    /// The wave it is at (1-based): the first not passed.
    pub wave: Option<usize>,
    /// Milliseconds left in that wave's bake.
    pub bake_left_ms: Option<u64>,
    /// Waves, gate results, halt.
    pub report: RolloutReport,
}

impl Engine {
    /// Step 5: one push to every routed service, or, with a rollout, wave by
    /// wave. Records the deployment in the state and the push in the audit
    /// log either way.
    pub(crate) async fn push_waves(
        &self,
        d: Delivery<'_>,
    ) -> Result<(PushReport, Option<RolloutReport>), Error> {
        let services = d.routed.iter().map(|t| (t.service.clone(), None));
        let deployment = Deployment::begin(
            &self.state,
            d.policy_id,
            d.env_name,
            d.version,
            &d.bundle.digest,
            services,
        )?;
        let (pushed, rollout) = match &d.env.rollout {
            None => {
                let pushed = self
                    .push_stage(
                        d.bundle,
                        d.env_name,
                        &d.routed,
                        d.opts.observer,
                        d.audit.lock(),
                    )
                    .await?;
                (pushed, None)
            }
            Some(rollout) => {
                let names: Vec<String> = d.routed.iter().map(|t| t.service.clone()).collect();
                // What every service holds before the rollout, stored with
                // its first record: what a rollback or an abort sends each
                // back to, even after a kill in the middle of a push.
                let previous = run::previous_holdings(self, d.policy_id, &d.routed).await;
                let report = RolloutReport {
                    id: None,
                    status: "running".into(),
                    waves: waves::plan(rollout, &d.env.services, &names),
                    previous,
                    halted: None,
                    log: Vec::new(),
                };
                let record = RolloutRecord {
                    id: None,
                    policy_id: d.policy_id.into(),
                    env: d.env_name.into(),
                    version: d.version.into(),
                    digest: d.bundle.digest.clone(),
                    status: "running".into(),
                    control: None,
                    doc: serde_json::to_value(&report).unwrap_or_default(),
                    started_at: pde_core::clock::now_rfc3339(),
                    updated_at: pde_core::clock::now_rfc3339(),
                    actor: crate::audit::default_actor(),
                };
                let id = self.state.rollout_begin(&record)?;
                d.audit.record(
                    Event::RolloutStarted,
                    json!({"rollout": id, "digest": d.bundle.digest, "waves": report.waves}),
                )?;
                let mut run = Run {
                    engine: self,
                    policy_id: d.policy_id,
                    env_name: d.env_name,
                    rollout,
                    bundle: d.bundle,
                    version: d.version,
                    routed: d.routed,
                    audit: *d.audit,
                    observer: d.opts.observer,
                    watch: d.opts.rollout_observer,
                    id,
                    report: RolloutReport {
                        id: Some(id),
                        ..report
                    },
                    targets: Vec::new(),
                    held: Vec::new(),
                };
                let pushed = run.run().await?;
                (pushed, Some(run.report))
            }
        };
        self.record_push(d.audit, deployment, &pushed, d.version)?;
        Ok((pushed, rollout))
    }

    /// The audit records and the state's deployment record of a push.
    fn record_push(
        &self,
        audit: &Recorder<'_>,
        deployment: Deployment<'_>,
        pushed: &PushReport,
        version: &str,
    ) -> Result<(), Error> {
        let event = match pushed.outcome {
            Outcome::Deployed => Event::Pushed,
            Outcome::RolledBack | Outcome::NeedsAttention => Event::PushFailed,
        };
        let mut data = json!({"digest": pushed.digest, "targets": pushed.targets});
        if let Some(registry) = &pushed.registry {
            data["registry"] = registry.clone(); // OCI delivery: tag and manifests
        }
        audit.record(event, data)?;
        // `needs-attention` is not a rollback: `push_failed` carries it.
        if pushed.outcome == Outcome::RolledBack {
            audit.record(
                Event::RolledBack,
                json!({"digest": pushed.digest, "outcome": pushed.outcome}),
            )?;
        }
        let holdings = push::holdings(pushed, version);
        deployment.finish(
            pushed.outcome.into(),
            push::target_records(pushed),
            holdings,
        )?;
        Ok(())
    }

    /// For a dry run (and `pde plan`): the waves a rollout would push, each
    /// gate evaluated once now, so a misspelt metric shows before a rollout.
    pub(crate) async fn preview_waves(
        &self,
        env: &Environment,
        report: &DeployReport,
        document: &serde_json::Value,
    ) -> Result<Option<RolloutReport>, Error> {
        let Some(rollout) = &env.rollout else {
            return Ok(None);
        };
        let plugins = self.gate_plugins(rollout)?;
        let names: Vec<String> = report.routes.iter().map(|r| r.service.clone()).collect();
        let mut planned = waves::plan(rollout, &env.services, &names);
        let timeout = self.config.push.timeout();
        for i in 0..planned.len() {
            let later: Vec<&str> = planned[i + 1..]
                .iter()
                .flat_map(|w| w.services.iter().map(String::as_str))
                .collect();
            let vars = Vars {
                policy_id: &report.policy_id,
                version: &report.version,
                digest: &report.digest,
                wave: &planned[i].name,
                services: env
                    .services
                    .iter()
                    .filter(|s| planned[i].services.contains(&s.name))
                    .map(|s| (s.name.as_str(), s.url.as_str()))
                    .collect(),
                baseline: later,
            };
            let judge = plugins.as_deref().map(|plugins| waves::PluginJudge {
                plugins,
                policy: crate::plugin::PolicyInput {
                    id: report.policy_id.clone(),
                    version: report.version.clone(),
                    document: document.clone(),
                },
                environment: &report.env,
                bake: Duration::from_millis(planned[i].bake_ms),
            });
            let mut results = Vec::new();
            for gate in waves::gates_of(rollout, i) {
                results.extend(
                    waves::evaluate(&self.http, gate, &vars, timeout, judge.as_ref()).await?,
                );
            }
            planned[i].results = results;
        }
        Ok(Some(RolloutReport {
            id: None,
            status: "dry-run".into(),
            waves: planned,
            previous: Default::default(),
            halted: None,
            log: Vec::new(),
        }))
    }

    /// The workspace's plugins when the rollout has a `plugin` gate (loaded
    /// and checked as a deploy loads them), else `None`.
    pub(crate) fn gate_plugins(
        &self,
        rollout: &crate::config::Rollout,
    ) -> Result<Option<std::sync::Arc<crate::plugin::PluginSet>>, Error> {
        if rollout.all_gates().all(|g| g.plugin().is_none()) {
            return Ok(None);
        }
        Ok(Some(self.plugins()?))
    }

    /// Refuses a deploy while a rollout of the policy in the environment
    /// has not ended, naming the commands that end it.
    pub(crate) fn refuse_open_rollout(&self, policy_id: &str, env: &str) -> Result<(), Error> {
        match self
            .state
            .rollouts(policy_id, Some(env))?
            .into_iter()
            .next()
        {
            Some(r) if r.open() => Err(in_progress(&r).into()),
            _ => Ok(()),
        }
    }

    /// `pde rollout status ID --env ENV`.
    pub fn rollout_status(&self, policy_id: &str, env: &str) -> Result<RolloutStatus, Error> {
        self.environment(env)?;
        let r = self.latest_rollout(policy_id, env)?;
        let report: RolloutReport = serde_json::from_value(r.doc.clone()).map_err(|e| {
            Error::Rollout(RolloutError::NotApplicable {
                id: r.id.unwrap_or_default(),
                policy_id: policy_id.into(),
                env: env.into(),
                status: r.status.clone(),
                why: format!("its record cannot be read: {e}"),
            })
        })?;
        let current = report.waves.iter().find(|w| w.status != WaveStatus::Passed);
        let bake_left_ms = current
            .filter(|w| w.status == WaveStatus::Baking && r.open())
            .and_then(|w| w.bake_until.as_deref())
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|u| {
                let left = u.duration_since(jiff::Timestamp::now()).as_millis();
                u64::try_from(left.max(0)).unwrap_or(0)
            });
        Ok(RolloutStatus {
            id: r.id.unwrap_or_default(),
            live: self.state.is_locked(policy_id, env)?,
            wave: current.map(|w| w.number),
            bake_left_ms,
            policy_id: r.policy_id,
            env: r.env,
            version: r.version,
            digest: r.digest,
            actor: r.actor,
            started_at: r.started_at,
            updated_at: r.updated_at,
            control: r.control,
            report,
        })
    }

    fn latest_rollout(&self, policy_id: &str, env: &str) -> Result<RolloutRecord, Error> {
        self.state
            .rollouts(policy_id, Some(env))?
            .into_iter()
            .next()
            .ok_or_else(|| {
                RolloutError::None {
                    policy_id: policy_id.into(),
                    env: env.into(),
                }
                .into()
            })
    }

    /// Notes a person's request on the rollout: its `control`, and an entry
    /// `{action, by, at}` in its log, with an audit record naming who.
    fn request(&self, r: &RolloutRecord, action: &str) -> Result<(), Error> {
        let id = r.id.unwrap_or_default();
        self.key_audit_head()?;
        let by = crate::audit::default_actor();
        let mut doc = r.doc.clone();
        let entry = json!({"action": action, "by": by, "at": pde_core::clock::now_rfc3339()});
        match doc["log"].as_array_mut() {
            Some(log) => log.push(entry),
            None => doc["log"] = json!([entry]),
        }
        self.state.rollout_save(id, &r.status, &doc)?;
        self.state.rollout_control(id, Some(action))?;
        let event = match action {
            "promote" => Event::RolloutPromoted,
            _ => Event::RolloutAborted,
        };
        Recorder::unlocked(&self.audit, self.outbox.as_ref(), &r.policy_id, &r.env).record(
            event,
            json!({"rollout": id, "by": by, "version": r.version}),
        )?;
        Ok(())
    }

    /// `pde rollout promote ID --env ENV`: lets a paused rollout go on. The
    /// process running it continues; if none is (it died), this one
    /// resumes it.
    pub async fn rollout_promote(
        &self,
        policy_id: &str,
        env: &str,
    ) -> Result<RolloutStatus, Error> {
        self.environment(env)?;
        let r = self.latest_rollout(policy_id, env)?;
        if r.status != "paused" {
            return Err(not_applicable(&r, "only a paused rollout can be promoted").into());
        }
        self.request(&r, "promote")?;
        if !self.state.is_locked(policy_id, env)? {
            return self.rollout_resume(policy_id, env).await;
        }
        self.wait_until(policy_id, env, |s| {
            s.control.is_none() || !s.report.status.eq("paused")
        })
        .await
    }

    /// `pde rollout abort ID --env ENV`: sends back everything the rollout
    /// pushed. The process running it does so; if none is, this one does.
    pub async fn rollout_abort(&self, policy_id: &str, env: &str) -> Result<RolloutStatus, Error> {
        self.environment(env)?;
        let r = self.latest_rollout(policy_id, env)?;
        if !r.open() {
            return Err(not_applicable(&r, "it has ended already").into());
        }
        self.request(&r, "abort")?;
        if self.state.is_locked(policy_id, env)? {
            return self
                .wait_until(policy_id, env, |s| !s.live || !open(&s.report.status))
                .await;
        }
        match self.continue_rollout(policy_id, env).await {
            Ok(_) | Err(Error::RolloutHalted { .. }) => self.rollout_status(policy_id, env),
            Err(e) => Err(e),
        }
    }

    /// `pde rollout resume ID --env ENV`: continues a rollout whose process
    /// died, from its first unfinished wave, after checking that the waves
    /// before it still hold the digest.
    pub async fn rollout_resume(&self, policy_id: &str, env: &str) -> Result<RolloutStatus, Error> {
        self.environment(env)?;
        self.continue_rollout(policy_id, env).await?;
        self.rollout_status(policy_id, env)
    }

    async fn wait_until(
        &self,
        policy_id: &str,
        env: &str,
        done: impl Fn(&RolloutStatus) -> bool,
    ) -> Result<RolloutStatus, Error> {
        let poll = self
            .environment(env)?
            .rollout
            .as_ref()
            .map_or(500, |r| r.poll_ms);
        // The running process sees the request within a poll; a little more
        // than that is waited for, so the answer says what it did.
        for _ in 0..20 {
            let s = self.rollout_status(policy_id, env)?;
            if done(&s) {
                return Ok(s);
            }
            tokio::time::sleep(std::time::Duration::from_millis(poll)).await;
        }
        self.rollout_status(policy_id, env)
    }

    /// Runs the open rollout of `policy_id` in `env` on from where its
    /// record stands, under the deploy lock; tags the release at its end.
    async fn continue_rollout(
        &self,
        policy_id: &str,
        env_name: &str,
    ) -> Result<DeployOutcome, Error> {
        let env = self.environment(env_name)?;
        let lock = self.state.lock(policy_id, env_name)?;
        self.key_audit_head()?;
        let r = self.latest_rollout(policy_id, env_name)?;
        if !r.open() {
            return Err(not_applicable(&r, "it has ended; nothing to resume").into());
        }
        let Some(rollout) = &env.rollout else {
            return Err(not_applicable(&r, "pde.toml no longer configures a rollout here").into());
        };
        let id = r.id.unwrap_or_default();
        let mut report: RolloutReport = serde_json::from_value(r.doc.clone())
            .map_err(|e| not_applicable(&r, &format!("its record cannot be read: {e}")))?;
        report.id = Some(id);
        let bundle = crate::state::stored_bundle(
            &*self.state,
            &self.dist_dir(),
            policy_id,
            &r.version,
            &r.digest,
        )?
        .map_err(|why| not_applicable(&r, &format!("its bundle cannot be found: {why}")))?;
        let names: Vec<String> = report
            .waves
            .iter()
            .flat_map(|w| w.services.clone())
            .collect();
        let routed: Vec<Target> = env
            .services
            .iter()
            .filter(|s| names.contains(&s.name))
            .map(|s| self.target(s))
            .collect::<Result<_, _>>()?;
        self.state.settle_interrupted(policy_id, env_name)?;
        let audit = Recorder::new(
            &self.audit,
            self.outbox.as_ref(),
            policy_id,
            env_name,
            Some(&lock),
        );
        let aborting = r.control.as_deref() == Some("abort");
        audit.record(
            if aborting {
                Event::RolloutAborted
            } else {
                Event::RolloutResumed
            },
            json!({"rollout": id, "by": crate::audit::default_actor()}),
        )?;
        let deployment = Deployment::begin(
            &self.state,
            policy_id,
            env_name,
            &r.version,
            &r.digest,
            routed.iter().map(|t| (t.service.clone(), None)),
        )?;
        let mut run = Run {
            engine: self,
            policy_id,
            env_name,
            rollout,
            bundle: &bundle,
            version: &r.version,
            routed,
            audit,
            observer: &(),
            watch: &(),
            id,
            report,
            targets: Vec::new(),
            held: Vec::new(),
        };
        let pushed = if aborting {
            // Nobody runs it: what its waves pushed is assumed delivered and
            // sent back, each verified. That includes the services of a wave
            // whose push was cut short: their previous holding was saved
            // before it began.
            for w in run.report.waves.clone() {
                for s in &w.services {
                    if w.bake_until.is_none() && !run.report.previous.contains_key(s) {
                        continue;
                    }
                    run.targets.push(TargetReport {
                        service: s.clone(),
                        url: run
                            .routed
                            .iter()
                            .find(|t| &t.service == s)
                            .map(|t| t.url.clone())
                            .unwrap_or_default(),
                        previous_digest: run.report.previous.get(s).cloned().flatten(),
                        state: TargetState::Delivered,
                        attempts: 0,
                        detail: String::new(),
                        http_status: None,
                        error_code: None,
                    });
                }
            }
            let by = crate::audit::default_actor();
            run.report.halted = Some(json!({"aborted_by": by}));
            let outcome = run.send_back().await;
            run.report.status = if outcome == Outcome::RolledBack {
                "aborted"
            } else {
                "needs-attention"
            }
            .into();
            self.state.rollout_save(
                id,
                &run.report.status,
                &serde_json::to_value(&run.report).unwrap_or_default(),
            )?;
            PushReport {
                outcome,
                digest: r.digest.clone(),
                targets: std::mem::take(&mut run.targets),
                registry: None,
            }
        } else {
            run.run().await?
        };
        let halted = run.report.halted.clone();
        self.record_push(&audit, deployment, &pushed, &r.version)?;
        if pushed.outcome != Outcome::Deployed {
            let why = halted.map(|h| h.to_string()).unwrap_or_default();
            audit.record(Event::DeployFailed, json!({"error": why, "exit_code": 8}))?;
            return Err(Error::RolloutHalted {
                policy_id: policy_id.into(),
                env: env_name.into(),
                why,
                outcome: pushed.outcome.into(),
                report: Box::new(json!({"policy_id": policy_id, "env": env_name,
                    "version": r.version, "digest": r.digest, "outcome": DeployOutcome::from(pushed.outcome),
                    "push": pushed, "rollout": run.report})),
            });
        }
        let repo = crate::vcs::Repo::discover(&self.root)?;
        let release = crate::steps::tag::Release::new(policy_id, &r.version, env_name, &r.digest);
        let tagged = self.tag_stage(&repo, release, &names, Some(&lock))?;
        audit.record(
            Event::Tagged,
            json!({"tag": tagged.name, "created": tagged.created}),
        )?;
        audit.record(
            Event::Deployed,
            json!({"digest": r.digest, "version": r.version, "already_active": false}),
        )?;
        Ok(DeployOutcome::Deployed)
    }
}

fn open(status: &str) -> bool {
    matches!(status, "running" | "paused")
}

fn in_progress(r: &RolloutRecord) -> RolloutError {
    let wave = r.doc["waves"]
        .as_array()
        .and_then(|w| w.iter().position(|w| w["status"] != "passed"))
        .map_or(0, |i| i + 1);
    RolloutError::InProgress {
        id: r.id.unwrap_or_default(),
        policy_id: r.policy_id.clone(),
        env: r.env.clone(),
        version: r.version.clone(),
        status: r.status.clone(),
        wave,
    }
}

fn not_applicable(r: &RolloutRecord, why: &str) -> RolloutError {
    RolloutError::NotApplicable {
        id: r.id.unwrap_or_default(),
        policy_id: r.policy_id.clone(),
        env: r.env.clone(),
        status: r.status.clone(),
        why: why.into(),
    }
}

/// The error of a deploy whose push (or rollout) did not end `deployed`.
pub(crate) fn failure(report: DeployReport) -> Error {
    let halted = report.rollout.as_ref().and_then(|r| r.halted.clone());
    match halted {
        // A push that failed within a wave is a failed deploy (exit 1), as
        // without a rollout; a gate or an abort halts the rollout (exit 8).
        Some(h) if h.get("push").is_none() => Error::RolloutHalted {
            policy_id: report.policy_id.clone(),
            env: report.env.clone(),
            why: halt_text(&h),
            outcome: report.outcome,
            report: Box::new(serde_json::to_value(&report).unwrap_or_default()),
        },
        _ => Error::DeployFailed {
            policy_id: report.policy_id.clone(),
            env: report.env.clone(),
            outcome: report.outcome,
            report: Box::new(report),
        },
    }
}

/// The halt in words: the wave, the gate, the query and the value seen.
fn halt_text(h: &serde_json::Value) -> String {
    if let Some(by) = h["aborted_by"].as_str() {
        return format!("aborted by {by}");
    }
    // A plugin gate is seen through the statistics its plugin computed.
    let seen = match h["statistics"].as_array() {
        Some(stats) if !stats.is_empty() => stats
            .iter()
            .map(|s| format!("{} = {}", s["name"].as_str().unwrap_or("?"), s["value"]))
            .collect::<Vec<_>>()
            .join(", "),
        _ => h["values"].to_string(),
    };
    format!(
        "wave {} gate {} was {}: query {} gave {} ({})",
        h["wave"].as_str().unwrap_or("?"),
        h["gate"],
        h["verdict"].as_str().unwrap_or("?"),
        h["query"],
        seen,
        h["detail"].as_str().unwrap_or("")
    )
}
