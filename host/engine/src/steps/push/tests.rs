//! Push against real HTTP receivers on 127.0.0.1 (see `test_receiver`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::config::Service;
use crate::http::HttpError;
use crate::test_receiver::{self, Gauge, Mode, OTHER_DIGEST, Receiver};
use pde_core::secret::ExposeSecret;

const OLD: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const ENV: &str = "production";

fn cfg() -> PushConfig {
    PushConfig {
        timeout_ms: 2000,
        retries: 2,
        concurrency: 8,
        backoff_ms: 5,
    }
}

fn http() -> reqwest::Client {
    client(Duration::from_secs(10)).unwrap()
}

fn target(name: &str, r: &Receiver) -> Target {
    Target::new(name, &r.url, None)
}

/// Records every event, to check what a progress display would see.
#[derive(Default)]
struct Recorder(Mutex<Vec<(String, PushEvent)>>);

impl Observer for Recorder {
    fn on_event(&self, service: &str, event: &PushEvent) {
        self.0
            .lock()
            .unwrap()
            .push((service.to_string(), event.clone()));
    }
}

impl Recorder {
    fn of(&self, service: &str) -> Vec<PushEvent> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

fn state_of(report: &PushReport, service: &str) -> TargetState {
    report
        .targets
        .iter()
        .find(|t| t.service == service)
        .unwrap()
        .state
}

fn target_report<'a>(report: &'a PushReport, service: &str) -> &'a TargetReport {
    report
        .targets
        .iter()
        .find(|t| t.service == service)
        .unwrap()
}

#[tokio::test]
async fn happy_path_to_three_services() {
    let bundle = test_receiver::bundle("1.3.0");
    let a = Receiver::start(Mode::Ok).await;
    let b = Receiver::with_active(Mode::Ok, OLD, "1.2.0").await;
    let c = Receiver::start(Mode::Ok).await;
    let targets = [target("A", &a), target("B", &b), target("C", &c)];
    let rec = Recorder::default();

    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg(),
        Fenced::default(),
        &rec,
    )
    .await;

    assert_eq!(report.outcome, Outcome::Deployed, "{report:#?}");
    assert_eq!(report.digest, bundle.digest);
    for (r, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
        assert_eq!(r.active().as_deref(), Some(bundle.digest.as_str()));
        assert_eq!(r.deploys(), 1);
        assert_eq!(r.rollbacks(), 0);
        assert_eq!(
            r.last_idempotency_key(),
            Some(format!("{}:{ENV}", bundle.digest))
        );
        assert_eq!(r.last_content_type().as_deref(), Some("application/json"));
        assert_eq!(r.last_authorization(), None);
        let t = target_report(&report, name);
        assert_eq!(t.state, TargetState::Delivered);
        assert_eq!(t.attempts, 1);
        assert_eq!(
            rec.of(name),
            vec![
                PushEvent::Started,
                PushEvent::Attempt { n: 1 },
                PushEvent::Delivered,
                PushEvent::Verified
            ]
        );
    }
    assert_eq!(target_report(&report, "A").previous_digest, None);
    assert_eq!(
        target_report(&report, "B").previous_digest.as_deref(),
        Some(OLD)
    );
    // The report keeps the order the targets were given in.
    let names: Vec<&str> = report.targets.iter().map(|t| t.service.as_str()).collect();
    assert_eq!(names, ["A", "B", "C"]);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["outcome"], "deployed");
    assert_eq!(json["targets"][0]["state"], "delivered");
}

