//! `pde plugin new`: a Rust or Python plugin project an outside author can
//! build and `pde plugin test` as generated.
//!
//! The templates live in `host/cli/templates/plugin-rust/` and
//! `plugin-python/` as plain files (compiled in with `include_str!`), so
//! they read as the author will see them. For Rust, the SDK dependency is
//! the one line that differs between a source checkout, a git URL and
//! crates.io, so it is chosen here and printed. A Python project carries
//! the WIT it is built against (componentize-py reads it from `wit/`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pde::ExitCode;

use super::{CmdResult, Ctx, Failure};

/// The kind of plugin to scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NewKind {
    /// Looks at a policy and reports findings.
    Validator,
    /// Picks the services of an environment that get a policy.
    Router,
}

/// The language of the scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A Rust crate on the `pde-plugin` SDK, built for `wasm32-wasip2`.
    Rust,
    /// A Python module built with componentize-py.
    Python,
}

/// `pde plugin new` arguments.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The plugin's name: lowercase letters, digits and `-`, starting with a letter.
    pub name: String,
    /// Validator or router.
    #[arg(long, value_enum)]
    pub kind: NewKind,
    /// The plugin's language.
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: Lang,
    /// The directory to create (default: NAME, under `-C`). It must not exist.
    // Its own id: `dir` is the global `-C`'s, which clap would copy in here.
    #[arg(long = "dir", id = "project_dir", value_name = "DIR")]
    pub project_dir: Option<PathBuf>,
    /// Depend on the SDK at this path (a checkout's `plugins/sdk` or a
    /// vendored copy). Default: the published `pde-plugin` from crates.io,
    /// never a path found on this machine.
    #[arg(long, value_name = "DIR", conflicts_with = "sdk_git")]
    pub sdk_path: Option<PathBuf>,
    /// Depend on the SDK from this git repository (the pde repository's URL).
    #[arg(long, value_name = "URL")]
    pub sdk_git: Option<String>,
}

const CARGO_TOML: &str = include_str!("../../templates/plugin-rust/Cargo.toml.tmpl");
const README: &str = include_str!("../../templates/plugin-rust/README.md.tmpl");
const GITIGNORE: &str = include_str!("../../templates/plugin-rust/gitignore.tmpl");
const POLICY: &str = include_str!("../../templates/plugin-rust/policy.json.tmpl");
const SERVICES: &str = include_str!("../../templates/plugin-rust/services.toml.tmpl");
const VALIDATOR_RS: &str = include_str!("../../templates/plugin-rust/validator.rs.tmpl");
const VALIDATOR_TOML: &str = include_str!("../../templates/plugin-rust/validator.toml.tmpl");
const ROUTER_RS: &str = include_str!("../../templates/plugin-rust/router.rs.tmpl");
const ROUTER_TOML: &str = include_str!("../../templates/plugin-rust/router.toml.tmpl");

const PY_README: &str = include_str!("../../templates/plugin-python/README.md.tmpl");
const PY_GITIGNORE: &str = include_str!("../../templates/plugin-python/gitignore.tmpl");
const PY_VALIDATOR: &str = include_str!("../../templates/plugin-python/validator.py.tmpl");
const PY_VALIDATOR_TEST: &str =
    include_str!("../../templates/plugin-python/test_validator.py.tmpl");
const PY_ROUTER: &str = include_str!("../../templates/plugin-python/router.py.tmpl");
const PY_ROUTER_TEST: &str = include_str!("../../templates/plugin-python/test_router.py.tmpl");
/// The contract a Python project is built against, shipped inside it
/// because componentize-py reads WIT from disk and an outside author has no
/// pde checkout.
const WIT: &str = include_str!("../../../../wit/v0.1.0/plugin.wit");

/// The componentize-py release a Python project's README installs: the
/// one the test suite builds with (scripts/requirements-test.txt).
pub const COMPONENTIZE_PY: &str = "0.25.1";

/// The SDK's version on crates.io that a scaffold asks for by default: the
/// major.minor of `plugins/sdk/Cargo.toml` (a test keeps them in step).
pub const SDK_VERSION: &str = "0.2";

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && name.len() <= 64
}

