//! The version of the policy active in the target environment, and what
//! changed since.
//!
//! Since `pde:plugin@0.2.0` the host tells a plugin which version of the
//! policy is active where it deploys (`context.active`), so a validator can
//! judge the change and not only the new document: "a benefit cut of more
//! than 10% needs an effective date 90 days ahead", "a rule removed since the
//! active version must be listed in the change notes". [`ActivePolicy`] wraps
//! it with the same typed views as [`Policy`], and [`ActivePolicy::rule_changes`]
//! pairs the rules of both versions by key.
//!
//! There is no active version (`ctx.active()` is `None`) on a first deploy,
//! without an environment, and in the environment-neutral run whose findings
//! are recorded in the bundle: a finding about the change blocks the deploy
//! but never enters the bundle, which must not depend on the environment.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::policy::{Policy, Rule};

/// The version of the policy that is active in the target environment.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivePolicy {
    policy: Policy,
    digest: String,
    deployed_at: String,
}

impl ActivePolicy {
    /// Builds an active version from its parts (use in unit tests).
    pub fn new(policy: Policy, digest: impl Into<String>, deployed_at: impl Into<String>) -> Self {
        ActivePolicy {
            policy,
            digest: digest.into(),
            deployed_at: deployed_at.into(),
        }
    }

    /// An active version from a document alone: version and id are read
    /// from it; digest and deployment time are empty. Handy in unit tests
    /// with `serde_json::json!`.
    pub fn from_value(document: Value) -> Self {
        Self::new(Policy::from_value(document), "", "")
    }

    /// Its semver version, e.g. `"1.2.0"`.
    pub fn version(&self) -> &str {
        self.policy.version()
    }

    /// The digest of its bundle, `"sha256:<hex>"`; empty when it was given
    /// without one (`pde plugin test --active` with a plain document).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// When it became active in the environment, RFC 3339 UTC; empty when
    /// unknown.
    pub fn deployed_at(&self) -> &str {
        &self.deployed_at
    }

    /// The active document, with the typed views of [`Policy`] (`rules()`,
    /// `effective()`, `config()`, …).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What changed in the rules from this (active) version to `new`,
    /// pairing rules by `key`: changed and added rules in `new`'s order,
    /// then removed ones in the active version's order. A rule is changed
    /// when anything in it differs (value, category, description or any
    /// other field). Rules without a key are not paired.
    ///
    /// ```
    /// use pde_plugin::{ActivePolicy, Policy, RuleChange};
    /// use pde_plugin::serde_json::json;
    ///
    /// let active = ActivePolicy::from_value(json!({"version": "1.0.0", "rules": [
    ///     {"key": "a", "value": 100}, {"key": "b", "value": 1}]}));
    /// let new = Policy::from_value(json!({"version": "2.0.0", "rules": [
    ///     {"key": "a", "value": 80}, {"key": "c", "value": 2}]}));
    /// let changes = active.rule_changes(&new);
    /// assert_eq!(changes.iter().map(RuleChange::key).collect::<Vec<_>>(), ["a", "c", "b"]);
    /// assert!(matches!(changes[0], RuleChange::Changed { .. }));
    /// assert_eq!(changes[0].relative_change(), Some(-0.2));
    /// assert!(matches!(changes[2], RuleChange::Removed { .. }));
    /// ```
    pub fn rule_changes<'a>(&'a self, new: &'a Policy) -> Vec<RuleChange<'a>> {
        // Indexed by key: a policy may have thousands of rules, and fuel is
        // the plugin's budget.
        let index = |rules: &[Rule<'a>]| -> BTreeMap<&'a str, Rule<'a>> {
            let mut map = BTreeMap::new();
            for rule in rules {
                if let Some(key) = rule.key {
                    map.entry(key).or_insert(*rule);
                }
            }
            map
        };
        let old_rules = self.policy.rules();
        let new_rules = new.rules();
        let (old_by_key, new_by_key) = (index(&old_rules), index(&new_rules));
        let mut out = Vec::new();
        for rule in new_rules.iter() {
            let Some(key) = rule.key else { continue };
            match old_by_key.get(key) {
                None => out.push(RuleChange::Added { new: *rule }),
                Some(old) if old.raw != rule.raw => out.push(RuleChange::Changed {
                    old: *old,
                    new: *rule,
                }),
                Some(_) => {}
            }
        }
        for old in old_rules.iter() {
            if old.key.is_some_and(|key| !new_by_key.contains_key(key)) {
                out.push(RuleChange::Removed { old: *old });
            }
        }
        out
    }
}

