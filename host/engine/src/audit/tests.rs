//! The audit log over its file store: chaining, every kind of tampering,
//! anchors, signed heads, concurrency and redaction. The PostgreSQL store
//! runs the same facade in `tests/all/team.rs`.

use std::fs;
use std::sync::Arc;

use pde_core::{ExitCode, HasExitCode};
use serde_json::{Value, json};

use super::record::hash_of;
use super::*;
use crate::bundle::canonical_json;

fn log_with(n: u64) -> (tempfile::TempDir, AuditLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open_with_actor(dir.path(), "ana").unwrap();
    for i in 0..n {
        log.append(
            Event::Pushed,
            "42",
            "staging",
            json!({"service": format!("svc-{i}")}),
        )
        .unwrap();
    }
    (dir, log)
}

fn read_lines(log: &AuditLog) -> Vec<String> {
    fs::read_to_string(log.path())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(log: &AuditLog, lines: &[String]) {
    fs::write(
        log.path(),
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn tampered(log: &AuditLog) -> (u64, Option<u64>, String) {
    match log.verify() {
        Err(AuditError::Tampered { line, seq, reason }) => (line, seq, reason),
        other => panic!("expected Tampered, got {other:?}"),
    }
}

#[test]
fn events_serialize_exactly_as_the_contract_names_them() {
    let names: Vec<String> = [
        Event::DeployStart,
        Event::Validated,
        Event::ValidationFailed,
        Event::Packaged,
        Event::EnvCheckOk,
        Event::EnvCheckFailed,
        Event::Routed,
        Event::Pushed,
        Event::PushFailed,
        Event::RolledBack,
        Event::Tagged,
        Event::Deployed,
        Event::DeployFailed,
        Event::Unlocked,
    ]
    .iter()
    .map(|e| {
        serde_json::to_value(e)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    })
    .collect();
    assert_eq!(
        names,
        [
            "deploy_start",
            "validated",
            "validation_failed",
            "packaged",
            "env_check_ok",
            "env_check_failed",
            "routed",
            "pushed",
            "push_failed",
            "rolled_back",
            "tagged",
            "deployed",
            "deploy_failed",
            "unlocked"
        ]
    );
}

#[test]
fn records_chain_and_verify() {
    let (_dir, log) = log_with(3);
    let records = log.records().unwrap();
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(records[0].prev, "");
    assert_eq!(records[1].prev, records[0].hash);
    assert_eq!(records[2].prev, records[1].hash);
    assert!(records[0].hash.len() == 64 && records[0].hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(records[0].actor, "ana");
    // The hash is the digest of the canonical record without `hash`.
    let mut v = serde_json::to_value(&records[1]).unwrap();
    v.as_object_mut().unwrap().remove("hash");
    assert_eq!(
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(canonical_json(&v))),
        records[1].hash
    );
    // Each line is the canonical JSON of the record.
    let line = read_lines(&log)[1].clone();
    assert_eq!(
        line.as_bytes(),
        canonical_json(&serde_json::to_value(&records[1]).unwrap())
    );
    let report = log.verify().unwrap();
    assert_eq!(
        report,
        VerifyReport {
            records: 3,
            last_hash: records[2].hash.clone(),
            anchors_checked: 0,
            head_signature: "not checked".into(),
        }
    );
}

#[test]
fn an_empty_log_verifies() {
    let (_dir, log) = log_with(0);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport {
            records: 0,
            last_hash: String::new(),
            anchors_checked: 0,
            head_signature: "not checked".into(),
        }
    );
}

#[test]
fn the_chain_continues_across_reopen() {
    let (dir, log) = log_with(2);
    drop(log);
    let log = AuditLog::open_with_actor(dir.path(), "bo").unwrap();
    let r = log
        .append(Event::Deployed, "42", "staging", json!({}))
        .unwrap();
    assert_eq!(r.seq, 3);
    assert_eq!(r.actor, "bo");
    assert_eq!(log.verify().unwrap().records, 3);
}

#[test]
fn an_edit_names_the_edited_record() {
    let (_dir, log) = log_with(4);
    let mut lines = read_lines(&log);
    lines[1] = lines[1].replace("svc-1", "svc-X");
    write_lines(&log, &lines);
    let (line, seq, reason) = tampered(&log);
    assert_eq!((line, seq), (2, Some(2)));
    assert!(reason.contains("edited"), "{reason}");
    // And the damaged log is not extended.
    let e = log.append(Event::Deployed, "42", "staging", json!({}));
    assert!(e.is_ok(), "the tail is intact, so appends continue: {e:?}");
    assert_eq!(tampered(&log).0, 2);
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    let (_dir, log) = log_with(4);
    let mut lines = read_lines(&log);
    let mut v: Value = serde_json::from_str(&lines[1]).unwrap();
    v["data"]["service"] = json!("forged");
    let hash = hash_of(&mut v);
    v["hash"] = json!(hash);
    lines[1] = String::from_utf8(canonical_json(&v)).unwrap();
    write_lines(&log, &lines);
    let (line, seq, reason) = tampered(&log);
    assert_eq!((line, seq), (3, Some(3)));
    assert!(reason.contains("prev"), "{reason}");
}

#[test]
fn a_deletion_names_the_record_after_the_gap() {
    let (_dir, log) = log_with(4);
    let mut lines = read_lines(&log);
    lines.remove(1);
    write_lines(&log, &lines);
    let (line, seq, reason) = tampered(&log);
    assert_eq!((line, seq), (2, Some(3)));
    assert!(reason.contains("deleted"), "{reason}");
}

#[test]
fn a_reordering_is_detected() {
    let (_dir, log) = log_with(4);
    let mut lines = read_lines(&log);
    lines.swap(1, 2);
    write_lines(&log, &lines);
    let (line, seq, _) = tampered(&log);
    assert_eq!((line, seq), (2, Some(3)));
}

#[test]
fn cutting_records_off_the_end_is_detected_by_the_head() {
    let (_dir, log) = log_with(4);
    let mut lines = read_lines(&log);
    lines.truncate(2);
    write_lines(&log, &lines);
    let (line, seq, reason) = tampered(&log);
    assert_eq!((line, seq), (3, Some(3)));
    assert!(reason.contains("cut off"), "{reason}");
    // Appending would hide the cut, so it is refused.
    let e = log
        .append(Event::Deployed, "42", "staging", json!({}))
        .unwrap_err();
    assert!(matches!(e, AuditError::Tampered { line: 3, .. }), "{e}");
    assert_eq!(e.exit_code(), ExitCode::Integrity);
    // Emptying the log is a truncation too.
    write_lines(&log, &[]);
    assert_eq!(tampered(&log).1, Some(1));
}

#[test]
fn a_torn_tail_is_detected_and_blocks_appends() {
    let (_dir, log) = log_with(3);
    let bytes = fs::read(log.path()).unwrap();
    fs::write(log.path(), &bytes[..bytes.len() - 10]).unwrap();
    let (line, seq, reason) = tampered(&log);
    assert_eq!((line, seq), (3, Some(3)));
    assert!(reason.contains("incomplete"), "{reason}");
    let e = log
        .append(Event::Deployed, "42", "staging", json!({}))
        .unwrap_err();
    assert!(matches!(e, AuditError::Tampered { line: 3, .. }), "{e}");
}

#[test]
fn truncation_in_the_middle_names_the_cut_line() {
    let (_dir, log) = log_with(5);
    let bytes = fs::read(log.path()).unwrap();
    let lines = read_lines(&log);
    let cut = lines[0].len() + 1 + lines[1].len() / 2;
    fs::write(log.path(), &bytes[..cut]).unwrap();
    let (line, seq, _) = tampered(&log);
    assert_eq!((line, seq), (2, Some(2)));
}

#[test]
fn a_log_ahead_of_its_head_verifies_but_a_wrong_head_does_not() {
    let (dir, log) = log_with(2);
    let head = dir.path().join(HEAD_FILE);
    let old = fs::read(&head).unwrap();
    log.append(Event::Pushed, "42", "staging", json!({}))
        .unwrap();
    log.append(Event::Pushed, "42", "staging", json!({}))
        .unwrap();
    // As if a crash had lost the last head renames.
    fs::write(&head, &old).unwrap();
    assert_eq!(log.verify().unwrap().records, 4);
    let next = log
        .append(Event::Deployed, "42", "staging", json!({}))
        .unwrap();
    assert_eq!(next.seq, 5);
    // A head naming another record at its seq means the log was rewritten.
    let records = log.records().unwrap();
    let forged = json!({"seq": 3, "hash": records[1].hash});
    fs::write(&head, forged.to_string()).unwrap();
    let (line, seq, reason) = tampered(&log);
    assert_eq!((line, seq), (3, Some(3)));
    assert!(reason.contains("rewritten"), "{reason}");
}

#[test]
fn a_batch_is_one_consecutive_chained_run() {
    let (_dir, log) = log_with(1);
    let entry = |svc: &str| AuditEntry {
        event: Event::Pushed,
        policy_id: "42".into(),
        env: "prod".into(),
        data: json!({"service": svc, "token": "t0k"}),
    };
    let written = log
        .append_all(vec![entry("a"), entry("b"), entry("c")])
        .unwrap();
    assert_eq!(
        written.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    assert_eq!(written[1].prev, written[0].hash);
    assert_eq!(written[2].data["token"], "[redacted]");
    assert_eq!(log.records().unwrap()[1..], written[..]);
    assert_eq!(log.verify().unwrap().last_hash, written[2].hash);
    assert!(log.append_all(vec![]).unwrap().is_empty());
}

#[test]
fn anchors_and_a_signed_head_catch_deletion_and_rewrites() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (dir, log) = log_with(0);
    log.set_head_key(key.clone(), false);
    for i in 0..4 {
        log.append(Event::Pushed, "42", "prod", json!({"i": i}))
            .unwrap();
    }
    let (seq, hash) = log.last().unwrap().unwrap();
    assert_eq!(seq, 4);
    let anchor = Anchor {
        source: "tag policy/42/v1.0.0/prod".into(),
        head: Some((3, log.records().unwrap()[2].hash.clone())),
    };
    let vk = key.verifying_key();
    let report = log
        .verify_anchored(std::slice::from_ref(&anchor), Some(&vk))
        .unwrap();
    assert_eq!(
        (report.anchors_checked, report.head_signature.as_str()),
        (1, "valid")
    );
    assert_eq!(report.last_hash, hash);

    // Both files deleted: the tag still shows a deploy.
    let saved = (
        fs::read(log.path()).unwrap(),
        fs::read(dir.path().join(HEAD_FILE)).unwrap(),
    );
    fs::write(log.path(), "").unwrap();
    fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
    let e = log
        .verify_anchored(std::slice::from_ref(&anchor), Some(&vk))
        .unwrap_err();
    assert!(matches!(e, AuditError::Anchor { .. }), "{e}");
    assert_eq!(e.exit_code(), ExitCode::Integrity);
    let old_tag = Anchor {
        head: None,
        ..anchor.clone()
    };
    assert!(log.verify_anchored(&[old_tag], None).is_err());
    assert!(
        log.verify_anchored(&[], None).is_ok(),
        "no anchors, nothing to contradict"
    );

    // A rewritten chain with a fresh head: consistent, but not the tagged one.
    let other = tempfile::tempdir().unwrap();
    let forged = AuditLog::open_with_actor(other.path(), "mallory").unwrap();
    for i in 0..4 {
        forged
            .append(Event::Pushed, "42", "prod", json!({"i": i}))
            .unwrap();
    }
    fs::write(log.path(), fs::read(forged.path()).unwrap()).unwrap();
    fs::write(
        dir.path().join(HEAD_FILE),
        fs::read(other.path().join(HEAD_FILE)).unwrap(),
    )
    .unwrap();
    assert!(log.verify().is_ok(), "the chain alone cannot tell");
    let e = log
        .verify_anchored(std::slice::from_ref(&anchor), None)
        .unwrap_err();
    assert!(e.to_string().contains("rewritten"), "{e}");
    // Past the last anchor only the signed head tells.
    let e = log.verify_anchored(&[], Some(&vk)).unwrap_err();
    assert!(e.to_string().contains("not signed"), "{e}");
    let mallory = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    forged.set_head_key(mallory, true);
    forged
        .append(Event::Deployed, "42", "prod", json!({}))
        .unwrap();
    fs::write(log.path(), fs::read(forged.path()).unwrap()).unwrap();
    fs::write(
        dir.path().join(HEAD_FILE),
        fs::read(other.path().join(HEAD_FILE)).unwrap(),
    )
    .unwrap();
    let e = log.verify_anchored(&[], Some(&vk)).unwrap_err();
    assert!(e.to_string().contains("valid signature"), "{e}");
    // ... and an append refuses to re-sign the forged head.
    let e = log
        .append(Event::Deployed, "42", "prod", json!({}))
        .unwrap_err();
    assert!(matches!(e, AuditError::Anchor { .. }), "{e}");

    // Adoption is one append only: the next one checks the head again.
    let fresh = tempfile::tempdir().unwrap();
    let adopted = AuditLog::open_with_actor(fresh.path(), "ana").unwrap();
    adopted
        .append(Event::Pushed, "42", "prod", json!({}))
        .unwrap();
    adopted.set_head_key(key.clone(), true);
    adopted
        .append(Event::Pushed, "42", "prod", json!({}))
        .unwrap();
    adopted.check_head_key(&vk).unwrap();
    adopted
        .append(Event::Pushed, "42", "prod", json!({}))
        .unwrap();

    fs::write(log.path(), &saved.0).unwrap();
    fs::write(dir.path().join(HEAD_FILE), &saved.1).unwrap();
    log.verify_anchored(&[anchor], Some(&vk)).unwrap();
}

#[test]
fn a_deleted_head_file_is_detected() {
    let (dir, log) = log_with(2);
    fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
    let (_, _, reason) = tampered(&log);
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn concurrent_appenders_never_fork_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    // Two handles stand in for two processes: each has its own open file,
    // so only the OS file lock keeps them apart.
    let a = Arc::new(AuditLog::open_with_actor(dir.path(), "a").unwrap());
    let b = Arc::new(AuditLog::open_with_actor(dir.path(), "b").unwrap());
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let log = if t % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                for i in 0..25 {
                    log.append(Event::Pushed, "42", "dev", json!({"t": t, "i": i}))
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(a.verify().unwrap().records, 100);
}

#[test]
fn secret_looking_fields_are_redacted() {
    let (_dir, log) = log_with(0);
    let r = log
        .append(
            Event::Pushed,
            "42",
            "dev",
            json!({"service": "api", "token": "s3cr3t", "headers": [{"Authorization": "Bearer x"}], "api_token": "y"}),
        )
        .unwrap();
    let text = fs::read_to_string(log.path()).unwrap();
    assert!(!text.contains("s3cr3t") && !text.contains("Bearer x") && !text.contains("\"y\""));
    assert_eq!(r.data["service"], "api");
    assert_eq!(r.data["token"], "[redacted]");
    assert!(log.verify().is_ok());
}
