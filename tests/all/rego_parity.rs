//! The Rego port of `eligibility-bounds` (host/engine/benches/rego/eligibility.rego),
//! run on regorus, gives the same findings as the real wasm plugin run in
//! the sandbox: on hand-written policies that reach every finding, and on
//! seeded random ones. The plugin_call bench compares their speed, which
//! only means something while they do the same work.
//!
//! Findings are compared as (severity, JSON pointer, code): messages are not
//! ported.

use std::collections::BTreeSet;
use std::path::PathBuf;

use pde::keys::TrustedKeys;
use pde::plugin::{CallContext, Plugin, PluginHost, PolicyInput};
use serde_json::{Value, json};

const REGO: &str = include_str!("../../host/engine/benches/rego/eligibility.rego");

type Finding = (String, String, String);

fn host_and_plugin() -> (PluginHost, Plugin) {
    let host = PluginHost::new(Default::default(), None).unwrap();
    let wasm = PathBuf::from(pde_plugin_artifacts::wasm("eligibility-bounds").expect("artifact"));
    let plugin = host.load_file(&wasm, &TrustedKeys::new()).unwrap();
    (host, plugin)
}

fn rego_engine() -> regorus::Engine {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy("eligibility.rego".into(), REGO.into())
        .unwrap();
    engine
}

fn document(agency: &str, rules: Value) -> Value {
    json!({
        "id": "42", "version": "1.0.0", "title": "t", "agency": agency,
        "effective": "2030-01-01", "approvals": [], "rules": rules, "config": {}
    })
}

fn sandboxed(
    host: &PluginHost,
    plugin: &Plugin,
    doc: &Value,
    settings: &Value,
) -> BTreeSet<Finding> {
    let mut plugin = plugin.clone();
    plugin.settings = settings.clone();
    let input = PolicyInput {
        id: "42".into(),
        version: "1.0.0".into(),
        document: doc.clone(),
    };
    host.validate(&plugin, &input, &CallContext::default())
        .unwrap()
        .value
        .into_iter()
        .map(|d| {
            let v = serde_json::to_value(&d).unwrap();
            (
                v["severity"].as_str().unwrap().to_string(),
                d.path.clone(),
                d.code.clone(),
            )
        })
        .collect()
}

fn rego(engine: &mut regorus::Engine, doc: &Value, settings: &Value) -> BTreeSet<Finding> {
    let input = json!({"policy": doc, "settings": settings}).to_string();
    engine.set_input(regorus::Value::from_json_str(&input).unwrap());
    let out = engine
        .eval_rule("data.eligibility.findings".into())
        .unwrap();
    let out: Value = serde_json::from_str(&out.to_json_str().unwrap()).unwrap();
    out.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap().to_string();
            (s("severity"), s("path"), s("code"))
        })
        .collect()
}

#[test]
fn rego_port_and_plugin_agree_on_every_kind_of_finding() {
    let (host, plugin) = host_and_plugin();
    let mut engine = rego_engine();
    let rules = json!([
        {"key": "form.title", "category": "forms", "value": "x"},
        {"key": "snap.max_age", "category": "eligibility", "value": 650},
        {"key": "snap.max_income", "category": "eligibility", "value": -1},
        {"key": "snap.copay_pct", "category": "eligibility", "value": 250},
        {"key": "age_band", "category": "eligibility", "value": {"min": 70, "max": 20}},
        {"key": "age_cap", "category": "eligibility", "value": {"min": 0, "max": 200}},
        {"key": "income_cap", "category": "eligibility", "value": "lots"},
        {"key": "copay_percent", "category": "eligibility", "value": 0.2},
        {"key": "Household-Income-Cap", "category": "eligibility", "value": {"min": "a", "max": 5}},
        {"key": "wages.limit", "category": "eligibility"},
        {"key": "page_limit", "category": "eligibility", "value": 10000},
        {"key": "max_age_other", "category": "payments", "value": 999},
        {"key": "ages", "category": "eligibility", "value": {"other": 1}},
        {"key": "salary", "category": "eligibility", "value": {"max": 2000000}},
        {"key": 7, "category": "eligibility", "value": 1000},
        "not a rule"
    ]);
    let cases = [
        (document("HHS", rules.clone()), json!({})),
        (
            document("County", rules.clone()),
            json!({"income": {"max": 100000}, "agencies": {"County": {"income": {"max": 50000}, "age": {"min": 18}}}}),
        ),
        (
            document("State", rules.clone()),
            json!({"categories": ["eligibility", "payments"], "percent": {"min": 5}}),
        ),
    ];
    for (doc, settings) in &cases {
        let expected = sandboxed(&host, &plugin, doc, settings);
        assert!(
            expected.len() >= 8,
            "the cases reach the findings: {expected:?}"
        );
        assert_eq!(
            rego(&mut engine, doc, settings),
            expected,
            "settings {settings}"
        );
    }
}

