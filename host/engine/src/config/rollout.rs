//! `[environments.<name>.rollout]`: a progressive rollout (issue 22).
//!
//! Ordered waves select from the services the routers chose (never adding
//! to them); each is pushed, verified, baked and judged by gates before the
//! next. Everything that can be wrong with a rollout is refused here, when
//! `pde.toml` is read (exit 2): a wave that can select nothing, an unknown
//! `${variable}` in a gate, a Prometheus gate without a bound, a plugin gate
//! naming no gate plugin of the workspace.

use serde::{Deserialize, Serialize};

use super::{Service, check_url};

/// The variables a gate's `url`, `query` and `equals` may name.
pub const GATE_VARIABLES: &[&str] = &[
    "service",
    "service_url",
    "services_regex",
    "policy_id",
    "version",
    "digest",
    "wave",
];

/// `[environments.<name>.rollout]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// The waves, in order; the last takes every routed service not yet
    /// pushed.
    pub waves: Vec<Wave>,
    /// Gates evaluated after every wave's bake, before the wave's own.
    #[serde(default)]
    pub gates: Vec<Gate>,
    /// How often a paused or baking rollout looks for a promotion or an
    /// abort in the state, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

fn default_poll_ms() -> u64 {
    500
}

/// `[[environments.<name>.rollout.waves]]`: which services, how long to
/// bake, whether to pause, and the wave's own gates. At most one selector
/// (`services`, `tags`, `count`, `percent`); the last wave has none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// A name for reports (`wave-<n>` when absent).
    pub name: Option<String>,
    /// Services by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Services carrying any of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The first `count` routed services not yet pushed (in pde.toml order).
    pub count: Option<usize>,
    /// This percentage (1–100, rounded up) of the routed services not yet
    /// pushed.
    pub percent: Option<u32>,
    /// How long to watch the wave before its gates run: `"30s"`, `"5m"`.
    #[serde(default = "default_bake")]
    pub bake: String,
    /// Stop after this wave's gates pass until `pde rollout promote`.
    #[serde(default)]
    pub pause: bool,
    /// Gates of this wave only.
    #[serde(default)]
    pub gates: Vec<Gate>,
}

fn default_bake() -> String {
    "0s".into()
}

impl Wave {
    /// The wave's bake time.
    pub fn bake(&self) -> std::time::Duration {
        parse_duration(&self.bake).unwrap_or_default()
    }
}

/// What happens when a gate sees no data (Prometheus returned no series,
/// or there is no baseline to compare with).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNoData {
    /// "Could not tell" is not "healthy": the wave fails (the default).
    #[default]
    Fail,
    /// No data passes.
    Pass,
}

