//! A sandboxed judge (issue 22 §6): gate plugins (`pde:plugin@0.3.0`, world
//! `gate`) over real parts. The example `mann-whitney-gate` component, built
//! from this source, judges a real rollout against a real Prometheus
//! scraping the rollout tests' exporters (a canary whose agent activates
//! the bad version reports a higher error ratio); `pde plugin test` runs it
//! on samples files; and one host loads 0.1.0, 0.2.0 and 0.3.0 components
//! side by side.

use std::path::{Path, PathBuf};

use crate::rollout::{audit, canary_fleet, code, events, halted_deploy, pde};
use crate::support::{self, Workspace};

/// The per-service series of the error ratio: the wave's (or the
/// baseline's) services, one series each.
const RANGE_QUERY: &str = "pde_test_error_ratio{service=~\"${services_regex}\"}";

fn gate_wasm() -> PathBuf {
    PathBuf::from(pde_plugin_artifacts::wasm("mann-whitney-gate").expect("built"))
}

/// Three services, S0 the canary (a real agent whose exporter turns bad
/// when it activates 1.0.0), S1 and S2 the rest; the canary wave is judged
/// by the Mann-Whitney gate plugin over its 6 s bake.
fn judged_fleet() -> crate::rollout::Fleet {
    judged_by(
        "mann-whitney",
        RANGE_QUERY,
        "1s",
        "alpha = 0.01\nmin_samples = 5\n",
    )
}

/// [`judged_fleet`] with the gate's name, query, step and plugin settings.
fn judged_by(gate: &str, query: &str, step: &str, settings: &str) -> crate::rollout::Fleet {
    let f = canary_fleet(|prom| {
        format!(
            "[environments.production.rollout]\npoll_ms = 100\n\
                 [[environments.production.rollout.waves]]\nname = \"canary\"\ntags = [\"canary\"]\nbake = \"6s\"\n\
                 [[environments.production.rollout.waves.gates]]\nkind = \"plugin\"\nname = \"{gate}\"\n\
                 plugin = \"mann-whitney-gate\"\nurl = \"{prom}\"\nquery = '{query}'\nstep = \"{step}\"\n\
                 [[environments.production.rollout.waves]]\nname = \"rest\"\n"
        )
    });
    f.ws.install_plugin(
        "mann-whitney-gate",
        "gate",
        &gate_wasm(),
        &format!("[settings]\n{settings}"),
        true,
    );
    f.ws.commit("the gate plugin");
    f
}

#[test]
fn a_gate_plugin_fails_a_canary_that_is_statistically_worse_and_everything_goes_back() {
    let f = judged_fleet();
    let message = halted_deploy(f.ws.root());
    assert!(
        message.contains("mann-whitney") && message.contains("p-value"),
        "{message}"
    );
    assert!(message.contains("significantly higher"), "{message}");
    // The canary took 1.0.0 and was sent back; the rest never got a push.
    assert_eq!(support::active_digest(&f.urls[0]), None);
    for r in f.receivers.iter().flatten() {
        assert_eq!(r.deploys(), 0, "a later wave was pushed to");
    }
    assert!(f.ws.tags().is_empty(), "{:?}", f.ws.tags());
    let records = audit(&f.ws);
    let gates = events(&records, "gate_evaluated");
    assert_eq!(gates.len(), 1, "{records:#?}");
    let g = &gates[0]["data"];
    assert_eq!(g["kind"], "plugin");
    assert_eq!(g["verdict"], "fail");
    assert_eq!(g["query"], "pde_test_error_ratio{service=~\"(S0)\"}");
    let stats = g["statistics"].as_array().expect("statistics recorded");
    let stat = |name: &str| {
        stats
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["value"].as_f64())
            .unwrap_or_else(|| panic!("no {name} in {stats:?}"))
    };
    assert!(stat("p-value") < 0.01, "{stats:?}");
    assert!(
        stat("n-wave") >= 5.0 && stat("n-baseline") >= 10.0,
        "{stats:?}"
    );
    assert!(stat("median-wave") > stat("median-baseline"), "{stats:?}");
    assert_eq!(
        events(&records, "rollout_finished")[0]["data"]["outcome"],
        "rolled-back"
    );
}

