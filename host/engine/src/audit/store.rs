//! Where a chain is kept: the narrow trait every backend implements.
//!
//! A store keeps bytes, nothing more: the log as JSON lines, the head
//! record's JSON, and the sink's cursor. It never builds, hashes or checks
//! a record; [`AuditLog`](super::AuditLog) does that, once, for every store.
//! What a store owns is how to read its bytes in one consistent snapshot,
//! how to make an append exclusive and durable, and how to claim the cursor.
//! A new backend is one file implementing this trait, plus the line where
//! the engine picks it (see `docs/ARCHITECTURE.md`).

use super::error::AuditError;

/// The last line of a chain and its head, read together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tail {
    /// The last line, ending in `\n` when it is complete (a torn write to a
    /// file leaves it without); `None` for an empty chain.
    pub line: Option<Vec<u8>>,
    /// The head record's JSON, as stored; `None` before the first append.
    pub head: Option<Vec<u8>>,
    /// For a database, the role of the connection that appends (its
    /// `current_user`), read in the append's own transaction: the records
    /// name it (`data.actor_db_role`). `None` for files and plain reads.
    pub db_role: Option<String>,
}

/// What an append stores, in one exclusive, durable step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extension {
    /// The new records: `(seq, canonical JSON line without \n)`, in order.
    pub lines: Vec<(u64, Vec<u8>)>,
    /// The new head record's JSON.
    pub head: Vec<u8>,
}

/// How an append computes its [`Extension`] from the [`Tail`] it found
/// under the store's exclusive lock.
pub type Extend<'a> = Box<dyn FnOnce(Tail) -> Result<Extension, AuditError> + Send + 'a>;

/// Where a hash-chained audit log keeps its lines, its head and the sink's
/// cursor: files under the state directory ([`FileChain`](super::FileChain))
/// or a team database ([`PgChain`](super::PgChain)).
pub trait ChainStore: Send + Sync + std::fmt::Debug {
    /// Where the chain lives, for messages (never holds a password).
    fn location(&self) -> String;
    /// Where the head lives, for messages.
    fn head_location(&self) -> String;
    /// Every line (JSON lines, each ending in `\n` except a torn last one)
    /// and the head, read in one snapshot: no append falls between them.
    fn snapshot(&self) -> Result<(Vec<u8>, Option<Vec<u8>>), AuditError>;
    /// The head alone.
    fn head(&self) -> Result<Option<Vec<u8>>, AuditError>;
    /// The last line and the head, read together, without reading the
    /// whole chain (what an append checks).
    fn tail(&self) -> Result<Tail, AuditError>;
    /// Appends under an exclusive lock on the whole chain, across threads,
    /// processes and (for a database) machines: `extend` gets the tail
    /// read under that lock, and what it returns is stored durably before
    /// the lock is released, the lines before the head.
    fn append(&self, extend: Extend<'_>) -> Result<(), AuditError>;
    /// Claims the audit sink's cursor (the seq of the last record the sink
    /// acknowledged), runs `forward` with it and stores what it returns.
    /// `None`: another forwarder holds the claim right now.
    fn with_sink_cursor(
        &self,
        forward: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<Option<u64>, AuditError>;
    /// Another handle on the same chain, with a file handle or connection
    /// of its own, so that the sink's forwarder (which holds its claim
    /// while it sends) never makes an append wait.
    fn reopen(&self) -> Result<std::sync::Arc<dyn ChainStore>, AuditError>;
}