/// A gate: an `http` endpoint that must answer (as a readiness check), a
/// Prometheus query whose value is bounded (`max`, `min`) or compared with
/// the baseline, the routed services not pushed yet (`baseline`), or a gate
/// plugin judging a range query's samples for the wave and the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Gate {
    /// `url` must answer 2xx; with `json_field`, the value there must equal
    /// `equals`. Evaluated once per service of the wave when it names
    /// `${service}` or `${service_url}`.
    Http {
        /// Unique name within the rollout.
        name: String,
        /// The URL to `GET` (templated).
        url: String,
        /// A JSON pointer into the body, e.g. `/digest`.
        json_field: Option<String>,
        /// The value `json_field` must hold (a string is templated).
        equals: Option<serde_json::Value>,
        /// Environment variable holding a bearer token.
        token_env: Option<String>,
        /// What no answer means (default: fail).
        #[serde(default)]
        on_no_data: OnNoData,
    },
    /// A Prometheus instant query; every series' value must be `<= max`
    /// and `>= min`, and, with `baseline`, the wave's value at most
    /// `factor × baseline + offset`.
    Prometheus {
        /// Unique name within the rollout.
        name: String,
        /// The Prometheus base URL; `/api/v1/query` is appended.
        url: String,
        /// The PromQL query (templated).
        query: String,
        /// Upper bound of every series' value.
        max: Option<f64>,
        /// Lower bound of every series' value.
        min: Option<f64>,
        /// Compare the wave against the services not pushed yet.
        baseline: Option<Baseline>,
        /// Environment variable holding a bearer token.
        token_env: Option<String>,
        /// What no series means (default: fail).
        #[serde(default)]
        on_no_data: OnNoData,
    },
    /// A gate plugin (`pde:plugin@0.3.0`, manifest `kind = "gate"`) judges
    /// the samples of a Prometheus range query over the wave's bake: the
    /// query with `${services_regex}` bound to the wave's services, and to
    /// the baseline's. Its verdict is the gate's; `inconclusive` fails the
    /// wave unless `on_no_data = "pass"`.
    Plugin {
        /// Unique name within the rollout.
        name: String,
        /// The gate plugin, by its manifest's `name`.
        plugin: String,
        /// The Prometheus base URL; `/api/v1/query_range` is appended.
        url: String,
        /// The PromQL query (templated); it must name `${services_regex}`.
        query: String,
        /// The range query's resolution (default `"1s"`).
        #[serde(default = "default_step")]
        step: String,
        /// How far back from the end of the bake to look (default: the
        /// wave's bake).
        window: Option<String>,
        /// Environment variable holding a bearer token for Prometheus.
        token_env: Option<String>,
        /// What `inconclusive` means (default: fail).
        #[serde(default)]
        on_no_data: OnNoData,
    },
}

fn default_step() -> String {
    "1s".into()
}

/// Canary against baseline: the same query with `${services_regex}` bound
/// to the services not pushed yet; the wave passes when its value is at
/// most `factor × baseline + offset`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// Multiplier of the baseline's value (e.g. 1.5).
    #[serde(default = "one")]
    pub factor: f64,
    /// Added to the product (e.g. 0.001), so a baseline of zero allows noise.
    #[serde(default)]
    pub offset: f64,
}

fn one() -> f64 {
    1.0
}

impl Gate {
    /// The gate's name.
    pub fn name(&self) -> &str {
        match self {
            Gate::Http { name, .. } | Gate::Prometheus { name, .. } | Gate::Plugin { name, .. } => {
                name
            }
        }
    }

    /// `http`, `prometheus` or `plugin`.
    pub fn kind(&self) -> &'static str {
        match self {
            Gate::Http { .. } => "http",
            Gate::Prometheus { .. } => "prometheus",
            Gate::Plugin { .. } => "plugin",
        }
    }

    /// The gate plugin it calls, for a `plugin` gate.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            Gate::Plugin { plugin, .. } => Some(plugin),
            _ => None,
        }
    }

    /// What no data means for this gate.
    pub fn on_no_data(&self) -> OnNoData {
        match self {
            Gate::Http { on_no_data, .. }
            | Gate::Prometheus { on_no_data, .. }
            | Gate::Plugin { on_no_data, .. } => *on_no_data,
        }
    }

    /// The templated texts: the URL and the query (or `equals`).
    pub fn templates(&self) -> Vec<&str> {
        match self {
            Gate::Http { url, equals, .. } => {
                let mut t = vec![url.as_str()];
                if let Some(serde_json::Value::String(s)) = equals {
                    t.push(s);
                }
                t
            }
            Gate::Prometheus { url, query, .. } | Gate::Plugin { url, query, .. } => {
                vec![url, query]
            }
        }
    }

    /// True when the gate is evaluated once per service of the wave (never
    /// a plugin gate, which compares the wave as a whole with the baseline).
    pub fn per_service(&self) -> bool {
        !matches!(self, Gate::Plugin { .. })
            && self
                .templates()
                .iter()
                .any(|t| t.contains("${service}") || t.contains("${service_url}"))
    }
}

/// `"30s"`, `"5m"`, `"1h 30m"`, `"0s"` (jiff's friendly format, or ISO 8601).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let d: jiff::SignedDuration = text
        .trim()
        .parse()
        .map_err(|e| format!("bake = {text:?} is not a duration such as \"30s\" or \"5m\": {e}"))?;
    std::time::Duration::try_from(d).map_err(|_| format!("bake = {text:?} is negative"))
}