/// xorshift64*: a seeded, dependency-free generator, so a failure names a
/// seed that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn number(&mut self) -> Value {
        match self.below(6) {
            0 => json!(self.below(200) as i64 - 20),
            1 => json!(self.below(2_000_000) as i64 - 1000),
            2 => json!(self.below(1000) as f64 / 1000.0),
            3 => json!(self.below(130)),
            // The bounds' edges, where an off-by-one would show.
            4 => json!(self.pick(&[100.0, 100.5, 101.0, 120.0, 121.0, -1.0, 1e6, 1e6 + 1.0])),
            _ => json!(0),
        }
    }
}

fn random_rule(rng: &mut Rng) -> Value {
    let words = [
        "age",
        "ages",
        "Age",
        "income",
        "EARNINGS",
        "wages",
        "salary",
        "percent",
        "percentage",
        "pct",
        "page",
        "cap",
        "max",
        "min",
        "snap",
        "storage",
        "copay",
    ];
    let seps = [".", "_", "-", " ", "", "é"];
    let parts = 1 + rng.below(3);
    let mut key = String::new();
    for i in 0..parts {
        if i > 0 {
            key.push_str(rng.pick(&seps));
        }
        key.push_str(rng.pick(&words));
    }
    let value = match rng.below(8) {
        0..=3 => rng.number(),
        4 => json!({"min": rng.number(), "max": rng.number()}),
        5 => json!({"max": rng.number()}),
        6 => json!({"min": rng.number(), "max": "x"}),
        _ => json!(rng.pick(&["text", "", "null"])),
    };
    let category = rng.pick(&["eligibility", "eligibility", "forms", "payments"]);
    if rng.below(20) == 0 {
        return json!({"key": key, "category": category});
    }
    json!({"key": key, "category": category, "value": value})
}

#[test]
fn rego_port_and_plugin_agree_on_random_policies() {
    let (host, plugin) = host_and_plugin();
    let mut engine = rego_engine();
    let settings = [
        json!({}),
        json!({"age": {"max": 99}, "agencies": {"B": {"age": {"min": 21}, "percent": {"max": 50}}}}),
        json!({"categories": ["payments"], "income": {"min": 100, "max": 50000}}),
    ];
    let cases: u64 = std::env::var("PDE_PARITY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut compared = 0;
    for seed in 1..=cases {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let rules: Vec<Value> = (0..rng.below(25)).map(|_| random_rule(&mut rng)).collect();
        let doc = document(rng.pick(&["A", "B"]), Value::Array(rules));
        let settings = &settings[rng.below(settings.len() as u64) as usize];
        let expected = sandboxed(&host, &plugin, &doc, settings);
        compared += expected.len();
        assert_eq!(
            rego(&mut engine, &doc, settings),
            expected,
            "seed {seed}: {doc}"
        );
    }
    assert!(
        compared > cases as usize,
        "random policies produce findings ({compared})"
    );
}
