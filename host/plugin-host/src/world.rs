//! The plugin worlds: one row of [`WORLDS`] each.
//!
//! A world of the `pde:plugin` package (`validator`, `router`, `gate`) is what a
//! plugin implements: it exports one function, and a manifest names it in
//! `kind`. Everything the host derives from a world (the manifest's `kind`
//! values, the kind a component's exports make it, the export it must have
//! and nothing else, the words of every error about it) is read from this
//! table, so a world is defined once.
//!
//! How each WIT version binds a world (its `bindgen!` world, how a component
//! is type-checked as it, how its function is called) is that version's
//! shim: a row of the version module's `WORLDS` list in [`crate::wit`].
//! What the call takes and returns independently of the version is its
//! [`crate::wit::WorldCall`]. So a new world is this row, a
//! [`crate::wit::WorldCall`] and one shim per WIT version that has it; a
//! version without it refuses such a plugin by name (see
//! docs/ARCHITECTURE.md "Plugin worlds").

use serde::{Deserialize, Serialize};

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    /// Exports `validate`.
    Validator,
    /// Exports `route`.
    Router,
    /// Exports `gate` (since `pde:plugin@0.3.0`): judges a rollout's wave.
    Gate,
}

/// One world of the `pde:plugin` package.
#[derive(Debug)]
pub struct World {
    /// Which world.
    pub kind: PluginKind,
    /// Its name in `plugin.wit`, and the manifest's `kind` for it.
    pub name: &'static str,
    /// The one function it exports.
    pub export: &'static str,
}

/// Every world, in the order a component's exports are matched against
/// them ([`kind_from_exports`]).
pub const WORLDS: &[World] = &[
    World {
        kind: PluginKind::Validator,
        name: "validator",
        export: "validate",
    },
    World {
        kind: PluginKind::Router,
        name: "router",
        export: "route",
    },
    World {
        kind: PluginKind::Gate,
        name: "gate",
        export: "gate",
    },
];

impl PluginKind {
    /// Its row of [`WORLDS`].
    pub fn world(self) -> &'static World {
        // Every kind has a row: the test below checks it.
        WORLDS.iter().find(|w| w.kind == self).unwrap_or(&WORLDS[0])
    }

    /// The kind a manifest's `kind = "<name>"` names, if any.
    pub fn from_name(name: &str) -> Option<PluginKind> {
        WORLDS.iter().find(|w| w.name == name).map(|w| w.kind)
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.world().name)
    }
}

/// The kind a component's exports make it: the first world of [`WORLDS`]
/// whose function it exports.
pub fn kind_from_exports(exports: &[String]) -> Option<PluginKind> {
    WORLDS
        .iter()
        .find(|w| exports.iter().any(|e| e == w.export))
        .map(|w| w.kind)
}

/// `a or b`, `a, b or c`.
fn either(words: &[String]) -> String {
    match words {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The manifest values a `kind` may take, for an error:
/// `kind = "validator" or kind = "router"`.
pub fn manifest_kinds() -> String {
    either(
        &WORLDS
            .iter()
            .map(|w| format!("kind = \"{}\"", w.name))
            .collect::<Vec<_>>(),
    )
}

/// The worlds by name, for an error: `` `validator` or `router` ``.
pub fn names_in_words() -> String {
    either(
        &WORLDS
            .iter()
            .map(|w| format!("`{}`", w.name))
            .collect::<Vec<_>>(),
    )
}

/// That a component exports no world's function, in words:
/// ``neither `validate` nor `route` ``.
pub fn no_export_in_words() -> String {
    let exports: Vec<String> = WORLDS.iter().map(|w| format!("`{}`", w.export)).collect();
    match exports.as_slice() {
        [a, b] => format!("neither {a} nor {b}"),
        _ => format!("none of {}", either(&exports)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_row_with_unique_names_and_exports() {
        for kind in [PluginKind::Validator, PluginKind::Router, PluginKind::Gate] {
            assert_eq!(WORLDS.iter().filter(|w| w.kind == kind).count(), 1);
            assert_eq!(kind.world().kind, kind);
            assert_eq!(PluginKind::from_name(kind.world().name), Some(kind));
            // serde and Display agree with the table.
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.world().name)
            );
            assert_eq!(kind.to_string(), kind.world().name);
        }
        let mut names: Vec<_> = WORLDS.iter().map(|w| w.name).collect();
        let mut exports: Vec<_> = WORLDS.iter().map(|w| w.export).collect();
        names.sort_unstable();
        names.dedup();
        exports.sort_unstable();
        exports.dedup();
        assert_eq!((names.len(), exports.len()), (WORLDS.len(), WORLDS.len()));
    }

    #[test]
    fn words_are_those_the_errors_always_used() {
        assert_eq!(
            manifest_kinds(),
            r#"kind = "validator", kind = "router" or kind = "gate""#
        );
        assert_eq!(names_in_words(), "`validator`, `router` or `gate`");
        assert_eq!(
            no_export_in_words(),
            "none of `validate`, `route` or `gate`"
        );
    }

    #[test]
    fn exports_pick_the_first_world_they_implement() {
        let names = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            kind_from_exports(&names(&["exports", "route"])),
            Some(PluginKind::Router)
        );
        assert_eq!(
            kind_from_exports(&names(&["route", "validate"])),
            Some(PluginKind::Validator)
        );
        assert_eq!(kind_from_exports(&names(&["exports"])), None);
    }
}
