//! Day-2 operations through the `pde` binary, over real parts: readiness
//! checks against a loopback HTTP endpoint and a loopback Prometheus
//! stand-in that speaks `/api/v1/query`, change freezes, and
//! `pde status --live` against `pde agent` processes that are changed
//! behind pde's back or stopped.
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};
use support::{AgentProcess, Svc, Workspace, code, json, pde, stderr};

/// A loopback server standing in for a status endpoint and for Prometheus.
///
/// - `/ready` → 200 `{"status": "green"}`; `/degraded` → 200
///   `{"status": "degraded"}`; `/down` → 503.
/// - `/api/v1/query?query=…` answers as Prometheus does: `quiet` → no
///   series; `ALERTS{severity="critical"}` → two firing alerts; anything
///   else → 400 `bad_data`.
struct StandIn {
    url: String,
    /// The `query` of every `/api/v1/query` request, in order.
    queries: Arc<Mutex<Vec<String>>>,
}

fn stand_in() -> StandIn {
    let queries = Arc::new(Mutex::new(Vec::new()));
    let seen = queries.clone();
    let app = Router::new()
        .route(
            "/ready",
            get(|| async { axum::Json(json!({"status": "green"})) }),
        )
        .route(
            "/degraded",
            get(|| async { axum::Json(json!({"status": "degraded"})) }),
        )
        .route(
            "/down",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "maintenance window") }),
        )
        .route(
            "/api/v1/query",
            get(move |Query(q): Query<HashMap<String, String>>| {
                let seen = seen.clone();
                async move {
                    let query = q.get("query").cloned().unwrap_or_default();
                    seen.lock().unwrap().push(query.clone());
                    prometheus_answer(&query)
                }
            }),
        );
    let listener = support::runtime()
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    support::runtime().spawn(async move { axum::serve(listener, app).await });
    StandIn { url, queries }
}

fn prometheus_answer(query: &str) -> axum::response::Response {
    let series = |name: &str| {
        json!({"metric": {"__name__": "ALERTS", "alertname": name, "alertstate": "firing",
                          "severity": "critical"},
               "value": [1_764_400_000.0, "1"]})
    };
    match query {
        "quiet" => axum::Json(json!({"status": "success",
            "data": {"resultType": "vector", "result": []}}))
        .into_response(),
        r#"ALERTS{severity="critical"}"# => axum::Json(json!({"status": "success",
            "data": {"resultType": "vector",
                     "result": [series("DiskFull"), series("EligibilityApiDown")]}}))
        .into_response(),
        _ => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"status": "error", "errorType": "bad_data",
                "error": "invalid parameter \"query\": 1:5: parse error: unclosed left parenthesis"})),
        )
            .into_response(),
    }
}

/// A workspace whose `prod` environment has one real agent and `checks`
/// (TOML of `[[environments.prod.checks]]` tables), committed.
fn workspace_with(checks: &str) -> (Workspace, AgentProcess) {
    let ws = Workspace::new("");
    let agent = AgentProcess::start(&ws.root().join("agents/api"), &ws.release_pub());
    let env = Workspace::env_toml(
        "prod",
        "",
        &[Svc {
            name: "HMS-API",
            url: agent.url.clone(),
            tags: &["api"],
        }],
    );
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap() + &env + checks;
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");
    (ws, agent)
}

fn http_check(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[environments.prod.checks]]\nkind = \"http\"\nname = \"{name}\"\nurl = \"{url}\"\n{extra}\n"
    )
}

fn prometheus_check(name: &str, url: &str, query: &str) -> String {
    format!(
        "[[environments.prod.checks]]\nkind = \"prometheus\"\nname = \"{name}\"\nurl = \"{url}\"\nquery = '{query}'\n"
    )
}

fn freeze_check(name: &str, start: &str, end: &str) -> String {
    format!(
        "[[environments.prod.checks]]\nkind = \"freeze\"\nname = \"{name}\"\nstart = \"{start}\"\n\
         end = \"{end}\"\ntimezone = \"America/New_York\"\n"
    )
}