/// The `pde-plugin = …` line of the generated Cargo.toml, and where it points.
fn sdk_line(args: &NewArgs) -> Result<(String, String), Failure> {
    let path_line = |dir: &Path| -> Result<(String, String), Failure> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--sdk-path {}", dir.display()))
            .map_err(Failure::usage_error)?;
        if !dir.join("Cargo.toml").is_file() {
            return Err(Failure::usage(format!(
                "--sdk-path {}: no Cargo.toml there (point it at the pde repository's plugins/sdk)",
                dir.display()
            )));
        }
        // TOML basic strings escape backslashes and quotes; a Debug string does both.
        let shown = dir.display().to_string();
        Ok((
            format!("pde-plugin = {{ path = {shown:?} }}"),
            format!("the SDK at {shown}"),
        ))
    };
    if let Some(dir) = &args.sdk_path {
        return path_line(dir);
    }
    if let Some(url) = &args.sdk_git {
        return Ok((
            format!("pde-plugin = {{ git = {url:?} }}"),
            format!("the SDK from {url}"),
        ));
    }
    // Never the checkout pde was built from, even when it still exists: a
    // project must build the same on its author's machine, in their CI and
    // for whoever reviews it, so only an explicit --sdk-path names a path.
    Ok((
        format!("pde-plugin = {SDK_VERSION:?}"),
        format!("pde-plugin {SDK_VERSION} from crates.io"),
    ))
}

fn render(template: &str, vars: &[(&str, &str)]) -> String {
    vars.iter()
        .fold(template.to_string(), |text, (key, value)| {
            text.replace(&format!("{{{{{key}}}}}"), value)
        })
}

/// Creates the project.
pub fn new(ctx: &Ctx, args: NewArgs) -> CmdResult {
    if !valid_name(&args.name) {
        return Err(Failure::usage(format!(
            "plugin name {:?}: use lowercase letters, digits and '-', starting with a letter",
            args.name
        )));
    }
    let dir = ctx.dir.join(
        args.project_dir
            .clone()
            .unwrap_or_else(|| args.name.clone().into()),
    );
    if dir.exists() {
        return Err(Failure::usage(format!(
            "{} already exists; pick another NAME or --dir",
            dir.display()
        )));
    }
    let (kind, manifest, try_args, router_note) = match args.kind {
        NewKind::Validator => ("validator", VALIDATOR_TOML, "--env production", ""),
        NewKind::Router => (
            "router",
            ROUTER_TOML,
            "--services services.toml",
            ", and `--services FILE` the services it chooses from",
        ),
    };
    let project = match args.lang {
        Lang::Rust => rust_files(&args, kind, try_args, router_note)?,
        Lang::Python => python_files(&args, kind, try_args, router_note),
    };
    let mut files = project.files;
    files.push((
        format!("{}.toml", args.name).into(),
        render(manifest, &[("name", args.name.as_str())]),
    ));
    files.push(("policy.json".into(), POLICY.to_string()));
    if args.kind == NewKind::Router {
        files.push(("services.toml".into(), SERVICES.to_string()));
    }
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))
                .map_err(Failure::usage_error)?;
        }
        std::fs::write(&path, text)
            .with_context(|| format!("writing {}", path.display()))
            .map_err(Failure::usage_error)?;
    }
    if ctx.json {
        ctx.print_json(&serde_json::json!({
            "dir": dir,
            "name": args.name,
            "kind": kind,
            "lang": project.lang,
            "sdk": project.sdk,
            "files": files.iter().map(|(rel, _)| rel).collect::<Vec<_>>(),
            "wasm": project.wasm,
        }));
    } else {
        println!(
            "created {kind} plugin {} in {} ({})",
            args.name,
            dir.display(),
            project.from
        );
        println!("next:");
        println!("  cd {}", dir.display());
        for step in &project.build {
            println!("  {step}");
        }
        println!(
            "  pde plugin test {} --policy policy.json {try_args}",
            project.wasm
        );
    }
    Ok(ExitCode::Ok)
}

/// What one language contributes to a project.
struct Project {
    lang: &'static str,
    /// The language's own files (sources, test, README, ignore list).
    files: Vec<(PathBuf, String)>,
    /// The SDK line (Rust) or `null`, for `--output json`.
    sdk: Option<String>,
    /// Where the plugin's dependencies come from, for the summary line.
    from: String,
    /// The build commands, as the README gives them.
    build: Vec<String>,
    /// The component the build writes, relative to the project.
    wasm: String,
}

