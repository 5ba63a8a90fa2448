//! The shape of the code, checked: crates depend only downward (normal,
//! build and dev dependencies), the receiving agent links no plugin runtime
//! and no database, the engine's modules form no import cycle and import
//! nothing from a layer above them, and no step imports another step.
//!
//! The layers are written down here and in docs/ARCHITECTURE.md; a change
//! that adds an upward or circular import fails this test, and the message
//! names the files and the import.
// Test code: a failed unwrap is a failed test, with its location.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The pde crates each crate may depend on (path dependencies, normal and dev).
const CRATES: &[(&str, &[&str])] = &[
    ("core", &[]),
    ("plugin-host", &["pde-core"]),
    ("agent", &["pde-core"]),
    ("engine", &["pde-core", "pde-plugin-host"]),
    ("console", &["pde", "pde-core"]),
    ("cli", &["pde", "pde-agent", "pde-console", "pde-core"]),
    ("python", &["pde", "pde-core"]),
];

/// Crates outside `host/` that the tests of any host crate may use: the
/// plugin SDK and the test plugins built with it (they depend on no host
/// crate, so they cannot carry an upward edge back in).
const TEST_PLUGINS: &[&str] = &[
    "pde-plugin",
    "pde-plugin-artifacts",
    "eligibility-bounds",
    "mann-whitney-gate",
];

/// The pde and path dependencies a manifest declares, in every dependency
/// table (`[dependencies]`, `[dev-dependencies]`, `[build-dependencies]`,
/// their `[target.….…]` forms, and `[dependencies.NAME]` headers), as
/// `(table, name)`.
fn local_dependencies(manifest: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut section = String::new();
    // The table and name of a `[dependencies.NAME]` header being read.
    let mut header: Option<(String, String)> = None;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            header = section
                .rsplit_once('.')
                .filter(|(table, _)| table.ends_with("dependencies"))
                .map(|(table, name)| (table.to_string(), name.to_string()));
            if let Some((table, name)) = &header
                && name.starts_with("pde")
            {
                out.push((table.clone(), name.clone()));
            }
            continue;
        }
        let Some((key, spec)) = line.split_once('=') else {
            continue;
        };
        let (key, local) = (key.trim(), spec.contains("../"));
        if let Some((table, name)) = &header {
            if key == "path" && local && !out.contains(&(table.clone(), name.clone())) {
                out.push((table.clone(), name.clone()));
            }
        } else if section.ends_with("dependencies")
            && ((spec.contains("path =") && local) || key.starts_with("pde"))
        {
            out.push((section.clone(), key.to_string()));
        }
    }
    out
}

/// What `crate_dir`'s manifest declares that it may not: a normal or build
/// dependency outside `allowed`, or a dev dependency outside `allowed` and
/// [`TEST_PLUGINS`].
fn upward_dependencies(crate_dir: &str, manifest: &str, allowed: &[&str]) -> Vec<String> {
    local_dependencies(manifest)
        .into_iter()
        .filter(|(table, name)| {
            let dev = table.ends_with("dev-dependencies");
            !(allowed.contains(&name.as_str()) || dev && TEST_PLUGINS.contains(&name.as_str()))
        })
        .map(|(table, name)| {
            format!(
                "host/{crate_dir} depends on {name} ([{table}]), which is not below it; allowed: {allowed:?}"
            )
        })
        .collect()
}