#[test]
fn a_gate_plugin_passes_a_canary_alike_to_the_baseline_and_the_rollout_ends_tagged() {
    let f = judged_fleet();
    // A version the exporters do not call bad: the canary stays like the rest.
    f.ws.write_policy("42.json", &support::policy_42("1.0.1").to_string());
    f.ws.commit("1.0.1");
    let o = pde(
        f.ws.root(),
        &["deploy", "42", "--env", "production", "--output", "json"],
    );
    assert_eq!(code(&o), 0, "{}", support::both(&o));
    assert_eq!(f.ws.tags(), ["policy/42/v1.0.1/production"]);
    for r in f.receivers.iter().flatten() {
        assert_eq!(r.deploys(), 1, "the last wave was pushed once");
    }
    let records = audit(&f.ws);
    let gates = events(&records, "gate_evaluated");
    assert_eq!(gates.len(), 1, "{records:#?}");
    let g = &gates[0]["data"];
    assert_eq!(
        (g["kind"].as_str(), g["verdict"].as_str()),
        (Some("plugin"), Some("pass"))
    );
    assert!(
        g["detail"]
            .as_str()
            .unwrap()
            .contains("no significant difference"),
        "{g:#}"
    );
}

#[test]
fn a_range_query_answer_too_large_to_read_is_inconclusive_and_says_so() {
    // Every series the real Prometheus holds (18: the exporters' metrics),
    // at a 2 ms step over the 6 s bake: some 3,000 points each, over 1 MiB
    // of answer, more than pde reads (and under Prometheus's own bound of
    // 11,000 points a series). The gate must name the size and what to
    // change, not call the cut-off JSON "not a Prometheus answer".
    let f = judged_by(
        "everything",
        r#"label_replace({__name__=~".+"}, "wave", "${services_regex}", "", "")"#,
        "2ms",
        "min_samples = 5\n",
    );
    let message = halted_deploy(f.ws.root());
    assert!(
        message.contains("larger than the 1 MiB pde reads") && message.contains("coarser `step`"),
        "{message}"
    );
    assert!(!message.contains("not a Prometheus answer"), "{message}");
    let records = audit(&f.ws);
    let gates = events(&records, "gate_evaluated");
    assert_eq!(gates[0]["data"]["verdict"], "inconclusive", "{records:#?}");
    assert_eq!(support::active_digest(&f.urls[0]), None);
    assert!(f.ws.tags().is_empty(), "{:?}", f.ws.tags());
}

#[test]
fn a_gate_plugin_gate_naming_no_gate_plugin_is_refused_when_pde_toml_is_read() {
    let ws = Workspace::new("");
    ws.install_plugin(
        "pii-guard",
        "validator",
        Path::new(pde_plugin_artifacts::PII_GUARD),
        "",
        true,
    );
    let services = [support::Svc {
        name: "S0",
        url: "http://127.0.0.1:9".into(),
        tags: &["api"],
    }];
    let base = std::fs::read_to_string(ws.root().join("pde.toml")).unwrap()
        + &Workspace::env_toml("production", "", &services);
    for (plugin, says) in [
        ("nope", "which is not in"),
        ("pii-guard", "which is a validator, not a gate plugin"),
    ] {
        std::fs::write(
            ws.root().join("pde.toml"),
            format!(
                "{base}[environments.production.rollout]\n\
                 [[environments.production.rollout.waves]]\n\
                 [[environments.production.rollout.waves.gates]]\nkind = \"plugin\"\nname = \"mw\"\n\
                 plugin = \"{plugin}\"\nurl = \"http://127.0.0.1:9\"\nquery = '{RANGE_QUERY}'\n"
            ),
        )
        .unwrap();
        let o = pde(ws.root(), &["plan", "42", "--env", "production"]);
        assert_eq!(code(&o), 2, "{}", support::both(&o));
        let err = support::stderr(&o);
        assert!(err.contains(says) && err.contains("\"mw\""), "{err}");
    }
    // A query that cannot tell the wave from the baseline is refused too.
    std::fs::write(
        ws.root().join("pde.toml"),
        format!(
            "{base}[environments.production.rollout]\n\
             [[environments.production.rollout.waves]]\n\
             [[environments.production.rollout.waves.gates]]\nkind = \"plugin\"\nname = \"mw\"\n\
             plugin = \"pii-guard\"\nurl = \"http://127.0.0.1:9\"\nquery = 'up'\n"
        ),
    )
    .unwrap();
    let o = pde(ws.root(), &["plan", "42", "--env", "production"]);
    assert_eq!(code(&o), 2, "{}", support::both(&o));
    assert!(support::stderr(&o).contains("${services_regex}"));
}