/// One difference between the rules of the active version and the new one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RuleChange<'a> {
    /// A rule the active version does not have.
    Added {
        /// The rule in the new policy.
        new: Rule<'a>,
    },
    /// A rule of the active version that the new policy drops.
    Removed {
        /// The rule in the active policy (its `index` and pointers refer to
        /// the active document, not the new one).
        old: Rule<'a>,
    },
    /// A rule both have, with something in it changed.
    Changed {
        /// The rule in the active policy.
        old: Rule<'a>,
        /// The rule in the new policy.
        new: Rule<'a>,
    },
}

impl<'a> RuleChange<'a> {
    /// The rule key.
    pub fn key(&self) -> &'a str {
        let rule = match self {
            RuleChange::Added { new } | RuleChange::Changed { new, .. } => new,
            RuleChange::Removed { old } => old,
        };
        rule.key.unwrap_or_default()
    }

    /// For a changed rule whose value is a number in both versions, the
    /// relative change `(new - old) / |old|`: `-0.2` is a 20% cut. `None`
    /// otherwise, and when the old value is 0.
    pub fn relative_change(&self) -> Option<f64> {
        let RuleChange::Changed { old, new } = self else {
            return None;
        };
        let (a, b) = (old.number()?, new.number()?);
        (a != 0.0).then(|| (b - a) / a.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(version: &str, rules: Value) -> Value {
        json!({"id": "42", "version": version, "rules": rules})
    }

    #[test]
    fn accessors_and_version_come_from_the_document() {
        let a = ActivePolicy::new(
            Policy::from_value(rules("1.2.0", json!([]))),
            "sha256:ab",
            "2031-01-01T00:00:00Z",
        );
        assert_eq!(a.version(), "1.2.0");
        assert_eq!(a.digest(), "sha256:ab");
        assert_eq!(a.deployed_at(), "2031-01-01T00:00:00Z");
        assert_eq!(a.policy().id(), "42");
    }

    #[test]
    fn rule_changes_pair_by_key_in_a_stable_order() {
        let active = ActivePolicy::from_value(rules(
            "1.0.0",
            json!([
                {"key": "same", "value": 1},
                {"key": "cut", "value": 200, "description": "d"},
                {"key": "gone", "value": true},
                {"value": "no key"},
                {"key": "text", "value": "a"}
            ]),
        ));
        let new = Policy::from_value(rules(
            "2.0.0",
            json!([
                {"key": "new", "value": 3},
                {"key": "cut", "value": 150, "description": "d"},
                {"key": "same", "value": 1},
                {"key": "text", "value": "b"}
            ]),
        ));
        let changes = active.rule_changes(&new);
        let keys: Vec<&str> = changes.iter().map(RuleChange::key).collect();
        assert_eq!(keys, ["new", "cut", "text", "gone"]);
        assert!(matches!(changes[0], RuleChange::Added { new } if new.index == 0));
        assert_eq!(changes[1].relative_change(), Some(-0.25));
        assert_eq!(changes[2].relative_change(), None, "not numbers");
        match changes[3] {
            RuleChange::Removed { old } => assert_eq!(old.pointer(), "/rules/2"),
            other => panic!("{other:?}"),
        }
        assert!(active.rule_changes(active.policy()).is_empty());
    }

    #[test]
    fn a_zero_old_value_has_no_relative_change() {
        let active = ActivePolicy::from_value(rules("1.0.0", json!([{"key": "k", "value": 0}])));
        let new = Policy::from_value(rules("2.0.0", json!([{"key": "k", "value": 5}])));
        assert_eq!(active.rule_changes(&new)[0].relative_change(), None);
    }
}