/// The `${names}` a template uses, in order; an unterminated `${` is an error.
pub fn variables(template: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find("${") {
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{template:?} opens `${{` without closing it"))?;
        names.push(&after[..end]);
        rest = &after[end + 1..];
    }
    Ok(names)
}

impl Rollout {
    /// Every gate of the rollout: the common ones, then each wave's.
    pub fn all_gates(&self) -> impl Iterator<Item = &Gate> {
        self.gates
            .iter()
            .chain(self.waves.iter().flat_map(|w| &w.gates))
    }

    /// Checks the rollout against the environment's services; the message
    /// says what is wrong and what to write instead.
    pub fn check(&self, env: &str, services: &[Service]) -> Result<(), String> {
        let here = format!("environment {env:?} rollout");
        if self.waves.is_empty() {
            return Err(format!(
                "{here} has no waves; add [[environments.{env}.rollout.waves]]"
            ));
        }
        if self.poll_ms == 0 {
            return Err(format!("{here}: poll_ms must be at least 1"));
        }
        let last = self.waves.len() - 1;
        let mut names = std::collections::BTreeSet::new();
        for (i, w) in self.waves.iter().enumerate() {
            let what = format!("{here} wave {}", i + 1);
            parse_duration(&w.bake).map_err(|e| format!("{what}: {e}"))?;
            let selectors = [
                !w.services.is_empty(),
                !w.tags.is_empty(),
                w.count.is_some(),
                w.percent.is_some(),
            ]
            .iter()
            .filter(|s| **s)
            .count();
            if i == last && i > 0 && selectors > 0 {
                return Err(format!(
                    "{what} is the last wave, which takes every service not pushed yet; remove \
                     its services/tags/count/percent (or add a wave after it)"
                ));
            }
            if i < last && selectors != 1 {
                return Err(format!(
                    "{what} must select its services with exactly one of services, tags, count \
                     or percent"
                ));
            }
            for s in &w.services {
                if !services.iter().any(|x| &x.name == s) {
                    return Err(format!(
                        "{what} selects service {s:?}, which the environment does not list, so \
                         it selects nothing"
                    ));
                }
            }
            for t in &w.tags {
                if !services.iter().any(|x| x.tags.contains(t)) {
                    return Err(format!(
                        "{what} selects tag {t:?}, which no service of the environment carries, \
                         so it selects nothing"
                    ));
                }
            }
            if w.count == Some(0) {
                return Err(format!("{what}: count = 0 selects nothing"));
            }
            if let Some(p) = w.percent
                && !(1..=100).contains(&p)
            {
                return Err(format!("{what}: percent = {p} must be 1 to 100"));
            }
            for g in &w.gates {
                check_gate(&what, g, &mut names)?;
            }
        }
        for g in &self.gates {
            check_gate(&here, g, &mut names)?;
        }
        Ok(())
    }
}

