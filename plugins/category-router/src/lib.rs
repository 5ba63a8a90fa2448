//! `category-router`: sends a policy to the services that act on its rules.
//!
//! Each rule category is handled by a kind of service, named by a tag in
//! `pde.toml`: eligibility rules are enforced by the benefit APIs and by the
//! appointment scheduler, form rules by the public portal, payment rules by
//! the scheduler that runs payment runs. The router collects the categories
//! used by the policy's rules and routes the policy to every service that
//! carries a tag mapped from one of them, saying which categories and rules
//! brought each service in.
//!
//! # Default mapping (category → service tags)
//! | category      | tags                  |
//! |---------------|-----------------------|
//! | `eligibility` | `api`, `scheduling`   |
//! | `forms`       | `portal`              |
//! | `payments`    | `scheduling`          |
//!
//! # Settings
//! ```toml
//! [settings.routes]          # merged over the defaults, per category
//! eligibility = ["api"]      # replace a category's tags
//! notices = ["portal", "mail"]
//! payments = []              # drop a default category
//! [settings]
//! fallback = ["api"]         # tags for categories not in the mapping (default: none)
//! ```
//! Categories that map nowhere, and mapped tags no service carries, are
//! logged (not errors): an environment may legitimately lack a portal.

use std::collections::BTreeMap;

use pde_plugin::{Context, Level, Policy, Route, Router, Service, log};
use serde::Deserialize;

/// The router exported by this component.
pub struct CategoryRouter;

impl Router for CategoryRouter {
    fn route(policy: &Policy, ctx: &Context, services: &[Service]) -> Result<Vec<Route>, String> {
        route(policy, ctx, services)
    }
}

pde_plugin::export_router!(CategoryRouter);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    routes: BTreeMap<String, Vec<String>>,
    fallback: Vec<String>,
}

/// The built-in category → tags mapping.
pub fn default_mapping() -> BTreeMap<String, Vec<String>> {
    [
        ("eligibility", &["api", "scheduling"][..]),
        ("forms", &["portal"][..]),
        ("payments", &["scheduling"][..]),
    ]
    .into_iter()
    .map(|(c, tags)| (c.to_string(), tags.iter().map(|t| t.to_string()).collect()))
    .collect()
}

/// Routes `policy` to `services` (the plain function behind the component).
///
/// One route per service, in the order `services` lists them; the reason
/// names each category and tag that selected the service and the rule keys
/// in that category.
pub fn route(policy: &Policy, ctx: &Context, services: &[Service]) -> Result<Vec<Route>, String> {
    let settings: Settings = ctx
        .settings_as()
        .map_err(|e| format!("category-router: {e}"))?;
    let mut mapping = default_mapping();
    mapping.extend(settings.routes);

    // Category → rule keys, in first-seen order of categories.
    let mut categories: Vec<(String, Vec<String>)> = Vec::new();
    for rule in policy.rules() {
        let Some(category) = rule.category else {
            continue;
        };
        let key = rule.key.unwrap_or("(no key)").to_string();
        match categories.iter_mut().find(|(c, _)| c == category) {
            Some((_, keys)) => keys.push(key),
            None => categories.push((category.to_string(), vec![key])),
        }
    }

    // Service index → reasons.
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); services.len()];
    for (category, keys) in &categories {
        let tags = match mapping.get(category) {
            Some(tags) => tags,
            None if !settings.fallback.is_empty() => &settings.fallback,
            None => {
                log(
                    Level::Info,
                    &format!(
                        "category-router: category `{category}` maps to no service tag; its rules route nowhere"
                    ),
                );
                continue;
            }
        };
        for tag in tags {
            let mut hit = false;
            for (i, service) in services.iter().enumerate() {
                if service.has_tag(tag) {
                    hit = true;
                    reasons[i].push(format!(
                        "{} rule(s) in category `{category}` ({}) go to services tagged `{tag}`",
                        keys.len(),
                        summarize(keys)
                    ));
                }
            }
            if !hit {
                log(
                    Level::Warn,
                    &format!(
                        "category-router: no service in this environment is tagged `{tag}` (wanted for category `{category}`)"
                    ),
                );
            }
        }
    }

    Ok(services
        .iter()
        .zip(reasons)
        .filter(|(_, r)| !r.is_empty())
        .map(|(s, r)| Route::new(s.name.clone(), r.join("; ")))
        .collect())
}