/// A window that holds now and for the rest of any test run.
fn freeze_now(name: &str) -> String {
    freeze_check(name, "2000-01-01T00:00:00", "2999-01-01T00:00:00")
}

/// The audit records of policy 42, through the binary.
fn audit(ws: &Workspace) -> Vec<Value> {
    let o = pde(
        ws.root(),
        &["audit", "show", "--policy", "42", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    json(&o).as_array().unwrap().clone()
}

fn events(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect()
}

/// Deploys 42 to prod; asserts exit 4 with the one check named `check`
/// failing with a detail containing `says`, nothing on the agent, and
/// `env_check_failed` (and no push) in the audit log.
fn assert_refused(checks: &str, check: &str, says: &str) {
    let (ws, agent) = workspace_with(checks);
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "prod", "--output", "json"],
    );
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let out = json(&o);
    assert_eq!(out["exit_code"], 4);
    // The whole report so far; the failing step's part is its `health`.
    assert_eq!(out["failed_step"], "health");
    let report = &out["report"]["health"];
    assert_eq!(report["services"][0]["healthy"], true, "{report:#}");
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == check)
        .unwrap_or_else(|| panic!("no check {check} in {report:#}"));
    assert_eq!(c["passed"], false, "{c:#}");
    let detail = c["detail"].as_str().unwrap();
    assert!(detail.contains(says), "{check}: {detail}");
    assert!(
        out["error"]
            .as_str()
            .unwrap()
            .contains(&format!("check {check}")),
        "{out:#}"
    );

    // Nothing was pushed: the agent runs nothing, and the log says why.
    assert!(support::active_policies(&agent.url).is_empty());
    let records = audit(&ws);
    let names = events(&records);
    assert_eq!(
        names,
        [
            "deploy_start",
            "validated",
            "packaged",
            "env_check_failed",
            "deploy_failed"
        ],
        "{records:#?}"
    );
    let failed = &records[3]["data"];
    assert!(
        failed["failing"].as_str().unwrap().contains(says),
        "{failed:#}"
    );
    assert_eq!(code(&pde(ws.root(), &["audit", "verify"])), 0);
}

#[test]
fn an_http_check_answering_an_error_status_refuses_the_deploy() {
    let s = stand_in();
    assert_refused(
        &http_check("gateway", &format!("{}/down", s.url), ""),
        "gateway",
        "503",
    );
}

#[test]
fn an_http_check_whose_json_field_differs_refuses_the_deploy() {
    let s = stand_in();
    assert_refused(
        &http_check(
            "gateway",
            &format!("{}/degraded", s.url),
            "json_field = \"/status\"\nequals = \"green\"",
        ),
        "gateway",
        r#"/status is "degraded", expected "green""#,
    );
}