/// Checks one gate (its name unique in `names`, its variables known, its
/// URL and bounds); `here` names where it is in pde.toml.
pub(crate) fn check_gate<'a>(
    here: &str,
    g: &'a Gate,
    names: &mut std::collections::BTreeSet<&'a str>,
) -> Result<(), String> {
    let what = format!("{here} gate {:?}", g.name());
    if !names.insert(g.name()) {
        return Err(format!("{what} is listed twice; gate names must be unique"));
    }
    for t in g.templates() {
        for v in variables(t).map_err(|e| format!("{what}: {e}"))? {
            if !GATE_VARIABLES.contains(&v) {
                return Err(format!(
                    "{what} uses unknown variable ${{{v}}}; known: {}",
                    GATE_VARIABLES
                        .iter()
                        .map(|v| format!("${{{v}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    match g {
        Gate::Http {
            url,
            json_field,
            equals,
            ..
        } => {
            // A URL that is all template is checked once filled in.
            if !url.starts_with("${") {
                check_url(&what, url)?;
            }
            if json_field.is_some() != equals.is_some() {
                return Err(format!(
                    "{what}: json_field and equals go together; set both or neither"
                ));
            }
        }
        Gate::Prometheus {
            url,
            query,
            max,
            min,
            baseline,
            ..
        } => {
            check_url(&what, url)?;
            if query.trim().is_empty() {
                return Err(format!("{what}: query is empty"));
            }
            if max.is_none() && min.is_none() && baseline.is_none() {
                return Err(format!(
                    "{what} has no bound; add `max = …`, `min = …` or `baseline = {{ factor = \
                     1.5, offset = 0.001 }}`"
                ));
            }
            if baseline.is_some() && !query.contains("${services_regex}") {
                return Err(format!(
                    "{what} compares with the baseline, so its query must select services with \
                     ${{services_regex}}"
                ));
            }
        }
        Gate::Plugin {
            plugin,
            url,
            query,
            step,
            window,
            ..
        } => {
            check_url(&what, url)?;
            if plugin.trim().is_empty() {
                return Err(format!("{what}: plugin is empty; name a gate plugin"));
            }
            if !query.contains("${services_regex}") {
                return Err(format!(
                    "{what} compares the wave with the baseline, so its query must select \
                     services with ${{services_regex}}"
                ));
            }
            let not_a_duration =
                |k: &str, v: &str| format!("{what}: {k} = {v:?} is not a duration such as \"1s\"");
            let step_len = parse_duration(step).map_err(|_| not_a_duration("step", step))?;
            if step_len.is_zero() {
                return Err(format!("{what}: step must be longer than zero"));
            }
            if let Some(w) = window {
                parse_duration(w).map_err(|_| not_a_duration("window", w))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<Service> {
        ["A", "B"]
            .iter()
            .map(|n| Service {
                name: n.to_string(),
                url: "http://127.0.0.1:1".into(),
                tags: vec!["api".into()],
                labels: Default::default(),
                token_env: None,
            })
            .collect()
    }

    fn check(text: &str) -> Result<(), String> {
        let r: Rollout = toml::from_str(text).map_err(|e| e.to_string())?;
        r.check("production", &services())
    }

    const GATE: &str =
        "[[waves.gates]]\nkind = \"prometheus\"\nname = \"g\"\nurl = \"http://127.0.0.1:9\"\n";

    #[test]
    fn rollouts_are_checked_when_read() {
        check("[[waves]]\ncount = 1\nbake = \"2m\"\n[[waves]]\n").unwrap();
        for (text, says) in [
            ("waves = []\n", "no waves"),
            ("[[waves]]\ncount = 1\n[[waves]]\ncount = 1\n", "last wave"),
            ("[[waves]]\n[[waves]]\n", "exactly one"),
            (
                "[[waves]]\ncount = 1\ntags = [\"api\"]\n[[waves]]\n",
                "exactly one",
            ),
            ("[[waves]]\npercent = 0\n[[waves]]\n", "1 to 100"),
            ("[[waves]]\ntags = [\"db\"]\n[[waves]]\n", "selects nothing"),
            (
                "[[waves]]\ncount = 1\nbake = \"soon\"\n[[waves]]\n",
                "not a duration",
            ),
            ("[[waves]]\ncount = 1\nbak = \"1s\"\n[[waves]]\n", "bak"),
        ] {
            let e = check(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        let gate = |rest: &str| format!("[[waves]]\ncount = 1\n{GATE}{rest}[[waves]]\n");
        check(&gate("query = 'up{s=~\"${services_regex}\"}'\nmax = 1\n")).unwrap();
        for (rest, says) in [
            ("query = 'up'\n", "no bound"),
            (
                "query = 'up{x=\"${nope}\"}'\nmax = 1\n",
                "unknown variable ${nope}",
            ),
            ("query = 'up ${wave'\nmax = 1\n", "without closing"),
            (
                "query = 'up'\nbaseline = { factor = 2.0 }\n",
                "${services_regex}",
            ),
        ] {
            let e = check(&gate(rest)).unwrap_err();
            assert!(e.contains(says), "{rest}: {e}");
        }
    }
}
