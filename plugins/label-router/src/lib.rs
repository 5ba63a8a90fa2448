//! `label-router`: sends a policy to the services whose labels match a
//! selector given in the plugin's settings.
//!
//! Where `category-router` reads the policy, this one reads the environment:
//! operators label their services in `pde.toml`
//! (`labels = { tier = "benefits", region = "east" }`) and the selector
//! says which of them take this workspace's policies. It is the router to
//! reach for when delivery follows how services are organised rather than
//! what the policy contains.
//!
//! # Selector
//! Every label in `match` must match (AND):
//! - a string is the exact value (`tier = "benefits"`);
//! - a list accepts any of its values (`region = ["east", "west"]`);
//! - `"*"` accepts any value, as long as the service carries the label.
//!
//! An empty selector, or a label that accepts no value, is a plugin error:
//! it would route everywhere or nowhere, and a deploy should not depend on
//! that going unnoticed. Each route's reason names the labels that matched,
//! e.g. "labels tier=benefits, region=east match the selector".
//!
//! # Settings
//! ```toml
//! [settings.match]
//! tier = "benefits"
//! region = ["east", "west"]
//! owner = "*"
//! ```

use std::collections::BTreeMap;

use pde_plugin::{Context, Level, Policy, Route, Router, Service, log};
use serde::Deserialize;

/// The router exported by this component.
pub struct LabelRouter;

impl Router for LabelRouter {
    fn route(policy: &Policy, ctx: &Context, services: &[Service]) -> Result<Vec<Route>, String> {
        route(policy, ctx, services)
    }
}

pde_plugin::export_router!(LabelRouter);

/// What one label of the selector accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Accept {
    /// One value, or `"*"` for any.
    One(String),
    /// Any of these values.
    AnyOf(Vec<String>),
}

impl Accept {
    fn accepts(&self, value: &str) -> bool {
        match self {
            Accept::One(v) => v == "*" || v == value,
            Accept::AnyOf(vs) => vs.iter().any(|v| v == "*" || v == value),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Accept::AnyOf(vs) if vs.is_empty())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(rename = "match")]
    selector: BTreeMap<String, Accept>,
}

/// Routes `policy` to the services of `services` that match the selector
/// (the plain function behind the component), in the order given.
pub fn route(policy: &Policy, ctx: &Context, services: &[Service]) -> Result<Vec<Route>, String> {
    let settings: Settings = ctx.settings_as().map_err(|e| {
        format!("label-router: {e} (expected [settings.match] with label = \"value\")")
    })?;
    if settings.selector.is_empty() {
        return Err(
            "label-router: [settings.match] is empty, which would route to every service; \
             name at least one label (use \"*\" to require only that it is present)"
                .to_string(),
        );
    }
    if let Some((label, _)) = settings.selector.iter().find(|(_, a)| a.is_empty()) {
        return Err(format!(
            "label-router: [settings.match] {label} = [] accepts no value, so nothing could match"
        ));
    }
    let routes: Vec<Route> = services
        .iter()
        .filter_map(|service| {
            let matched: Option<Vec<String>> = settings
                .selector
                .iter()
                .map(|(label, accept)| {
                    service
                        .label(label)
                        .filter(|value| accept.accepts(value))
                        .map(|value| format!("{label}={value}"))
                })
                .collect();
            matched.map(|labels| {
                Route::new(
                    service.name.clone(),
                    format!("labels {} match the selector", labels.join(", ")),
                )
            })
        })
        .collect();
    log(
        Level::Info,
        &format!(
            "label-router: {} of {} service(s) match the selector for policy {}",
            routes.len(),
            services.len(),
            policy.id()
        ),
    );
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pde_plugin::serde_json::{Value, json};

    fn service(name: &str, labels: &[(&str, &str)]) -> Service {
        let mut s = Service::new(name, &[]);
        s.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s
    }

    fn services() -> Vec<Service> {
        vec![
            service("HMS-API", &[("tier", "benefits"), ("region", "east")]),
            service("HMS-PORTAL", &[("tier", "public"), ("region", "east")]),
            service("HMS-WEST", &[("tier", "benefits"), ("region", "west")]),
            service("ARCHIVE", &[]),
        ]
    }

    fn run(selector: Value) -> Result<Vec<Route>, String> {
        let policy = Policy::from_value(json!({"id": "42", "version": "1.0.0", "rules": []}));
        let ctx = Context::new("prod", json!({ "match": selector }));
        route(&policy, &ctx, &services())
    }

    fn names(routes: &[Route]) -> Vec<&str> {
        routes.iter().map(|r| r.service.as_str()).collect()
    }

    #[test]
    fn one_label_routes_to_every_service_carrying_it_with_the_label_as_reason() {
        pde_plugin::take_native_logs();
        let r = run(json!({"tier": "benefits"})).unwrap();
        assert_eq!(names(&r), ["HMS-API", "HMS-WEST"]);
        assert_eq!(r[0].reason, "labels tier=benefits match the selector");
        let logs = pde_plugin::take_native_logs();
        assert!(logs[0].1.contains("2 of 4 service(s)"), "{logs:?}");
    }

    #[test]
    fn every_label_must_match_and_lists_accept_any_of_their_values() {
        let r = run(json!({"tier": "benefits", "region": "east"})).unwrap();
        assert_eq!(names(&r), ["HMS-API"]);
        assert_eq!(
            r[0].reason,
            "labels region=east, tier=benefits match the selector"
        );
        let r = run(json!({"region": ["west", "east"]})).unwrap();
        assert_eq!(names(&r), ["HMS-API", "HMS-PORTAL", "HMS-WEST"]);
    }

    #[test]
    fn a_star_asks_only_for_the_label() {
        let r = run(json!({"region": "*"})).unwrap();
        assert_eq!(names(&r), ["HMS-API", "HMS-PORTAL", "HMS-WEST"]);
        assert_eq!(r[2].reason, "labels region=west match the selector");
        assert!(run(json!({"owner": "*"})).unwrap().is_empty());
    }

    #[test]
    fn nothing_matching_is_no_route_not_an_error() {
        assert!(run(json!({"tier": "gold"})).unwrap().is_empty());
    }

    #[test]
    fn empty_or_misspelt_selectors_are_the_plugins_own_failure() {
        for (selector, says) in [
            (json!({}), "is empty"),
            (json!({"tier": []}), "accepts no value"),
            (json!({"tier": 3}), "label-router: "),
        ] {
            let err = run(selector.clone()).unwrap_err();
            assert!(err.contains(says), "{selector}: {err}");
        }
        let policy = Policy::from_value(json!({"id": "42"}));
        let typo = Context::new("", json!({"matches": {"tier": "benefits"}}));
        let err = route(&policy, &typo, &services()).unwrap_err();
        assert!(err.contains("matches"), "{err}");
    }
}