#[tokio::test]
async fn the_bundle_arrives_byte_for_byte() {
    // The receiver recomputes the digest over the payload it got; a lossy
    // encoding on the way would be a 400 and a failed push.
    let mut bundle = test_receiver::bundle("2.0.0");
    bundle.payload.policy = serde_json::json!({"id": "42", "text": "é ü \u{1F600}", "n": 1.5e-7});
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let bundle = Bundle::seal(bundle.payload, &[&key]).unwrap();
    let r = Receiver::start(Mode::Ok).await;
    let report = push(
        &http(),
        &bundle,
        ENV,
        &[target("A", &r)],
        &cfg(),
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(report.outcome, Outcome::Deployed, "{report:#?}");
    assert_eq!(r.active(), Some(bundle.digest));
}

#[tokio::test]
async fn a_digest_already_active_is_not_sent_again() {
    let bundle = test_receiver::bundle("1.3.0");
    let same = Receiver::with_active(Mode::Ok, &bundle.digest, "1.3.0").await;
    let fresh = Receiver::start(Mode::Ok).await;
    let targets = [target("same", &same), target("fresh", &fresh)];
    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg(),
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(report.outcome, Outcome::Deployed);
    assert_eq!(state_of(&report, "same"), TargetState::Unchanged);
    assert_eq!(target_report(&report, "same").attempts, 0);
    assert_eq!(same.deploys(), 0);
    assert_eq!(state_of(&report, "fresh"), TargetState::Delivered);
}

#[tokio::test]
async fn one_target_always_500_rolls_the_others_back() {
    let bundle = test_receiver::bundle("1.3.0");
    let had_old = Receiver::with_active(Mode::Ok, OLD, "1.2.0").await;
    let had_nothing = Receiver::start(Mode::Ok).await;
    let broken = Receiver::with_active(Mode::Always500, OLD, "1.2.0").await;
    let targets = [
        target("had-old", &had_old),
        target("had-nothing", &had_nothing),
        target("broken", &broken),
    ];
    let rec = Recorder::default();

    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg(),
        Fenced::default(),
        &rec,
    )
    .await;

    assert_eq!(report.outcome, Outcome::RolledBack, "{report:#?}");
    // 5xx is retried: 1 attempt + 2 retries.
    assert_eq!(broken.deploys(), 3);
    let b = target_report(&report, "broken");
    assert_eq!(b.state, TargetState::Failed);
    assert_eq!(b.attempts, 3);
    assert!(b.detail.contains("500"), "{}", b.detail);
    assert_eq!(
        broken.rollbacks(),
        0,
        "a target that never took it is left alone"
    );
    assert_eq!(broken.active().as_deref(), Some(OLD));
    assert!(
        rec.of("broken")
            .iter()
            .any(|e| matches!(e, PushEvent::Retrying { n: 1, .. }))
    );

    // The others took it, and went back to exactly what they had.
    assert_eq!(state_of(&report, "had-old"), TargetState::RolledBack);
    assert_eq!(had_old.active().as_deref(), Some(OLD));
    assert_eq!(had_old.rollbacks(), 1);
    assert_eq!(state_of(&report, "had-nothing"), TargetState::RolledBack);
    assert_eq!(had_nothing.active(), None);
    let detail = &target_report(&report, "had-old").detail;
    assert!(
        detail.contains("rolled back to") && detail.contains("broken"),
        "{detail}"
    );
    assert!(rec.of("had-old").contains(&PushEvent::RolledBack));
    assert_eq!(
        serde_json::to_value(&report).unwrap()["outcome"],
        "rolled-back"
    );
    assert_eq!(report.outcome.exit_code(), ExitCode::DeployFailed);
}

