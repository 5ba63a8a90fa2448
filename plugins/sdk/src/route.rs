//! Services a router chooses from, and its decisions.

/// A service of the target environment, as configured in `pde.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The service name, e.g. `"HMS-API"`; routes refer to it by this name.
    pub name: String,
    /// Its tags, e.g. `["api", "eligibility"]`.
    pub tags: Vec<String>,
    /// Its labels as key/value pairs.
    pub labels: Vec<(String, String)>,
}

impl Service {
    /// Builds a service (use in unit tests).
    pub fn new(name: impl Into<String>, tags: &[&str]) -> Self {
        Service {
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            labels: Vec::new(),
        }
    }

    /// True when the service carries `tag` (exact, case-sensitive).
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// The value of label `key`, if set.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A decision to deliver the policy to one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name of a service from the list the router was given.
    pub service: String,
    /// Why this service gets the policy, shown in plans and tags.
    pub reason: String,
}

impl Route {
    /// Builds a route.
    pub fn new(service: impl Into<String>, reason: impl Into<String>) -> Self {
        Route {
            service: service.into(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_labels() {
        let mut s = Service::new("HMS-API", &["api", "eligibility"]);
        s.labels.push(("tier".into(), "gold".into()));
        assert!(s.has_tag("api"));
        assert!(!s.has_tag("API"));
        assert_eq!(s.label("tier"), Some("gold"));
        assert_eq!(s.label("zone"), None);
        assert_eq!(Route::new("a", "b").service, "a");
    }
}
