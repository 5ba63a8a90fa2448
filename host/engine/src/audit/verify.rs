//! Checking a chain: every line's hash and link, the sequence, the end
//! against the head, the head's signature, and the anchors outside the log.
//! Pure functions over the stored bytes, so every [`ChainStore`](super::ChainStore)
//! is checked by the same code.

use serde::Serialize;
use serde_json::Value;

use super::error::AuditError;
use super::record::{AuditRecord, Head, hash_of, head_message, lines};
// Messages name the head by its file name, for every store, as pde always has.
use super::file_chain::HEAD_FILE;

/// The result of a successful [`AuditLog::verify`](super::AuditLog::verify).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// How many records the log holds.
    pub records: u64,
    /// The hash of the last record, `""` for an empty log.
    pub last_hash: String,
    /// Release tags whose recorded audit head the log was checked against.
    pub anchors_checked: usize,
    /// The head file's signature: `valid`, or why it was not checked.
    pub head_signature: String,
}

/// An outside record of the log's head: a release tag's `audit-seq` and
/// `audit-hash` lines, or just the fact that a release was tagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// Where it comes from, e.g. `tag policy/42/v1.0.0/prod`.
    pub source: String,
    /// The head `(seq, hash)` it records; `None` for a tag made before
    /// tags carried one (it still shows that a deploy happened).
    pub head: Option<(u64, String)>,
}

/// The whole chain in `bytes` (JSON lines) against `head`: the report, and
/// every record's hash (index = seq - 1) for the anchors.
pub(super) fn check_chain(
    bytes: &[u8],
    head: Option<&Head>,
) -> Result<(VerifyReport, Vec<String>), AuditError> {
    let torn = !bytes.is_empty() && !bytes.ends_with(b"\n");
    let all: Vec<&[u8]> = lines(bytes).collect();
    let mut last: Option<AuditRecord> = None;
    let mut at_head: Option<String> = None;
    let mut hashes = Vec::new();
    let mut line_no = 0u64;
    for (i, line) in all.iter().enumerate() {
        line_no += 1;
        let expected_seq = last.as_ref().map_or(1, |r| r.seq + 1);
        if torn && i + 1 == all.len() {
            return Err(AuditError::Tampered {
                line: line_no,
                seq: Some(expected_seq),
                reason: "the last line is incomplete: a torn write or a truncated log".into(),
            });
        }
        let record = check_line(line, line_no, expected_seq, last.as_ref())?;
        if head.is_some_and(|h| h.seq == record.seq) {
            at_head = Some(record.hash.clone());
        }
        hashes.push(record.hash.clone());
        last = Some(record);
    }
    check_head(last.as_ref(), head, at_head.as_deref(), line_no)?;
    let report = VerifyReport {
        records: last.as_ref().map_or(0, |r| r.seq),
        last_hash: last.map(|r| r.hash).unwrap_or_default(),
        anchors_checked: 0,
        head_signature: "not checked".into(),
    };
    Ok((report, hashes))
}

/// The last record, checked without reading the whole chain: a complete
/// line (`line` ends in `\n`), a valid hash, consistent with the head.
/// Errors carry line numbers relative to the last line (0 = the last line,
/// 1 = one past it): only the caller can afford to count lines.
pub(super) fn check_tail(
    line: Option<&[u8]>,
    head: Option<&Head>,
) -> Result<Option<AuditRecord>, AuditError> {
    let Some(line) = line else {
        return check_head(None, head, None, 0).map(|()| None);
    };
    let Some(line) = line.strip_suffix(b"\n") else {
        return Err(AuditError::Tampered {
            line: 0,
            seq: None,
            reason: "the last line is incomplete: a torn write or a truncated log; run `pde audit verify`".into(),
        });
    };
    let record = check_line(line, 0, 0, None)?;
    // A crash between storing a record and its head leaves the head one
    // behind, and the record's `prev` names the head's record.
    let at_head = head.and_then(|h| match record.seq {
        s if s == h.seq => Some(record.hash.as_str()),
        s if s == h.seq + 1 => Some(record.prev.as_str()),
        _ => None,
    });
    check_head(Some(&record), head, at_head, 0)?;
    Ok(Some(record))
}

/// The anchors outside the log and the head's signature, after
/// [`check_chain`] gave `report` and `hashes`:
/// - every anchor's head must be a record of this log, byte for byte
///   (its hash covers the whole chain before it);
/// - a log with no records while anchors show deploys is not intact;
/// - with `key`, the head must carry a valid signature by it.
pub(super) fn check_anchors(
    mut report: VerifyReport,
    hashes: &[String],
    head: Option<&Head>,
    anchors: &[Anchor],
    key: Option<&ed25519_dalek::VerifyingKey>,
) -> Result<VerifyReport, AuditError> {
    if report.records == 0
        && let Some(a) = anchors.first()
    {
        return Err(AuditError::Anchor {
            reason: format!(
                "the log is empty, but {} (and {} other anchor(s)) show deploys: the log \
                 and its head were deleted or replaced",
                a.source,
                anchors.len() - 1
            ),
        });
    }
    for a in anchors {
        let Some((seq, hash)) = &a.head else { continue };
        match hashes.get(usize::try_from(*seq).unwrap_or(usize::MAX).wrapping_sub(1)) {
            Some(h) if h == hash => report.anchors_checked += 1,
            Some(h) => {
                return Err(AuditError::Anchor {
                    reason: format!(
                        "{} records audit seq {seq} as {hash}, but the log has {h} there: \
                         the log was rewritten",
                        a.source
                    ),
                });
            }
            None => {
                return Err(AuditError::Anchor {
                    reason: format!(
                        "{} records audit seq {seq}, but the log ends at seq {}: records \
                         were deleted",
                        a.source, report.records
                    ),
                });
            }
        }
    }
    report.head_signature = match (key, head) {
        (None, _) => "not checked: the workspace has no [signing] key".into(),
        (Some(_), None) => "no head yet".into(),
        (Some(key), Some(head)) => {
            check_head_signature(head, key)?;
            "valid".into()
        }
    };
    Ok(report)
}