#[tokio::test]
async fn a_4xx_is_permanent_and_not_retried() {
    let bundle = test_receiver::bundle("1.3.0");
    let r = Receiver::start(Mode::Reject400).await;
    let report = push(
        &http(),
        &bundle,
        ENV,
        &[target("A", &r)],
        &cfg(),
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(r.deploys(), 1);
    let t = target_report(&report, "A");
    assert_eq!(t.state, TargetState::Failed);
    assert_eq!(t.attempts, 1);
    assert!(
        t.detail.contains("400") && t.detail.contains("signature not trusted"),
        "{}",
        t.detail
    );
    assert_eq!(report.outcome, Outcome::RolledBack);
}

#[tokio::test]
async fn a_500_once_is_retried_and_deployed() {
    let bundle = test_receiver::bundle("1.3.0");
    let r = Receiver::start(Mode::Fail500Once).await;
    let rec = Recorder::default();
    let report = push(
        &http(),
        &bundle,
        ENV,
        &[target("A", &r)],
        &cfg(),
        Fenced::default(),
        &rec,
    )
    .await;
    assert_eq!(report.outcome, Outcome::Deployed, "{report:#?}");
    assert_eq!(r.deploys(), 2);
    assert_eq!(target_report(&report, "A").attempts, 2);
    assert_eq!(r.active(), Some(bundle.digest.clone()));
    let events = rec.of("A");
    let retry = events
        .iter()
        .find_map(|e| match e {
            PushEvent::Retrying {
                n,
                reason,
                delay_ms,
            } => Some((*n, reason.clone(), *delay_ms)),
            _ => None,
        })
        .expect("a Retrying event");
    assert_eq!(retry.0, 1);
    assert!(retry.1.contains("500"), "{}", retry.1);
    assert!(
        retry.2 <= cfg().backoff_ms,
        "first delay within the first ceiling"
    );
}

#[tokio::test]
async fn a_target_timing_out_fails_and_the_others_roll_back() {
    let bundle = test_receiver::bundle("1.3.0");
    let slow = Receiver::start(Mode::Slow(Duration::from_secs(5))).await;
    let ok = Receiver::with_active(Mode::Ok, OLD, "1.2.0").await;
    let cfg = PushConfig {
        timeout_ms: 300,
        retries: 1,
        ..cfg()
    };
    let targets = [target("slow", &slow), target("ok", &ok)];
    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg,
        Fenced::default(),
        &(),
    )
    .await;

    let s = target_report(&report, "slow");
    assert_eq!(s.state, TargetState::Failed, "{report:#?}");
    assert_eq!(s.attempts, 2);
    assert!(s.detail.contains("timed out"), "{}", s.detail);
    assert_eq!(slow.deploys(), 2, "each attempt reached the receiver");
    assert_eq!(state_of(&report, "ok"), TargetState::RolledBack);
    assert_eq!(ok.active().as_deref(), Some(OLD));
    assert_eq!(report.outcome, Outcome::RolledBack);
}

#[tokio::test]
async fn an_active_digest_that_does_not_match_fails_verification() {
    let bundle = test_receiver::bundle("1.3.0");
    let liar = Receiver::start(Mode::WrongActive).await;
    let ok = Receiver::start(Mode::Ok).await;
    let targets = [target("liar", &liar), target("ok", &ok)];
    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg(),
        Fenced::default(),
        &(),
    )
    .await;

    let l = target_report(&report, "liar");
    assert_eq!(l.state, TargetState::Failed, "{report:#?}");
    assert_eq!(l.detail, format!("verify failed: active is {OTHER_DIGEST}"));
    assert_eq!(liar.deploys(), 1, "a 2xx is not retried");
    assert_eq!(state_of(&report, "ok"), TargetState::RolledBack);
    assert_eq!(ok.active(), None);
    assert_eq!(report.outcome, Outcome::RolledBack);
}