fn summarize(keys: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", +{} more", keys.len() - SHOWN));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use pde_plugin::serde_json::{Value, json};

    fn policy(rules: Value) -> Policy {
        Policy::from_value(json!({
            "id": "42", "version": "1.0.0", "title": "t", "agency": "A",
            "effective": "2030-01-01", "approvals": [], "rules": rules, "config": {}
        }))
    }

    fn services() -> Vec<Service> {
        vec![
            Service::new("HMS-API", &["api", "eligibility"]),
            Service::new("Portal", &["portal", "public"]),
            Service::new("Scheduler", &["scheduling"]),
            Service::new("Archive", &["archive"]),
        ]
    }

    fn names(r: &[Route]) -> Vec<&str> {
        r.iter().map(|r| r.service.as_str()).collect()
    }

    fn rule(key: &str, category: &str) -> Value {
        json!({"key": key, "category": category, "value": 1, "description": ""})
    }

    #[test]
    fn eligibility_goes_to_api_and_scheduling() {
        let r = route(
            &policy(json!([rule("snap.max_age", "eligibility")])),
            &Context::default(),
            &services(),
        )
        .unwrap();
        assert_eq!(names(&r), ["HMS-API", "Scheduler"]);
        assert_eq!(
            r[0].reason,
            "1 rule(s) in category `eligibility` (snap.max_age) go to services tagged `api`"
        );
        assert!(r[1].reason.contains("tagged `scheduling`"));
    }

    #[test]
    fn forms_to_portal_payments_to_scheduling_reasons_merge() {
        let p = policy(json!([
            rule("form.a", "forms"),
            rule("pay.a", "payments"),
            rule("pay.b", "payments"),
            rule("pay.c", "payments"),
            rule("pay.d", "payments"),
            rule("elig.a", "eligibility")
        ]));
        let r = route(&p, &Context::default(), &services()).unwrap();
        assert_eq!(names(&r), ["HMS-API", "Portal", "Scheduler"]);
        assert!(r[1].reason.contains("category `forms` (form.a)"));
        assert_eq!(
            r[2].reason,
            "4 rule(s) in category `payments` (pay.a, pay.b, pay.c, +1 more) go to services tagged `scheduling`; \
             1 rule(s) in category `eligibility` (elig.a) go to services tagged `scheduling`"
        );
    }

    #[test]
    fn unknown_categories_and_missing_tags_route_nowhere_and_log() {
        pde_plugin::take_native_logs();
        let p = policy(json!([rule("x", "notices"), rule("f", "forms")]));
        let only_api = vec![Service::new("HMS-API", &["api"])];
        let r = route(&p, &Context::default(), &only_api).unwrap();
        assert!(r.is_empty());
        let logs = pde_plugin::take_native_logs();
        assert_eq!(logs.len(), 2, "{logs:?}");
        assert!(logs[0].1.contains("`notices` maps to no service tag"));
        assert!(logs[1].1.contains("tagged `portal`"));
    }

    #[test]
    fn settings_override_mapping_and_fallback() {
        let ctx = Context::new(
            "production",
            json!({"routes": {"eligibility": ["api"], "payments": [], "notices": ["portal"]}, "fallback": ["archive"]}),
        );
        let p = policy(json!([
            rule("e", "eligibility"),
            rule("p", "payments"),
            rule("n", "notices"),
            rule("z", "misc")
        ]));
        let r = route(&p, &ctx, &services()).unwrap();
        assert_eq!(names(&r), ["HMS-API", "Portal", "Archive"]);
        assert!(r[2].reason.contains("category `misc`"));
        let typo = Context::new("", json!({"route": {}}));
        assert!(route(&p, &typo, &services()).unwrap_err().contains("route"));
    }

    #[test]
    fn routes_only_name_given_services() {
        let p = policy(json!([rule("e", "eligibility"), rule("f", "forms")]));
        let given = services();
        let r = route(&p, &Context::default(), &given).unwrap();
        assert!(r.iter().all(|r| given.iter().any(|s| s.name == r.service)));
        assert!(route(&p, &Context::default(), &[]).unwrap().is_empty());
    }
}