/// The head must carry a valid signature by `key` over its seq and hash.
pub(super) fn check_head_signature(
    head: &Head,
    key: &ed25519_dalek::VerifyingKey,
) -> Result<(), AuditError> {
    let Some(sig) = &head.sig else {
        return Err(AuditError::Anchor {
            reason: format!(
                "{HEAD_FILE} is not signed by the workspace key: it was replaced, or written \
                 before heads were signed (the next deploy signs it)"
            ),
        });
    };
    let mut trusted = crate::keys::TrustedKeys::new();
    trusted.add(*key);
    trusted
        .verify(&head_message(head.seq, &head.hash), sig)
        .map_err(|e| AuditError::Anchor {
            reason: format!(
                "{HEAD_FILE} (seq {}) does not carry a valid signature by the workspace key \
                 ({e}): the head was forged or the log rewritten",
                head.seq
            ),
        })
}

/// Checks one line: JSON, self-hash, record shape, and, when `expected_seq`
/// is not 0, the sequence and the link to `prev`.
fn check_line(
    line: &[u8],
    line_no: u64,
    expected_seq: u64,
    prev: Option<&AuditRecord>,
) -> Result<AuditRecord, AuditError> {
    let bad = |seq, reason: String| AuditError::Tampered {
        line: line_no,
        seq,
        reason,
    };
    let mut value: Value = serde_json::from_slice(line).map_err(|e| {
        bad(
            Some(expected_seq).filter(|s| *s > 0),
            format!("not valid JSON ({e}): edited or torn"),
        )
    })?;
    let seq = value.get("seq").and_then(Value::as_u64);
    let claimed = value
        .get("hash")
        .and_then(Value::as_str)
        .map(str::to_string);
    if !value.is_object() || claimed.is_none() {
        return Err(bad(seq, "not an audit record (no hash)".into()));
    }
    let actual = hash_of(&mut value);
    if claimed.as_deref() != Some(actual.as_str()) {
        return Err(bad(
            seq,
            "the hash does not match the content: the record was edited".into(),
        ));
    }
    let record: AuditRecord =
        serde_json::from_value(value).map_err(|e| bad(seq, format!("not an audit record: {e}")))?;
    if expected_seq == 0 {
        return Ok(record);
    }
    if record.seq != expected_seq {
        let reason = if record.seq > expected_seq {
            format!("expected seq {expected_seq}: records before this one were deleted")
        } else {
            format!("expected seq {expected_seq}: records were reordered or duplicated")
        };
        return Err(bad(Some(record.seq), reason));
    }
    let prev_hash = prev.map_or("", |p| p.hash.as_str());
    if record.prev != prev_hash {
        return Err(bad(
            Some(record.seq),
            "prev does not match the hash of the record before it: that record was rewritten, or records were replaced".into(),
        ));
    }
    Ok(record)
}

/// The log must reach the head, and the record at the head's seq must be
/// the one the head names. `at_head` is that record's hash when known
/// (`None`: not visible from here, e.g. an append several records past a
/// head that a crash left behind; `verify` always knows it).
fn check_head(
    last: Option<&AuditRecord>,
    head: Option<&Head>,
    at_head: Option<&str>,
    lines: u64,
) -> Result<(), AuditError> {
    let (last, head) = match (last, head) {
        (None, None) => return Ok(()),
        (Some(last), None) => {
            return Err(AuditError::Tampered {
                line: lines,
                seq: Some(last.seq),
                reason: format!("{HEAD_FILE} is missing: the log's end cannot be confirmed"),
            });
        }
        (last, Some(head)) => (last, head),
    };
    let have = last.map_or(0, |r| r.seq);
    if have < head.seq {
        return Err(AuditError::Tampered {
            line: lines + 1,
            seq: Some(have + 1),
            reason: format!(
                "the log ends at seq {have} but the head records seq {}: records were cut off the end",
                head.seq
            ),
        });
    }
    match at_head {
        Some(hash) if hash != head.hash => Err(AuditError::Tampered {
            line: lines.saturating_sub(have - head.seq),
            seq: Some(head.seq),
            reason: format!(
                "record {} does not match the head ({}): the end of the log was rewritten",
                head.seq, head.hash
            ),
        }),
        _ => Ok(()),
    }
}