#[tokio::test]
async fn a_failing_rollback_needs_attention() {
    let bundle = test_receiver::bundle("1.3.0");
    let stuck = Receiver::with_active(Mode::RollbackFails, OLD, "1.2.0").await;
    let broken = Receiver::start(Mode::Always500).await;
    let fine = Receiver::with_active(Mode::Ok, OLD, "1.2.0").await;
    let targets = [
        target("stuck", &stuck),
        target("broken", &broken),
        target("fine", &fine),
    ];
    let rec = Recorder::default();
    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg(),
        Fenced::default(),
        &rec,
    )
    .await;

    assert_eq!(report.outcome, Outcome::NeedsAttention, "{report:#?}");
    let s = target_report(&report, "stuck");
    assert_eq!(s.state, TargetState::RollbackFailed);
    assert!(
        s.detail.contains("rollback to") && s.detail.contains("500"),
        "{}",
        s.detail
    );
    // The rollback was retried like any 5xx, and the report does not pretend.
    assert_eq!(stuck.rollbacks(), 3);
    assert_eq!(stuck.active(), Some(bundle.digest.clone()));
    assert!(
        rec.of("stuck")
            .iter()
            .any(|e| matches!(e, PushEvent::RollbackFailed { .. }))
    );
    assert_eq!(state_of(&report, "fine"), TargetState::RolledBack);
    assert_eq!(fine.active().as_deref(), Some(OLD));
    assert_eq!(
        serde_json::to_value(&report).unwrap()["outcome"],
        "needs-attention"
    );
    assert_eq!(
        serde_json::to_value(&report).unwrap()["targets"][0]["state"],
        "rollback-failed"
    );
}