fn rust_files(
    args: &NewArgs,
    kind: &str,
    try_args: &str,
    router_note: &str,
) -> Result<Project, Failure> {
    let (sdk, sdk_from) = sdk_line(args)?;
    let crate_name = args.name.replace('-', "_");
    let lib = match args.kind {
        NewKind::Validator => VALIDATOR_RS,
        NewKind::Router => ROUTER_RS,
    };
    let vars = [
        ("name", args.name.as_str()),
        ("crate", crate_name.as_str()),
        ("kind", kind),
        ("sdk", sdk.as_str()),
        ("try", try_args),
        ("router_note", router_note),
    ];
    Ok(Project {
        lang: "rust",
        files: vec![
            ("Cargo.toml".into(), render(CARGO_TOML, &vars)),
            ("src/lib.rs".into(), render(lib, &vars)),
            ("README.md".into(), render(README, &vars)),
            (".gitignore".into(), GITIGNORE.to_string()),
        ],
        from: format!("depending on {sdk_from}"),
        sdk: Some(sdk),
        build: vec!["cargo build --target wasm32-wasip2 --release".to_string()],
        wasm: format!("target/wasm32-wasip2/release/{crate_name}.wasm"),
    })
}

fn python_files(args: &NewArgs, kind: &str, try_args: &str, router_note: &str) -> Project {
    let (app, test, export) = match args.kind {
        NewKind::Validator => (PY_VALIDATOR, PY_VALIDATOR_TEST, "validate"),
        NewKind::Router => (PY_ROUTER, PY_ROUTER_TEST, "route"),
    };
    let vars = [
        ("name", args.name.as_str()),
        ("kind", kind),
        ("export", export),
        ("componentize_py", COMPONENTIZE_PY),
        ("try", try_args),
        ("router_note", router_note),
    ];
    // In build/, as componentize-py users expect; `plugin test` finds the
    // manifest template in the project above it (its empty sha256 taken
    // from the build), as it does for a Rust project's target/.
    let wasm = format!("build/{}.wasm", args.name);
    Project {
        lang: "python",
        files: vec![
            ("app.py".into(), render(app, &vars)),
            ("test_app.py".into(), test.to_string()),
            ("wit/plugin.wit".into(), WIT.to_string()),
            ("README.md".into(), render(PY_README, &vars)),
            (".gitignore".into(), PY_GITIGNORE.to_string()),
        ],
        sdk: None,
        from: "built with componentize-py against pde:plugin@0.1.0".to_string(),
        build: vec![
            format!("pip install componentize-py=={COMPONENTIZE_PY}"),
            "mkdir -p build".to_string(),
            format!("componentize-py --wit-path wit --world {kind} componentize app -o {wasm}"),
        ],
        wasm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_crate_and_file_safe() {
        for ok in ["bounds", "my-check2", "a"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Bounds", "2x", "a_b", "a-", "../x", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn python_projects_fill_every_placeholder_and_carry_the_wit() {
        for kind in [NewKind::Validator, NewKind::Router] {
            let args = NewArgs {
                name: "my-check".into(),
                kind,
                lang: Lang::Python,
                project_dir: None,
                sdk_path: None,
                sdk_git: None,
            };
            let (k, try_args) = match kind {
                NewKind::Validator => ("validator", "--env production"),
                NewKind::Router => ("router", "--services services.toml"),
            };
            let project = python_files(&args, k, try_args, "");
            for (rel, text) in &project.files {
                assert!(!text.contains("{{"), "{}: {text}", rel.display());
            }
            assert!(project.files.iter().any(|(rel, text)| {
                rel == Path::new("wit/plugin.wit") && text.contains("package pde:plugin@0.1.0;")
            }));
            assert_eq!(project.wasm, "build/my-check.wasm");
        }
    }

    #[test]
    fn the_default_sdk_is_the_published_version_of_this_sdk() {
        let args = NewArgs {
            name: "my-check".into(),
            kind: NewKind::Validator,
            lang: Lang::Rust,
            project_dir: None,
            sdk_path: None,
            sdk_git: None,
        };
        let Ok((line, from)) = sdk_line(&args) else {
            panic!("the default SDK line");
        };
        assert_eq!(line, format!("pde-plugin = {SDK_VERSION:?}"));
        assert!(from.contains("crates.io"), "{from}");
        let manifest = include_str!("../../../../plugins/sdk/Cargo.toml");
        let version = manifest
            .lines()
            .find_map(|l| l.strip_prefix("version = \""))
            .and_then(|v| v.strip_suffix('"'))
            .unwrap();
        assert!(
            version.starts_with(&format!("{SDK_VERSION}.")),
            "SDK_VERSION {SDK_VERSION} is not the major.minor of plugins/sdk ({version})"
        );
    }

    #[test]
    fn render_fills_every_placeholder() {
        let text = render(
            "{{name}} is a {{kind}}",
            &[("name", "x"), ("kind", "router")],
        );
        assert_eq!(text, "x is a router");
    }
}