#[test]
fn a_prometheus_query_with_series_refuses_the_deploy_naming_them() {
    let s = stand_in();
    assert_refused(
        &prometheus_check(
            "no-critical-alerts",
            &s.url,
            r#"ALERTS{severity="critical"}"#,
        ),
        "no-critical-alerts",
        r#"returned 2 series: ALERTS{alertname="DiskFull""#,
    );
    assert_eq!(
        *s.queries.lock().unwrap(),
        [r#"ALERTS{severity="critical"}"#],
        "the query reached Prometheus intact, once"
    );
}

#[test]
fn a_prometheus_error_refuses_the_deploy() {
    let s = stand_in();
    assert_refused(
        &prometheus_check("no-critical-alerts", &s.url, "sum(rate(x[5m]"),
        "no-critical-alerts",
        "bad_data: invalid parameter",
    );
}

#[test]
fn an_unreachable_prometheus_refuses_the_deploy() {
    // Bound, then closed: nothing listens there.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", gone.local_addr().unwrap());
    drop(gone);
    assert_refused(
        &prometheus_check("no-critical-alerts", &url, "quiet"),
        "no-critical-alerts",
        "connection failed",
    );
}

#[test]
fn an_active_freeze_refuses_the_deploy() {
    assert_refused(&freeze_now("holidays"), "holidays", "--override-freeze");
}

#[test]
fn passing_checks_let_the_deploy_through() {
    let s = stand_in();
    let checks = http_check(
        "gateway",
        &format!("{}/ready", s.url),
        "json_field = \"/status\"\nequals = \"green\"",
    ) + &prometheus_check("no-critical-alerts", &s.url, "quiet")
        + &freeze_check("last-year", "2001-12-24T00:00:00", "2001-12-26T00:00:00");
    let (ws, agent) = workspace_with(&checks);
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "prod", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let report = json(&o);
    let checks = report["health"]["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 3);
    assert!(checks.iter().all(|c| c["passed"] == true), "{checks:#?}");
    assert_eq!(
        support::active_digest(&agent.url).as_deref(),
        report["digest"].as_str()
    );
    let records = audit(&ws);
    let ok = records
        .iter()
        .find(|r| r["event"] == "env_check_ok")
        .unwrap();
    assert_eq!(ok["data"]["checks"].as_array().unwrap().len(), 3);
    assert!(ok["data"].get("freeze_override").is_none(), "{ok:#}");
}

#[test]
fn a_freeze_override_lets_the_deploy_through_and_is_audited() {
    let (ws, agent) = workspace_with(&freeze_now("holidays"));
    assert_eq!(
        code(&pde(ws.root(), &["deploy", "42", "--env", "prod"])),
        4,
        "refused without an override"
    );
    // A blank reason is no reason.
    let o = pde(
        ws.root(),
        &["deploy", "42", "--env", "prod", "--override-freeze", "  "],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(support::active_policies(&agent.url).is_empty());

    let reason = "INC-4711: eligibility hotfix approved by CAB";
    let o = pde(
        ws.root(),
        &[
            "deploy",
            "42",
            "--env",
            "prod",
            "--override-freeze",
            reason,
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let report = json(&o);
    assert_eq!(report["outcome"], "deployed");
    assert_eq!(report["health"]["checks"][0]["overridden"], reason);
    assert_eq!(
        support::active_digest(&agent.url).as_deref(),
        report["digest"].as_str()
    );

    let records = audit(&ws);
    let ok: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "env_check_ok")
        .collect();
    assert_eq!(ok.len(), 1, "{records:#?}");
    assert_eq!(ok[0]["data"]["freeze_override"]["reason"], reason);
    assert_eq!(
        ok[0]["data"]["freeze_override"]["checks"],
        json!(["holidays"])
    );
    assert_eq!(events(&records).last().unwrap(), "deployed");
    assert_eq!(code(&pde(ws.root(), &["audit", "verify"])), 0);
}

#[test]
fn env_check_lists_every_service_and_every_check() {
    let s = stand_in();
    let checks = http_check("gateway", &format!("{}/ready", s.url), "")
        + &prometheus_check(
            "no-critical-alerts",
            &s.url,
            r#"ALERTS{severity="critical"}"#,
        )
        + &freeze_check("last-year", "2001-12-24T00:00:00", "2001-12-26T00:00:00");
    let (ws, _agent) = workspace_with(&checks);

    let o = pde(ws.root(), &["env", "check", "prod", "--output", "json"]);
    assert_eq!(code(&o), 4, "a failing check is an unhealthy environment");
    let report = json(&o);
    assert_eq!(report["services"][0]["service"], "HMS-API");
    assert_eq!(report["services"][0]["healthy"], true);
    let checks: Vec<(&str, &str, bool)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["kind"].as_str().unwrap(),
                c["passed"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        checks,
        [
            ("gateway", "http", true),
            ("no-critical-alerts", "prometheus", false),
            ("last-year", "freeze", true)
        ]
    );

    let o = pde(ws.root(), &["env", "check", "prod"]);
    assert_eq!(code(&o), 4);
    let text = String::from_utf8(o.stdout).unwrap();
    for line in [
        "HMS-API",
        "check gateway",
        "check no-critical-alerts",
        "check last-year",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.contains("no-critical-alerts") && l.contains("FAILED")),
        "{text}"
    );
    // Checking deploys nothing and audits nothing.
    assert!(!ws.root().join(".pde/audit.jsonl").exists());
}

/// A rollback sent straight to an agent, behind pde's back, by someone who
/// holds the release key (push protocol v3 requires its signature).
fn rollback_on(ws: &Workspace, agent: &str, policy_id: &str) {
    let key = pde::keys::load_signing_key(&ws.root().join("keys/release.ed25519")).unwrap();
    // A key holder mints a fence from the clock, as pde does (push
    // protocol v4): agents refuse an unfenced one once they saw a fence.
    let fence = Some(pde_core::fence::now_micros());
    let body =
        pde_core::rollback::request_body(policy_id, None, "prod", fence, Some(&key)).unwrap();
    support::runtime().block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{agent}/rollback"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    });
}

/// `(service, policy) → state` of a `status --live --output json` report.
fn live_states(report: &Value) -> Vec<(String, String, String)> {
    report["services"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["policies"].as_array().unwrap().iter().map(move |p| {
                (
                    s["service"].as_str().unwrap().to_string(),
                    p["policy_id"].as_str().unwrap().to_string(),
                    p["state"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect()
}

#[test]
fn status_live_is_clean_after_deploys_and_finds_drift_made_behind_pdes_back() {
    let ws = Workspace::new("");
    let mut agents: Vec<AgentProcess> = ["a", "b", "c"]
        .iter()
        .map(|n| AgentProcess::start(&ws.root().join("agents").join(n), &ws.release_pub()))
        .collect();
    let names = ["HMS-API", "HMS-PORTAL", "HMS-SCHEDULER"];
    let services: Vec<Svc> = agents
        .iter()
        .zip(names)
        .map(|(a, name)| Svc {
            name,
            url: a.url.clone(),
            tags: &["api"],
        })
        .collect();
    let toml = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap()
        + &Workspace::env_toml("prod", "", &services);
    std::fs::write(ws.root().join("pde.toml"), toml).unwrap();
    ws.commit("init");

    let first = pde(
        ws.root(),
        &["deploy", "42", "--env", "prod", "--output", "json"],
    );
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let first = json(&first)["digest"].as_str().unwrap().to_string();
    ws.write_policy("42.json", &support::policy_42("1.1.0").to_string());
    ws.commit("42 v1.1.0");
    let second = pde(
        ws.root(),
        &["deploy", "42", "--env", "prod", "--output", "json"],
    );
    assert_eq!(code(&second), 0, "{}", stderr(&second));
    let second = json(&second)["digest"].as_str().unwrap().to_string();

    // Clean: every service runs what pde deployed there.
    let o = pde(ws.root(), &["status", "--live", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let clean = json(&o);
    assert_eq!(clean["drift"], 0);
    assert_eq!(
        live_states(&clean),
        names
            .iter()
            .map(|n| (n.to_string(), "42".to_string(), "in-sync".to_string()))
            .collect::<Vec<_>>()
    );
    let o = pde(ws.root(), &["status", "--live", "--env", "prod"]);
    assert_eq!(code(&o), 0);
    assert!(String::from_utf8(o.stdout).unwrap().contains("in-sync"));

    // Behind pde's back: the API goes back one version, the portal loses the
    // policy altogether, and the scheduler stops answering.
    rollback_on(&ws, &agents[0].url, "42");
    rollback_on(&ws, &agents[1].url, "42");
    rollback_on(&ws, &agents[1].url, "42");
    agents[2].stop();

    let o = pde(
        ws.root(),
        &["status", "--live", "--env", "prod", "--output", "json"],
    );
    assert_eq!(code(&o), 4, "drift exits 4: {}", stderr(&o));
    let drift = json(&o);
    assert_eq!(drift["drift"], 3, "{drift:#}");
    assert_eq!(
        live_states(&drift),
        [
            ("HMS-API".into(), "42".into(), "other-digest".into()),
            ("HMS-PORTAL".into(), "42".into(), "missing".into()),
            ("HMS-SCHEDULER".into(), "42".into(), "no-answer".into()),
        ]
    );
    let api = &drift["services"][0]["policies"][0];
    assert_eq!(api["expected"]["digest"], second.as_str());
    assert_eq!(api["actual"]["digest"], first.as_str());
    assert_eq!(api["actual"]["version"], "1.0.0");
    assert!(
        drift["services"][2]["error"]
            .as_str()
            .unwrap()
            .contains("connection failed"),
        "{drift:#}"
    );

    // The human table says the same, and `pde status` alone still shows
    // only what pde recorded.
    let o = pde(ws.root(), &["status", "--live"]);
    assert_eq!(code(&o), 4);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("HMS-API") && l.contains("OTHER-DIGEST DRIFT")),
        "{text}"
    );
    assert!(text.contains("NO ANSWER"), "{text}");
    assert!(text.contains("3 finding(s) of drift"), "{text}");
    assert_eq!(code(&pde(ws.root(), &["status"])), 0);
}

#[test]
fn status_live_shows_policies_pde_does_not_know_as_information() {
    // Two workspaces share one agent: each one's policy is foreign to the other.
    let ours = Workspace::new("");
    let agent = AgentProcess::start(&ours.root().join("agents/api"), &ours.release_pub());
    let env = Workspace::env_toml(
        "prod",
        "",
        &[Svc {
            name: "HMS-API",
            url: agent.url.clone(),
            tags: &["api"],
        }],
    );
    let toml = std::fs::read_to_string(ours.root().join("pde.toml")).unwrap() + &env;
    std::fs::write(ours.root().join("pde.toml"), toml).unwrap();
    ours.write_policy("43.json", &{
        let mut p = support::policy_42("1.0.0");
        p["id"] = json!("43");
        p["rules"] = json!([{"key": "other.rule", "category": "eligibility", "value": 1,
                                 "description": "another policy's rule"}]);
        p.to_string()
    });
    ours.commit("init");
    // 43 goes to the agent as another tool would: pde's state never hears of it.
    let out = ours.root().join("out");
    let o = pde(
        ours.root(),
        &[
            "package",
            "43",
            "-o",
            out.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let bundle = std::fs::read(json(&o)["path"].as_str().unwrap()).unwrap();
    let bundle: Value = serde_json::from_slice(&bundle).unwrap();
    support::runtime().block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{}/deploy", agent.url))
            .header(
                "Idempotency-Key",
                format!("{}:prod", bundle["digest"].as_str().unwrap()),
            )
            .json(&json!({"bundle": bundle, "env": "prod"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    });
    let o = pde(ours.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    let o = pde(ours.root(), &["status", "--live", "--output", "json"]);
    assert_eq!(code(&o), 0, "information is not drift: {}", stderr(&o));
    let report = json(&o);
    assert_eq!(
        live_states(&report),
        [
            ("HMS-API".into(), "42".into(), "in-sync".into()),
            ("HMS-API".into(), "43".into(), "unrecorded".into()),
        ]
    );
}

/// Issue 21 item 5: deleting a committed freeze from the work tree's
/// pde.toml does not lift it. The deploy refuses (exit 2, naming pde.toml),
/// pushes nothing, and a deploy under the committed configuration records
/// its commit and digest.
#[test]
fn an_uncommitted_edit_of_pde_toml_cannot_drop_a_freeze() {
    let (ws, agent) = workspace_with(&freeze_now("holidays"));
    let path = ws.root().join("pde.toml");
    let committed = std::fs::read_to_string(&path).unwrap();
    let unfrozen = committed[..committed.find("[[environments.prod.checks]]").unwrap()].to_string();
    std::fs::write(&path, &unfrozen).unwrap();
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("pde.toml has uncommitted changes"),
        "{}",
        stderr(&o)
    );
    assert!(support::active_policies(&agent.url).is_empty());
    // The refusal is in the audit log.
    let records = audit(&ws);
    assert_eq!(events(&records).last().unwrap(), "deploy_failed");

    // Committed, the edit takes effect and the record names it.
    ws.commit("lift the freeze");
    let o = pde(ws.root(), &["deploy", "42", "--env", "prod"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let head = support::git(ws.root(), &["rev-parse", "HEAD"]);
    let start = audit(&ws)
        .into_iter()
        .rfind(|r| r["event"] == "deploy_start")
        .unwrap();
    assert_eq!(start["data"]["config"]["commit"], head.trim());
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(unfrozen.as_bytes()));
    assert_eq!(start["data"]["config"]["sha256"], sum);
}
