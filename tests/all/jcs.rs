//! pde's RFC 8785 canonical JSON and `pde.bundle/v2` digests, checked against
//! an independent implementation in another language: Python's `rfc8785`
//! and `pynacl`, from the venv that `scripts/test.sh` creates (`ensure_pyenv` in scripts/lib.sh)
//! (`scripts/test.sh` exports its python as `PDE_TEST_PYTHON`).
// Test code: a failed unwrap is a failed test, with its location.

use crate::support;

use support::{both, pde, stderr};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

/// The venv python. Unset is a failure, not a skip: these tests are the only
/// evidence that an outsider can recompute a digest.
fn python() -> PathBuf {
    let py = std::env::var_os("PDE_TEST_PYTHON").unwrap_or_else(|| {
        panic!(
            "PDE_TEST_PYTHON is not set: these tests need a python with rfc8785 and pynacl. \
             Run `bash scripts/test.sh`, or first: `. scripts/lib.sh; export PDE_TEST_PYTHON=$(ensure_pyenv target)/bin/python`."
        )
    });
    PathBuf::from(py)
}

fn run_python(script: &str, args: &[&Path], stdin: &[u8]) -> Output {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("PDE_TEST_PYTHON runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// JSON texts on which the two implementations must agree byte for byte.
fn corpus() -> Vec<String> {
    let mut texts: Vec<String> = [
        // Floats that JCS writes differently from serde_json.
        "1.0",
        "-1.0",
        "4.50",
        "2.5e-7",
        "1e-7",
        "1e21",
        "1e+21",
        "1E30",
        "0.1",
        "0.30000000000000004",
        "333333333.33333329",
        "0.000001",
        "0.0000001",
        "1.7976931348623157e308",
        "5e-324",
        "2.2250738585072014e-308",
        "-0",
        "-0.0",
        "0",
        // Integers up to 2^53-1.
        "9007199254740991",
        "-9007199254740991",
        "9007199254740990",
        "4294967296",
        "42000",
        // Strings: non-ASCII, escapes, control characters, surrogate pairs.
        r#""grüße, Ωmega, 日本語""#,
        r#""\u0000\u0001\u001f\u007f\u0080\u2028\u2029""#,
        r#""quote \" backslash \\ slash / tab \t nl \n cr \r bs \b ff \f""#,
        r#""\ud83d\ude00 emoji and \u00e9 and \u20ac""#,
        r#""</script>""#,
        // Keys sorted by UTF-16 code units (RFC 8785 §3.2.3's own example).
        r#"{"\u20ac":"Euro Sign","\r":"Carriage Return","\ufb33":"Hebrew Letter Dalet With Dagesh","1":"One","\ud83d\ude00":"Emoji: Grinning Face","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis"}"#,
        r#"{"b":[1.0,{"z":null,"a":true}],"a":{"é":2.5e-7,"e":1e21},"":false}"#,
        // RFC 8785 appendix: the numbers example.
        r#"{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],"string":"\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/","literals":[null,true,false]}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Random doubles from every part of the range, deterministically.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut floats = Vec::new();
    while floats.len() < 3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = f64::from_bits(x);
        // Doubles from 2^53 up to 1e21 are refused by pde (see
        // `doubles_jcs_writes_as_unsafe_integers_cannot_be_read_back`).
        if f.is_finite() && !(f.abs() >= 9_007_199_254_740_992.0 && f.abs() < 1e21) {
            floats.push(json!(f));
        }
    }
    texts.push(Value::Array(floats).to_string());
    // Integers near 2^53 and random ones below it.
    let max = (1u64 << 53) - 1;
    let ints: Vec<Value> = (0..2000u64)
        .map(|i| {
            let v = if i < 500 {
                max - i
            } else {
                i.wrapping_mul(0x2545_f491_4f6c_dd1d) % max
            };
            if i % 2 == 0 {
                json!(v)
            } else {
                json!(-(v as i64))
            }
        })
        .collect();
    texts.push(Value::Array(ints).to_string());
    texts
}

const PY_CANONICALISE: &str = r#"
import json, sys, rfc8785
out = []
for text in json.load(sys.stdin):
    out.append(rfc8785.dumps(json.loads(text)).hex())
json.dump(out, sys.stdout)
"#;

#[test]
fn pde_writes_the_same_rfc_8785_bytes_as_an_independent_python_implementation() {
    let texts = corpus();
    let o = run_python(
        PY_CANONICALISE,
        &[],
        serde_json::to_string(&texts).unwrap().as_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs: Vec<String> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(theirs.len(), texts.len());
    for (text, theirs) in texts.iter().zip(theirs) {
        let value: Value = serde_json::from_str(text).unwrap();
        let ours = pde::bundle::jcs(&value).unwrap();
        let theirs = hex::decode(theirs).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "input {}",
            &text[..text.len().min(200)]
        );
    }
}

#[test]
fn integers_a_double_cannot_hold_are_refused_by_both_implementations() {
    for text in [
        "9007199254740992",
        "-9007199254740993",
        "18446744073709551615",
    ] {
        let value: Value = serde_json::from_str(text).unwrap();
        assert!(pde::bundle::jcs(&value).is_err(), "pde accepted {text}");
        let o = run_python(
            "import json, sys, rfc8785\nrfc8785.dumps(json.loads(sys.stdin.read()))",
            &[],
            text.as_bytes(),
        );
        assert!(!o.status.success(), "rfc8785 accepted {text}");
    }
}

#[test]
fn doubles_jcs_writes_as_unsafe_integers_cannot_be_read_back() {
    // RFC 8785 writes 1e20 as "100000000000000000000": every JSON reader then
    // sees an integer beyond ±(2^53−1), which stock JCS libraries refuse. A
    // bundle holding such a double could not be re-verified by a service, so
    // pde refuses it at validation (found by tests/all/fuzz.rs).
    for text in [
        "1e20",
        "123456789012345680000.0",
        "-9007199254740992.0",
        "4.876967313192871e17",
    ] {
        let value: Value = serde_json::from_str(text).unwrap();
        assert!(pde::bundle::jcs(&value).is_err(), "pde accepted {text}");
        let o = run_python(
            "import json, sys, rfc8785\n\
             once = rfc8785.dumps(json.loads(sys.stdin.read()))\n\
             rfc8785.dumps(json.loads(once))",
            &[],
            text.as_bytes(),
        );
        assert!(
            !o.status.success(),
            "rfc8785 re-read its own output of {text}"
        );
    }
}

/// The Python block of `docs/agent.md` after its `verify-v2-bundle` marker.
fn doc_snippet() -> String {
    doc_snippet_after("verify-v2-bundle", 12)
}

/// The Python block of `docs/agent.md` after the marker `<!-- NAME`, which
/// must have at most `max_lines` non-blank lines.
fn doc_snippet_after(name: &str, max_lines: usize) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/agent.md"))
        .unwrap();
    let after = doc
        .split_once(&format!("<!-- {name}"))
        .unwrap_or_else(|| panic!("docs/agent.md has the {name} marker"))
        .1;
    let block = after
        .split_once("```python\n")
        .expect("a python block follows the marker")
        .1;
    let code = block.split_once("\n```").expect("the block ends").0;
    let lines = code.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        lines <= max_lines,
        "the doc's {name} block should stay short; it has {lines} lines"
    );
    code.to_string()
}