#[test]
fn crates_depend_only_downward() {
    for (dir, allowed) in CRATES {
        let manifest =
            std::fs::read_to_string(root().join("host").join(dir).join("Cargo.toml")).unwrap();
        let wrong = upward_dependencies(dir, &manifest, allowed);
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}

#[test]
fn test_plugins_depend_on_no_host_crate() {
    // What lets a host crate's tests use them: they cannot lead back up.
    for (dir, name) in [
        ("sdk", "pde-plugin"),
        ("artifacts", "pde-plugin-artifacts"),
        ("eligibility-bounds", "eligibility-bounds"),
        ("mann-whitney-gate", "mann-whitney-gate"),
    ] {
        assert!(TEST_PLUGINS.contains(&name));
        let manifest =
            std::fs::read_to_string(root().join("plugins").join(dir).join("Cargo.toml")).unwrap();
        assert!(manifest.contains(&format!("name = \"{name}\"")));
        let wrong = upward_dependencies(dir, &manifest, &["pde-plugin"]);
        assert!(wrong.is_empty(), "plugins/{dir}: {}", wrong.join("\n"));
    }
}

#[test]
fn the_crate_check_sees_planted_upward_dependencies() {
    // The check above must be able to fail, in every table it claims to read.
    let planted = r#"
[package]
name = "pde"

[dependencies]
pde-core = { path = "../core" }
serde = "1"

[dev-dependencies]
pde-cli = { path = "../cli" }
pde-plugin = { path = "../../plugins/sdk" }

[target.'cfg(unix)'.dependencies]
pde-agent = { path = "../agent" }

[build-dependencies.pde-python]
path = "../python"
"#;
    let wrong = upward_dependencies("engine", planted, &["pde-core", "pde-plugin-host"]);
    assert_eq!(wrong.len(), 3, "{wrong:#?}");
    for (name, table) in [
        ("pde-cli", "[dev-dependencies]"),
        ("pde-agent", "[target.'cfg(unix)'.dependencies]"),
        ("pde-python", "[build-dependencies]"),
    ] {
        assert!(
            wrong.iter().any(|w| w.contains(name) && w.contains(table)),
            "{name} in {table} not caught: {wrong:#?}"
        );
    }
    // A test plugin is not a host crate: only a dev dependency may name it.
    let normal = "[dependencies]\npde-plugin = { path = \"../../plugins/sdk\" }\n";
    assert_eq!(
        upward_dependencies("engine", normal, &["pde-core"]).len(),
        1
    );
}

#[test]
fn the_agent_links_no_plugin_runtime_and_no_database() {
    let out = Command::new(env!("CARGO"))
        .current_dir(root())
        .args([
            "tree",
            "-p",
            "pde-agent",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
            "--locked",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let names: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains("axum"),
        "not a dependency tree of the agent:\n{tree}"
    );
    let banned: Vec<&&str> = names
        .iter()
        .filter(|n| {
            n.starts_with("wasmtime")
                || n.starts_with("cranelift")
                || n.starts_with("rusqlite")
                || n.starts_with("libsqlite3")
                || **n == "pde"
                || **n == "pde-plugin-host"
        })
        .collect();
    assert!(
        banned.is_empty(),
        "pde-agent links {banned:?}; it must stay free of the plugin runtime and the database"
    );
}

/// Layers of the engine's modules, bottom first. A module may import from a
/// lower layer only; the steps share one layer and never import each other.
const LAYERS: &[&[&str]] = &[
    &[
        "config",
        "policy",
        "vcs",
        "http",
        "runtime",
        "test_receiver",
        "plugin_install",
        "plugin_registry",
    ],
    // The audit log only needs layer 0, and the shared state (layer 1)
    // keeps the team's audit chain, so the log sits below it.
    &["audit", "floor"],
    &["state", "provenance", "history", "review"],
    // Begin and finish of a deploy or rollback in the state.
    &["bookkeeping"],
    &[
        "steps::validate",
        "steps::package",
        "steps::envcheck",
        "steps::route",
        "steps::push",
        "steps::tag",
        "steps::audit",
        "steps::waves",
    ],
    &["report"],
    &["error"],
    // Trusted keys and compile cache of a workspace's plugins, for the
    // engine and for the `pde plugin` commands.
    &["plugin_workspace"],
    &["engine"],
    // OCI delivery bound to the engine: the registry, its check, publish.
    &["delivery"],
    // Each step bound to the engine, once for every command.
    &["stages"],
    // Step 5 in waves, and the `pde rollout` commands (issue 22).
    &["rollout"],
    &["pipeline", "rollback", "team"],
    &["plan", "live"],
    &["blocking"],
];

/// `pub use` names of the crate root that stand for a module.
const ALIASES: &[(&str, &str)] = &[
    ("envcheck", "steps::envcheck"),
    ("package", "steps::package"),
    ("push", "steps::push"),
    ("route", "steps::route"),
    ("tag", "steps::tag"),
    ("validate", "steps::validate"),
    ("Engine", "engine"),
    ("Error", "error"),
    ("ExitCode", "error"),
];

/// Names of the crate root that are other crates (`pde_core`, the plugin host).
const EXTERNAL: &[&str] = &["approval", "bundle", "keys", "term", "plugin", "diagnostic"];

fn module_of(file: &Path, src: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.as_slice() {
        [only] if only == "lib" => None,
        [only] => Some(only.clone()),
        [dir, rest @ ..] if dir == "steps" => match rest.first().map(String::as_str) {
            Some("mod") | None => None,
            Some(step) => Some(format!("steps::{step}")),
        },
        [dir, ..] => Some(dir.clone()),
        [] => None,
    }
}

fn target_of(path: &str) -> Option<String> {
    let mut parts = path.split("::");
    let first = parts.next()?;
    if EXTERNAL.contains(&first) {
        return None;
    }
    if let Some((_, m)) = ALIASES.iter().find(|(a, _)| *a == first) {
        return Some(m.to_string());
    }
    if first == "steps" {
        let step = parts.next()?;
        return Some(format!("steps::{step}"));
    }
    Some(first.to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `steps/push/tests.rs` is `steps::push::tests`,
/// `audit/mod.rs` is `audit`.
fn module_path(file: &Path, src: &Path) -> Vec<String> {
    let mut parts: Vec<String> = file
        .strip_prefix(src)
        .unwrap()
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The engine modules `text` (the file at module path `at`) imports, each
/// with the line that does: every `crate::` path, and every `super::` path
/// resolved against the file's place (`super::route` in `steps/push.rs`).
/// A `super::` path that names no module of [`LAYERS`] (`use super::*` in
/// an inline test module) is left out: it stays inside its own module.
fn imports_in(text: &str, at: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            // `use crate::steps::{a, b}` names several; each is checked.
            let after = &rest[path.len()..];
            let names: Vec<String> = if after.starts_with('{') {
                let inner = &after[1..after.find('}').unwrap_or(after.len())];
                inner
                    .split(',')
                    .map(|s| format!("{path}{}", s.trim()))
                    .collect()
            } else {
                vec![path]
            };
            for name in names {
                if let Some(target) = target_of(&name) {
                    out.push((target, code.to_string()));
                }
            }
        }
        let mut rest = code;
        while let Some(pos) = rest.find("super::") {
            let before = &rest[..pos];
            rest = &rest[pos..];
            let mut ups = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                ups += 1;
                rest = r;
            }
            if before.ends_with("::") || ups > at.len() {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let mut path = at[..at.len() - ups].to_vec();
            path.push(name);
            if let Some(target) = target_of(&path.join("::"))
                && layer_of(&target).is_some()
            {
                out.push((target, code.to_string()));
            }
        }
    }
    out
}

/// module → (imported module → a line that imports it).
fn engine_imports() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = root().join("host/engine/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&file, &src) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let edges = graph.entry(module.clone()).or_default();
        for (target, code) in imports_in(&text, &module_path(&file, &src)) {
            if target != module {
                edges
                    .entry(target)
                    .or_insert_with(|| format!("{}: {}", file.display(), code));
            }
        }
    }
    graph
}

fn layer_of(module: &str) -> Option<(usize, usize)> {
    LAYERS.iter().enumerate().find_map(|(layer, names)| {
        names
            .iter()
            .position(|n| *n == module)
            .map(|pos| (layer, pos))
    })
}

fn is_step(module: &str) -> bool {
    module.starts_with("steps::")
}

/// What `module` may not import: anything that is not in a layer below
/// it. Steps share a layer, so one step importing another is refused too:
/// a step may use the shared layers under it, never another step (what two
/// steps share belongs in a layer below both, and the order of the steps
/// is `pipeline.rs`'s alone).
fn wrong_import(module: &str, target: &str) -> Option<String> {
    let (layer, _) = layer_of(module)?;
    let Some((t_layer, _)) = layer_of(target) else {
        return Some(format!("{module} imports unknown module {target}"));
    };
    if is_step(module) && is_step(target) {
        return Some(format!(
            "step {module} imports step {target}: a step may use the layers below it, never \
             another step; move what they share below both"
        ));
    }
    (t_layer >= layer).then(|| format!("{module} imports {target}, which is not below it"))
}

#[test]
fn engine_modules_are_layered_and_import_nothing_from_above() {
    let graph = engine_imports();
    for module in graph.keys() {
        assert!(
            layer_of(module).is_some(),
            "module {module} has no layer: add it to LAYERS here and to docs/ARCHITECTURE.md"
        );
    }
    let mut wrong = Vec::new();
    for (module, edges) in &graph {
        for (target, line) in edges {
            if let Some(why) = wrong_import(module, target) {
                wrong.push(format!("{why}:\n  {line}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn engine_modules_have_no_import_cycle() {
    let graph = engine_imports();
    // Depth-first search with colours; a grey node seen again closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        colour.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            match colour.get(next.as_str()).copied().unwrap_or(0) {
                0 => visit(next, graph, colour, path),
                1 => {
                    let start = path.iter().position(|p| p == next).unwrap();
                    panic!("import cycle: {} -> {next}", path[start..].join(" -> "));
                }
                _ => {}
            }
        }
        path.pop();
        colour.insert(node.to_string(), 2);
    }
    let mut colour = BTreeMap::new();
    for node in graph.keys() {
        if colour.get(node.as_str()).copied().unwrap_or(0) == 0 {
            visit(node, &graph, &mut colour, &mut Vec::new());
        }
    }
}

#[test]
fn the_checker_sees_a_planted_upward_import() {
    // The rules above must be able to fail: a step that imports the
    // pipeline is caught by the layer check's own logic.
    let (step, _) = layer_of("steps::route").unwrap();
    let (pipeline, _) = layer_of("pipeline").unwrap();
    assert!(pipeline > step);
    assert_eq!(target_of("push::Observer").as_deref(), Some("steps::push"));
    assert_eq!(target_of("bundle::Bundle"), None);
    let src = root().join("host/engine/src");
    assert_eq!(
        module_of(&src.join("steps/push/tests.rs"), &src).as_deref(),
        Some("steps::push")
    );
    assert!(wrong_import("steps::route", "pipeline").is_some());
    assert!(wrong_import("steps::route", "state").is_none());
}

#[test]
fn the_checker_sees_a_step_importing_another_step() {
    // Every way a step file can name another step is caught: through
    // `crate::steps::`, through the crate root's alias, and through `super::`.
    let src = root().join("host/engine/src");
    let planted = [
        (
            "steps/package.rs",
            "use crate::steps::validate::ValidationReport;",
        ),
        ("steps/route.rs", "use crate::push::target_of;"),
        ("steps/envcheck.rs", "use crate::steps::{tag, push};"),
        ("steps/tag.rs", "use super::route::RouteDecision;"),
        (
            "steps/push/tests.rs",
            "let r = super::super::envcheck::check(c, &[], t);",
        ),
    ];
    for (file, line) in planted {
        let file = src.join(file);
        let module = module_of(&file, &src).unwrap();
        let wrong: Vec<String> = imports_in(line, &module_path(&file, &src))
            .into_iter()
            .filter(|(target, _)| *target != module)
            .filter_map(|(target, _)| wrong_import(&module, &target))
            .collect();
        assert!(
            !wrong.is_empty() && wrong.iter().all(|w| w.contains("imports step")),
            "{module}: `{line}` not caught: {wrong:?}"
        );
    }
    // A step's own test module and its own submodules are not other steps.
    for (file, line) in [
        ("steps/push/tests.rs", "use super::*;"),
        ("steps/validate.rs", "use super::*;"),
        (
            "steps/envcheck.rs",
            "use crate::steps::envcheck::readiness;",
        ),
    ] {
        let file = src.join(file);
        let module = module_of(&file, &src).unwrap();
        let found: Vec<(String, String)> = imports_in(line, &module_path(&file, &src))
            .into_iter()
            .filter(|(target, _)| *target != module)
            .collect();
        assert!(found.is_empty(), "{module}: `{line}` read as {found:?}");
    }
}
