//! What the console's benches share: a workspace to fill.

/// A workspace whose `pde.toml` lists `services` services (`SVC-0`, …) in
/// each of `envs`, at an address nothing answers: the benches never ask
/// the agents. Its state (`.pde`) is left for the bench to fill.
pub fn workspace(envs: &[&str], services: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("policies")).unwrap();
    std::fs::create_dir_all(root.join("plugins")).unwrap();
    let mut toml =
        String::from("policies = \"policies\"\nplugins = \"plugins\"\nstate = \".pde\"\n");
    for env in envs {
        toml.push_str(&format!("[environments.{env}]\n"));
        for s in 0..services {
            toml.push_str(&format!(
                "[[environments.{env}.services]]\nname = \"SVC-{s}\"\nurl = \"http://127.0.0.1:1\"\n"
            ));
        }
    }
    std::fs::write(root.join("pde.toml"), toml).unwrap();
    dir
}
