//! The shape of the code, checked: crates depend only downward, the
//! receiving agent links no plugin runtime and no database, and the engine's
//! modules form no import cycle and import nothing from a layer above them.
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
];

#[test]
fn crates_depend_only_downward() {
    for (dir, allowed) in CRATES {
        let manifest =
            std::fs::read_to_string(root().join("host").join(dir).join("Cargo.toml")).unwrap();
        let mut section = String::new();
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            if section != "[dependencies]" {
                continue;
            }
            let Some((name, spec)) = line.split_once('=') else {
                continue;
            };
            let name = name.trim();
            let local = spec.contains("path =") && spec.contains("../");
            let ours = name.starts_with("pde");
            if local || ours {
                assert!(
                    allowed.contains(&name),
                    "host/{dir} depends on {name}, which is not below it; allowed: {allowed:?}"
                );
            }
        }
    }
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
                || **n == "reqwest"
        })
        .collect();
    assert!(
        banned.is_empty(),
        "pde-agent links {banned:?}; it must stay free of the plugin runtime and the database"
    );
}

/// Layers of the engine's modules, bottom first. A module may import from a
/// lower layer, and a step from a step earlier in the pipeline.
const LAYERS: &[&[&str]] = &[
    &[
        "config",
        "policy",
        "vcs",
        "http",
        "runtime",
        "test_receiver",
        "plugin_install",
    ],
    // The audit log only needs layer 0, and the shared state (layer 1)
    // keeps the team's audit chain, so the log sits below it.
    &["audit", "floor"],
    &["state", "provenance", "history"],
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
    ],
    &["report"],
    &["error"],
    &["engine"],
    // Each step bound to the engine, once for every command.
    &["stages"],
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
const EXTERNAL: &[&str] = &["bundle", "keys", "plugin", "diagnostic"];

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
                    if let Some(target) = target_of(&name)
                        && target != module
                    {
                        edges
                            .entry(target)
                            .or_insert_with(|| format!("{}: {}", file.display(), code));
                    }
                }
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

#[test]
fn engine_modules_are_layered_and_import_nothing_from_above() {
    let graph = engine_imports();
    for module in graph.keys() {
        assert!(
            layer_of(module).is_some(),
            "module {module} has no layer: add it to LAYERS here and to docs/ARCHITECTURE.md"
        );
    }
    for (module, edges) in &graph {
        let (layer, pos) = layer_of(module).unwrap();
        for (target, line) in edges {
            let Some((t_layer, t_pos)) = layer_of(target) else {
                panic!("{module} imports unknown module {target}: {line}");
            };
            let steps = layer_of("steps::validate").map(|(l, _)| l);
            let downward =
                t_layer < layer || (t_layer == layer && Some(layer) == steps && t_pos < pos);
            assert!(
                downward,
                "{module} imports {target}, which is not below it:\n  {line}"
            );
        }
    }
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
}