#[tokio::test]
async fn the_bearer_token_is_sent_and_never_shown() {
    const SECRET: &str = "s3cret-token-value";
    let bundle = test_receiver::bundle("1.3.0");
    let r = Receiver::start(Mode::Ok).await;
    let t = Target::new("A", &format!("{}/", r.url), Some(SECRET.to_string().into()));
    assert_eq!(t.url, r.url, "trailing slash dropped");
    let report = push(
        &http(),
        &bundle,
        ENV,
        std::slice::from_ref(&t),
        &cfg(),
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(report.outcome, Outcome::Deployed);
    assert_eq!(r.last_authorization(), Some(format!("Bearer {SECRET}")));

    let debug = format!("{t:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("REDACTED"), "{debug}");
    assert!(!serde_json::to_string(&report).unwrap().contains(SECRET));
    assert!(!format!("{report:?}").contains(SECRET));
}

#[test]
fn a_missing_token_variable_is_a_usage_error_naming_it() {
    let var = format!("PDE_TEST_UNSET_{}", std::process::id());
    let service = Service {
        name: "HMS-API".into(),
        url: "http://127.0.0.1:9/".into(),
        tags: vec![],
        labels: Default::default(),
        token_env: Some(var.clone()),
    };
    let err = service.token().unwrap_err();
    assert_eq!(err.exit_code(), ExitCode::Usage);
    let msg = err.to_string();
    assert!(msg.contains(&var) && msg.contains("HMS-API"), "{msg}");

    // A variable that is set is read (PATH is set in every test environment).
    let with_path = Service {
        token_env: Some("PATH".into()),
        ..service.clone()
    };
    let token = with_path.token().unwrap();
    let t = Target::new(&with_path.name, &with_path.url, token);
    assert_eq!(
        t.token.as_ref().map(|s| s.expose_secret().to_string()),
        std::env::var("PATH").ok()
    );
    assert_eq!(t.url, "http://127.0.0.1:9");
    let none = Service {
        token_env: None,
        ..service
    };
    assert!(none.token().unwrap().is_none());
}

#[tokio::test]
async fn concurrency_is_bounded() {
    let bundle = test_receiver::bundle("1.3.0");
    let gauge = Arc::new(Gauge::default());
    let mut receivers = Vec::new();
    for _ in 0..6 {
        receivers.push(Receiver::start_full(Mode::Ok, None, Some(gauge.clone())).await);
    }
    let targets: Vec<Target> = receivers
        .iter()
        .enumerate()
        .map(|(i, r)| target(&format!("s{i}"), r))
        .collect();
    let cfg = PushConfig {
        concurrency: 2,
        ..cfg()
    };
    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg,
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(report.outcome, Outcome::Deployed, "{report:#?}");
    // Each deploy holds its slot for 100 ms, so two run together, never three.
    assert_eq!(gauge.max.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn after_a_failure_later_targets_are_not_sent_the_bundle() {
    let bundle = test_receiver::bundle("1.3.0");
    let rejecting = Receiver::start(Mode::Reject400).await;
    let later = Receiver::start(Mode::Ok).await;
    let cfg = PushConfig {
        concurrency: 1,
        ..cfg()
    };
    let targets = [target("first", &rejecting), target("later", &later)];
    let rec = Recorder::default();
    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg,
        Fenced::default(),
        &rec,
    )
    .await;
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(state_of(&report, "later"), TargetState::NotAttempted);
    assert_eq!(later.deploys(), 0);
    assert!(
        matches!(&rec.of("later")[..], [PushEvent::Failed { reason }] if reason.starts_with("not sent"))
    );
}

#[tokio::test]
async fn an_unreadable_target_stops_the_push_before_anything_is_sent() {
    let bundle = test_receiver::bundle("1.3.0");
    let ok = Receiver::start(Mode::Ok).await;
    let gone = closed_port_target().await;
    let cfg = PushConfig {
        retries: 1,
        ..cfg()
    };
    let targets = [target("ok", &ok), gone];
    let report = push(
        &http(),
        &bundle,
        ENV,
        &targets,
        &cfg,
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(report.outcome, Outcome::RolledBack, "{report:#?}");
    assert_eq!(ok.deploys(), 0);
    assert_eq!(state_of(&report, "ok"), TargetState::NotAttempted);
    let g = target_report(&report, "gone");
    assert_eq!(g.state, TargetState::Failed);
    assert!(
        g.detail.contains("connection failed") && g.detail.contains("2 attempt"),
        "{}",
        g.detail
    );
}

async fn closed_port_target() -> Target {
    Target::new("gone", &test_receiver::closed_port_url().await, None)
}

#[tokio::test]
async fn get_active_and_rollback_follow_the_protocol() {
    let bundle = test_receiver::bundle("1.3.0");
    let r = Receiver::with_active(Mode::Ok, OLD, "1.2.0").await;
    let t = target("A", &r);
    let c = http();
    assert_eq!(
        get_active(&c, &t, "42", &cfg()).await.unwrap(),
        Some(ActiveRecord {
            digest: OLD.into(),
            version: "1.2.0".into(),
            policy_id: String::new(),
            env: None,
            activated_at: String::new(),
            hook_failed: None,
        })
    );
    push(
        &c,
        &bundle,
        ENV,
        std::slice::from_ref(&t),
        &cfg(),
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(
        get_active(&c, &t, "42", &cfg())
            .await
            .unwrap()
            .unwrap()
            .digest,
        bundle.digest
    );

    rollback(&c, &t, back_to("42", OLD), &cfg()).await.unwrap();
    assert_eq!(r.active().as_deref(), Some(OLD));
    // A digest the service never had: a 4xx, reported with the status.
    let err = rollback(&c, &t, back_to("42", OTHER_DIGEST), &cfg())
        .await
        .unwrap_err();
    assert!(
        matches!(err, PushError::Http(HttpError::Status { status: 404, .. })),
        "{err}"
    );
    assert_eq!(err.exit_code(), ExitCode::DeployFailed);

    let empty = Receiver::start(Mode::Ok).await;
    assert_eq!(
        get_active(&c, &target("B", &empty), "42", &cfg())
            .await
            .unwrap(),
        None
    );
    // Accepted, but /active does not show it afterwards.
    let liar = Receiver::with_active(Mode::WrongActive, OLD, "1.2.0").await;
    let err = rollback(&c, &target("C", &liar), back_to("42", OLD), &cfg())
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::Verify { .. }), "{err}");
    assert!(err.to_string().contains(OTHER_DIGEST), "{err}");
}

/// A bundle of `policy_id` at `version`.
fn bundle_of(policy_id: &str, version: &str) -> Bundle {
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    Bundle::seal(
        crate::bundle::Payload {
            manifest: crate::bundle::Manifest {
                policy_id: policy_id.into(),
                version: version.into(),
                source_commit: "0123456789abcdef0123456789abcdef01234567".into(),
                validators: vec![],
            },
            policy: serde_json::json!({"id": policy_id, "version": version}),
        },
        &[&key],
    )
    .unwrap()
}

#[tokio::test]
async fn a_failed_push_of_one_policy_compensates_only_that_policy() {
    let c = http();
    let p42 = bundle_of("42", "1.0.0");
    let p43 = bundle_of("43", "2.0.0");
    let a = Receiver::start(Mode::Ok).await;
    let b = Receiver::start(Mode::Ok).await;
    let both = [target("A", &a), target("B", &b)];
    let r = push(&c, &p42, ENV, &both, &cfg(), Fenced::default(), &()).await;
    assert_eq!(r.outcome, Outcome::Deployed);
    // 43 lands on A, then fails on a broken C: A's 43 is undone (43 was new
    // there, so it is deactivated), and A's 42 is never touched.
    let broken = Receiver::start(Mode::Always500).await;
    let r = push(
        &c,
        &p43,
        ENV,
        &[target("A", &a), target("C", &broken)],
        &PushConfig {
            concurrency: 1,
            ..cfg()
        },
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::RolledBack, "{r:?}");
    assert_eq!(a.active_of("42").as_deref(), Some(p42.digest.as_str()));
    assert_eq!(a.active_of("43"), None);
    assert_eq!(b.active_of("42").as_deref(), Some(p42.digest.as_str()));
    // And a successful 43 leaves 42 active beside it.
    let r = push(&c, &p43, ENV, &both, &cfg(), Fenced::default(), &()).await;
    assert_eq!(r.outcome, Outcome::Deployed);
    for rx in [&a, &b] {
        assert_eq!(rx.active_of("42").as_deref(), Some(p42.digest.as_str()));
        assert_eq!(rx.active_of("43").as_deref(), Some(p43.digest.as_str()));
    }
}

/// An unsigned rollback request (the test receiver checks no proof).
fn back_to<'a>(policy_id: &'a str, to: &'a str) -> RollbackRequest<'a> {
    RollbackRequest {
        policy_id,
        to: Some(to),
        env: ENV,
        signer: None,
        fence: None,
    }
}

#[tokio::test]
async fn a_v1_receiver_is_refused_before_anything_is_sent() {
    let c = http();
    let v1 = Receiver::start(Mode::V1).await;
    let ok = Receiver::start(Mode::Ok).await;
    let bundle = test_receiver::bundle("1.3.0");
    let r = push(
        &c,
        &bundle,
        ENV,
        &[target("OLD", &v1), target("NEW", &ok)],
        &cfg(),
        Fenced::default(),
        &(),
    )
    .await;
    assert_eq!(r.outcome, Outcome::RolledBack);
    assert_eq!(v1.deploys() + ok.deploys(), 0, "nothing may be sent");
    let old = target_report(&r, "OLD");
    assert!(old.detail.contains("protocol v1"), "{}", old.detail);
    let err = get_active(&c, &target("OLD", &v1), "42", &cfg())
        .await
        .unwrap_err();
    assert!(matches!(err, PushError::OldProtocol { .. }), "{err}");
}

#[tokio::test]
async fn no_targets_is_trivially_deployed() {
    let bundle = test_receiver::bundle("1.3.0");
    let report = push(&http(), &bundle, ENV, &[], &cfg(), Fenced::default(), &()).await;
    assert_eq!(report.outcome, Outcome::Deployed);
    assert!(report.targets.is_empty());
}

#[test]
fn the_push_future_is_send() {
    // The CLI may spawn it; a `!Send` push would only show up there.
    fn assert_send<T: Send>(_: &T) {}
    let c = http();
    let bundle = test_receiver::bundle("1.3.0");
    let cfg = cfg();
    let fut = push(&c, &bundle, ENV, &[], &cfg, Fenced::default(), &());
    assert_send(&fut);
}