/// Policy 42 with floats, large and small numbers and non-ASCII text.
fn awkward_policy() -> Value {
    let mut p = support::policy_42("1.0.0");
    p["title"] = json!("Aide au chauffage — hiver 2027 (Ωmega, 日本語, \u{1F600})");
    p["rules"][0]["value"] = json!(18.0);
    p["rules"][1]["value"] = json!(42000.50);
    p["rules"][2]["value"] = json!(9_007_199_254_740_991_u64);
    p["config"] = json!({
        "rate": 2.5e-7, "ceiling": 1e21, "tiny": 5e-324, "huge": 1.7976931348623157e308,
        "neg_zero": -0.0, "ratio": 0.1, "grüße": "tab\t\"quoted\"\\ \u{7f} \u{2028}",
        "\u{20ac}": 1, "\r": 2, "\u{fb33}": 3, "\u{1F600}": 4
    });
    p
}

fn packaged_bundle(ws: &support::Workspace) -> PathBuf {
    let out = ws.root().join("out");
    let o = pde(ws.root(), &["package", "42", "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".bundle.json"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.pop().unwrap()
}

#[test]
fn the_python_in_docs_agent_md_verifies_a_v2_bundle_made_by_pde_and_refuses_a_tampered_one() {
    let ws = support::Workspace::new("");
    ws.write_policy("42.json", &awkward_policy().to_string());
    ws.commit("policy 42 with awkward numbers");
    let bundle_path = packaged_bundle(&ws);
    let bundle: Value = serde_json::from_slice(&std::fs::read(&bundle_path).unwrap()).unwrap();
    assert_eq!(bundle["format"], "pde.bundle/v2");
    let digest = bundle["digest"].as_str().unwrap().to_string();
    let snippet = doc_snippet();
    let public = ws.release_pub();

    let o = run_python(&snippet, &[&bundle_path, &public], b"");
    assert!(
        o.status.success(),
        "the documented check refused pde's own bundle: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("ok {digest}")
    );

    // A float changed in the payload: the digest no longer matches.
    let mut tampered = bundle.clone();
    tampered["payload"]["policy"]["config"]["rate"] = json!(2.6e-7);
    let tampered_path = ws.root().join("tampered.json");
    std::fs::write(&tampered_path, tampered.to_string()).unwrap();
    let o = run_python(&snippet, &[&tampered_path, &public], b"");
    assert!(!o.status.success(), "a tampered payload passed");
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not hash"));

    // A forged signature over the right digest fails the signature check.
    let mut forged = bundle.clone();
    let sig = forged["signatures"][0]["sig"].as_str().unwrap().to_string();
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    forged["signatures"][0]["sig"] = json!(format!("{flipped}{}", &sig[1..]));
    let forged_path = ws.root().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let o = run_python(&snippet, &[&forged_path, &public], b"");
    assert!(!o.status.success(), "a forged signature passed");
    assert!(String::from_utf8_lossy(&o.stderr).contains("BadSignatureError"));

    // The digest pde computed is the one Python computes over the file pde wrote.
    let o = run_python(
        "import hashlib, json, sys, rfc8785\nb = json.load(open(sys.argv[1], encoding='utf-8'))\nprint('sha256:' + hashlib.sha256(rfc8785.dumps(b['payload'])).hexdigest())",
        &[&bundle_path],
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), digest);
}

#[test]
fn a_policy_number_jcs_cannot_hold_is_a_validation_finding_with_its_pointer() {
    let ws = support::Workspace::new("");
    let mut p = support::policy_42("1.0.0");
    p["rules"][1]["value"] = json!(9_007_199_254_740_993_u64);
    ws.write_policy("42.json", &p.to_string());
    ws.commit("too big");
    let o = pde(ws.root(), &["validate", "42"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(both(&o).contains("/rules/1/value"), "{}", both(&o));
    assert!(both(&o).contains("9007199254740993"), "{}", both(&o));

    // YAML can spell NaN; it is refused where it stands (line and column),
    // not turned into null.
    std::fs::remove_file(ws.root().join("policies/42.json")).unwrap();
    let yaml = "id: \"42\"\nversion: 1.0.0\ntitle: t\nagency: HMS\neffective: \"2099-01-01\"\n\
                approvals: []\nrules:\n  - key: heating.rate\n    category: eligibility\n    value: .nan\n    description: d\nconfig: {}\n";
    ws.write_policy("42.yaml", yaml);
    ws.commit("nan");
    let o = pde(ws.root(), &["validate", "42"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(both(&o).contains("line 10, column 12"), "{}", both(&o));
    assert!(both(&o).contains(".nan"), "{}", both(&o));
}

#[test]
fn the_python_in_docs_agent_md_counts_the_approvals_pde_carries_and_refuses_forgeries() {
    let ws = support::Workspace::new("");
    let dir = ws.root().join("keys/approvers");
    for name in ["ana", "bo"] {
        pde::keys::generate(&dir, name).unwrap();
    }
    let toml_path = ws.root().join("pde.toml");
    let toml = std::fs::read_to_string(&toml_path).unwrap().replace(
        "plugin_keys = [\"keys/security.ed25519.pub\"]\n",
        "plugin_keys = [\"keys/security.ed25519.pub\"]\n\
         approver_keys = [{ file = \"keys/approvers/ana.pub\" }, { file = \"keys/approvers/bo.pub\" }]\n",
    );
    std::fs::write(&toml_path, toml).unwrap();
    ws.write_policy("42.json", &awkward_policy().to_string());
    for name in ["ana", "bo"] {
        let key = dir.join(name);
        let o = pde(
            ws.root(),
            &[
                "approve",
                "42",
                "--key",
                key.to_str().unwrap(),
                "--by",
                name,
            ],
        );
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    }
    ws.commit("policy 42, approved");
    let bundle_path = packaged_bundle(&ws);
    let bundle: Value = serde_json::from_slice(&std::fs::read(&bundle_path).unwrap()).unwrap();
    assert_eq!(bundle["approvals"].as_array().unwrap().len(), 2, "{bundle}");
    let content = pde::approval::policy_digest(&awkward_policy()).unwrap();
    let snippet = doc_snippet_after("verify-approvals", 16);
    let (ana, bo) = (dir.join("ana.pub"), dir.join("bo.pub"));

    let o = run_python(&snippet, &[&bundle_path, &ana, &bo], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("2 approvals of {content}")
    );
    // Only keys the verifier trusts count.
    let o = run_python(&snippet, &[&bundle_path, &ana], b"");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("1 approvals of {content}")
    );
    // An approval whose role was altered after signing is a forgery.
    let mut forged = bundle.clone();
    forged["approvals"][0]["statement"]["role"] = json!("legal");
    let forged_path = ws.root().join("forged.json");
    std::fs::write(&forged_path, forged.to_string()).unwrap();
    let o = run_python(&snippet, &[&forged_path, &ana, &bo], b"");
    assert!(!o.status.success(), "an altered approval passed");
    assert!(String::from_utf8_lossy(&o.stderr).contains("BadSignatureError"));
    // A policy edited after approval: no approval is for this content.
    let mut edited = bundle.clone();
    edited["payload"]["policy"]["rules"][0]["value"] = json!(21);
    let edited_path = ws.root().join("edited.json");
    std::fs::write(&edited_path, edited.to_string()).unwrap();
    let o = run_python(&snippet, &[&edited_path, &ana, &bo], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("0 approvals of "));
}