/// `pde plugin test` on a samples file: its verdict, reason and statistics,
/// exit 0 on pass and 8 on fail or inconclusive.
#[test]
fn pde_plugin_test_judges_a_samples_file() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = gate_wasm();
    let run = |name: &str, samples: serde_json::Value, extra: &[&str]| {
        let file = dir.path().join(name);
        std::fs::write(&file, samples.to_string()).unwrap();
        let mut args = vec![
            "plugin".to_string(),
            "test".into(),
            wasm.display().to_string(),
            "--samples".into(),
            file.display().to_string(),
            "--output".into(),
            "json".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        support::pde(dir.path(), &args)
    };
    // Deterministic, overlapping noise: i * 0.37 mod 1.
    let noise = |base: f64, n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| base + (i as f64 * 0.37).fract() * 0.01)
            .collect()
    };
    let policy = serde_json::json!({"id": "42", "version": "1.0.0"});
    let worse = run(
        "worse.json",
        serde_json::json!({"wave": noise(0.02, 40), "baseline": noise(0.01, 40), "policy": policy}),
        &[],
    );
    assert_eq!(support::code(&worse), 8, "{}", support::both(&worse));
    let v = support::json(&worse);
    assert_eq!(v["kind"], "gate");
    assert_eq!(v["verdict"], "fail");
    assert_eq!(
        (v["wave_samples"].as_u64(), v["baseline_samples"].as_u64()),
        (Some(40), Some(40))
    );
    let p = v["statistics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "p-value")
        .unwrap()["value"]
        .as_f64()
        .unwrap();
    assert!(p < 1e-6, "{v:#}");
    // The same samples, [t, v] pairs for the baseline: alike.
    let pairs: Vec<(f64, f64)> = noise(0.01, 40)
        .into_iter()
        .enumerate()
        .map(|(i, v)| (1_700_000_000.0 + i as f64, v))
        .collect();
    let alike = run(
        "alike.json",
        serde_json::json!({"wave": noise(0.01, 40), "baseline": pairs}),
        &[],
    );
    assert_eq!(support::code(&alike), 0, "{}", support::both(&alike));
    assert_eq!(support::json(&alike)["verdict"], "pass");
    // Lower is not worse by default; with direction = "either" it fails.
    let lower = serde_json::json!({"wave": noise(0.0, 40), "baseline": noise(0.01, 40)});
    let o = run("lower.json", lower.clone(), &[]);
    assert_eq!(support::code(&o), 0, "{}", support::both(&o));
    let o = run(
        "lower.json",
        lower,
        &["--settings", r#"{"direction": "either"}"#],
    );
    assert_eq!(support::code(&o), 8, "{}", support::both(&o));
    // Too few samples, or no baseline: inconclusive, which halts a rollout.
    for (name, samples) in [
        (
            "few.json",
            serde_json::json!({"wave": [0.5, 0.5], "baseline": noise(0.01, 40)}),
        ),
        ("alone.json", serde_json::json!({"wave": noise(0.01, 40)})),
    ] {
        let o = run(name, samples, &[]);
        assert_eq!(support::code(&o), 8, "{}", support::both(&o));
        assert_eq!(support::json(&o)["verdict"], "inconclusive", "{name}");
    }
    // Text output names the verdict, the reason and the statistics.
    let file = dir.path().join("worse.json");
    let o = support::pde(
        dir.path(),
        &[
            "plugin",
            "test",
            &wasm.display().to_string(),
            "--samples",
            &file.display().to_string(),
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("verdict: fail: the wave is significantly higher")
            && text.contains("p-value:"),
        "{text}"
    );
    // A malformed samples file, or none, is a usage error.
    let o = run("bad.json", serde_json::json!({"wave": "x"}), &[]);
    assert_eq!(support::code(&o), 2, "{}", support::both(&o));
    let o = support::pde(dir.path(), &["plugin", "test", &wasm.display().to_string()]);
    assert_eq!(support::code(&o), 2, "{}", support::both(&o));
    assert!(support::stderr(&o).contains("--samples"));
}

/// One host binds 0.1.0, 0.2.0 and 0.3.0 components side by side, each by
/// its own version's shim, and calls each.
#[test]
fn plugins_of_every_wit_version_load_side_by_side_with_a_gate() {
    use pde::plugin::{CallContext, GateInput, GateVerdict, PluginHost, PluginKind, PolicyInput};
    let host = PluginHost::new(Default::default(), None).unwrap();
    let keys = pde::keys::TrustedKeys::new();
    let load = |path: &str| host.load_file(Path::new(path), &keys).unwrap();
    let legacy = load(pde_plugin_artifacts::LEGACY_VALIDATOR);
    let current = load(pde_plugin_artifacts::ELIGIBILITY_BOUNDS);
    let gate = load(pde_plugin_artifacts::MANN_WHITNEY_GATE);
    assert_eq!(legacy.wit_version.to_string(), "0.1.0");
    assert_eq!(current.wit_version.to_string(), "0.2.0");
    assert_eq!(
        (gate.wit_version.to_string(), gate.kind),
        ("0.3.0".into(), PluginKind::Gate)
    );
    let policy = PolicyInput {
        id: "42".into(),
        version: "1.0.0".into(),
        document: support::policy_42("1.0.0"),
    };
    let ctx = CallContext::env("production");
    let found = host.validate(&legacy, &policy, &ctx).unwrap().value;
    assert!(found.iter().any(|d| d.code == "legacy.seen"), "{found:?}");
    host.validate(&current, &policy, &ctx).unwrap();
    let samples = |v: f64| pde::plugin::Samples {
        query: "q".into(),
        series: vec![pde::plugin::Series {
            labels: Default::default(),
            samples: (0..20).map(|i| (f64::from(i), v)).collect(),
        }],
    };
    let input = GateInput {
        gate: "g".into(),
        wave: "canary".into(),
        wave_samples: samples(0.5),
        baseline_samples: Some(samples(0.01)),
        ..Default::default()
    };
    let j = host.gate(&gate, &policy, &ctx, &input).unwrap();
    assert_eq!(j.value.verdict, GateVerdict::Fail, "{:?}", j.value);
    // A gate is not a validator: calling it as one is refused by name.
    let e = host.validate(&gate, &policy, &ctx).unwrap_err();
    assert!(e.to_string().contains("gate"), "{e}");
}

/// The example gate is built without `std` (plugins/mann-whitney-gate,
/// `bare.rs`): it asks for no WASI interface at all; a call the size of a
/// rollout's (2 × 1,000 samples) runs in its initial memory, growing none;
/// and a call whose input is larger than that grows memory and judges
/// exactly as the same statistics run natively.
#[test]
fn the_example_gate_imports_nothing_and_grows_memory_only_for_inputs_beyond_its_arena() {
    use pde::plugin::{CallContext, GateInput, GateVerdict, PluginHost, PolicyInput};
    let dir = tempfile::tempdir().unwrap();
    let wasm = gate_wasm();
    let o = support::pde(
        dir.path(),
        &[
            "plugin",
            "inspect",
            &wasm.display().to_string(),
            "--output",
            "json",
        ],
    );
    assert_eq!(support::code(&o), 0, "{}", support::both(&o));
    let imports: Vec<String> = support::json(&o)["imports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().to_string())
        .collect();
    assert_eq!(imports, ["pde:plugin/types@0.3.0"], "{imports:?}");

    let host = PluginHost::new(Default::default(), None).unwrap();
    let gate = host
        .load_file(&wasm, &pde::keys::TrustedKeys::new())
        .unwrap();
    let initial = support::initial_memory_bytes(&std::fs::read(&wasm).unwrap());
    let policy = PolicyInput {
        id: "42".into(),
        version: "1.0.0".into(),
        document: support::policy_42("1.0.0"),
    };
    let values = |base: f64, n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| base + (i as f64 * 0.618_034).fract() * 0.01)
            .collect()
    };
    let samples = |values: &[f64]| pde::plugin::Samples {
        query: "q".into(),
        series: vec![pde::plugin::Series {
            labels: Default::default(),
            samples: values
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, *v))
                .collect(),
        }],
    };
    let judge = |n: usize| {
        let (wave, baseline) = (values(0.010_02, n), values(0.01, n));
        let input = GateInput {
            gate: "g".into(),
            wave: "canary".into(),
            wave_samples: samples(&wave),
            baseline_samples: Some(samples(&baseline)),
            ..Default::default()
        };
        let call = host
            .gate(&gate, &policy, &CallContext::env("production"), &input)
            .unwrap();
        let settings = mann_whitney_gate::Settings::default();
        let (verdict, _, statistics) = mann_whitney_gate::judge(&settings, &wave, Some(&baseline));
        let verdict = match verdict {
            mann_whitney_gate::Verdict::Pass => GateVerdict::Pass,
            mann_whitney_gate::Verdict::Fail => GateVerdict::Fail,
            mann_whitney_gate::Verdict::Inconclusive => GateVerdict::Inconclusive,
        };
        assert_eq!(call.value.verdict, verdict, "{:?}", call.value);
        assert_eq!(call.value.statistics, statistics, "{n} samples a side");
        call.peak_memory_bytes
    };
    assert!(initial > 2 << 20, "initial memory {initial}");
    assert_eq!(judge(1_000), initial, "a rollout-sized call grew memory");
    // 2 × 150,000 points: 4.8 MB of times and values lowered into the
    // guest, more than its whole initial memory, so the heap must grow.
    assert!(judge(150_000) > initial + (4 << 20));
}
