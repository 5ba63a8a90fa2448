//! What the plugin benches share: the policy they all measure.

use pde::plugin::PolicyInput;
use serde_json::{Value, json};

/// A DESIGN §8 policy with `n` eligibility rules (ages, income ranges,
/// percentages), one in ten out of range, so diagnostics cross the
/// boundary too.
pub fn policy(n: usize) -> PolicyInput {
    let rules: Vec<Value> = (0..n)
        .map(|i| {
            let (key, value) = match i % 3 {
                0 => (format!("min_age_{i}"), json!(if i % 10 == 0 { 150 } else { 18 })),
                1 => (format!("income_cap_{i}"), json!({"min": 0, "max": 40000 + i})),
                _ => (format!("copay_percent_{i}"), json!(if i % 10 == 2 { 0.5 } else { 20.0 })),
            };
            json!({"key": key, "category": "eligibility", "value": value, "description": "generated"})
        })
        .collect();
    PolicyInput {
        id: "42".into(),
        version: "1.3.0".into(),
        document: json!({
            "id": "42", "version": "1.3.0", "title": "bench", "agency": "Department of Human Services",
            "effective": "2099-01-01", "approvals": [], "rules": rules, "config": {}
        }),
    }
}
