//! Forwarding the audit log to an HTTP sink, from a durable outbox, in the
//! background and in order.
//!
//! The log is the source of truth and already durable and ordered, so the
//! outbox is the log itself plus one cursor, kept by the chain's
//! [`ChainStore`]: the `seq` of the last record the sink acknowledged (2xx)
//! (`<state>/audit.sink-cursor` for the file log, a row beside a team's
//! chain in its database). A forwarder thread sends every record after the
//! cursor, in `seq` order, one at a time: for each it claims the cursor,
//! sends, and moves the cursor only after the acknowledgement. So:
//! - **nothing is lost when pde is killed**: the cursor only moves after an
//!   acknowledgement, and the next run (any command that opens the engine
//!   with a sink configured) forwards whatever is pending;
//! - **order holds**: record `n+1` is not sent before record `n` is taken;
//! - **delivery is at least once**: a kill between the sink's 2xx and the
//!   cursor write re-sends one record, with the same `Idempotency-Key:
//!   audit:<hash>`, so the sink can drop the duplicate;
//! - **a hung or down sink never slows a deploy**: appends only wake the
//!   forwarder, which reads and claims through a store handle of its own
//!   ([`ChainStore::reopen`]). When the engine is dropped, the forwarder
//!   gets at most `[audit] sink_flush_ms` (default 2000) to catch up; then
//!   the process moves on and the rest waits for the next run.
//!
//! A team's database lets one machine claim the cursor at a time (`SELECT
//! … FOR UPDATE SKIP LOCKED`), so each record goes to the sink once across
//! all machines, in order, and whichever machine runs next sends what is
//! pending.
//!
//! Each request is retried as [`pde_core::retry`] decides (5xx, 429,
//! timeouts); a record the sink refuses permanently (another 4xx) stops
//! forwarding, logged, until a later run: skipping it would break the order
//! auditors rely on.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use pde_core::retry::RetryPolicy;
use pde_core::secret::Secret;

use super::{AuditError, AuditLog, AuditRecord, ChainStore};
use crate::http::{self, Target};

/// Where and how records are forwarded.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The sink URL records are `POST`ed to.
    pub url: String,
    /// Bearer token, if any. Never printed.
    pub token: Option<Secret>,
    /// Retries per record and per-request timeout.
    pub retry: RetryPolicy,
    /// How long a closing engine waits for the forwarder to catch up.
    pub flush: Duration,
    /// How long the forwarder rests after a record could not be delivered.
    pub rest: Duration,
}

enum Signal {
    /// Records were appended.
    Wake,
    /// The engine is closing: catch up until this instant, then stop.
    Close(Instant),
}

/// The background forwarder of one engine. Dropping it gives the forwarder
/// up to [`SinkConfig::flush`] to deliver what is pending.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Signal>,
    // In a mutex only so that the engine (and its futures) stay `Sync`.
    done: std::sync::Mutex<mpsc::Receiver<()>>,
    flush: Duration,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Wake => "Wake",
            Signal::Close(_) => "Close",
        })
    }
}

impl Outbox {
    /// Starts the forwarder for `log`'s chain. It sends whatever is pending
    /// from earlier runs right away.
    pub fn start(log: &AuditLog, sink: SinkConfig) -> Result<Outbox, AuditError> {
        let store = log.store().reopen()?;
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let flush = sink.flush;
        let forwarder = Forwarder {
            log: AuditLog::with_store(store.clone(), false),
            store,
            sink,
        };
        let thread = thread::Builder::new()
            .name("pde-audit-outbox".into())
            .spawn(move || {
                forwarder.run(&rx);
                let _ = done_tx.send(());
            })
            .map_err(|source| AuditError::Io {
                path: log.path().to_path_buf(),
                source,
            })?;
        Ok(Outbox {
            tx,
            done: std::sync::Mutex::new(done),
            flush,
            thread: Some(thread),
        })
    }

    /// Tells the forwarder that records were appended.
    pub fn wake(&self) {
        let _ = self.tx.send(Signal::Wake);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let deadline = Instant::now() + self.flush;
        let _ = self.tx.send(Signal::Close(deadline));
        match self
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(self.flush + Duration::from_millis(50))
        {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                // Leave it: the cursor says what is still pending, and the
                // next run sends it. The thread ends with the process.
                tracing::warn!(
                    "audit sink did not catch up within {} ms; pending records are forwarded by the next run",
                    self.flush.as_millis()
                );
            }
        }
    }
}

struct Forwarder {
    /// The chain, read-only, on the forwarder's own store handle.
    log: AuditLog,
    store: Arc<dyn ChainStore>,
    sink: SinkConfig,
}

impl Forwarder {
    fn run(&self, rx: &mpsc::Receiver<Signal>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::warn!(error = %e, "audit sink forwarder could not start");
                return;
            }
        };
        let client = match http::client(self.sink.retry.timeout) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "audit sink forwarder could not start");
                return;
            }
        };
        let mut closing: Option<Instant> = None;
        loop {
            let caught_up = self.forward_pending(&runtime, &client, closing);
            if closing.is_some_and(|d| caught_up || Instant::now() >= d) {
                return;
            }
            // Caught up: wait for news. Behind after a failure: rest a while.
            let wait = if caught_up {
                Duration::from_secs(3600)
            } else {
                self.sink.rest
            };
            match rx.recv_timeout(wait) {
                Ok(Signal::Wake) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Signal::Close(deadline)) => closing = Some(deadline),
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Sends every record after the cursor, in order, one per claim of the
    /// cursor. `true` when nothing is pending any more. Not async: a claim
    /// may hold a database transaction, and the send runs on `runtime`
    /// inside it.
    fn forward_pending(
        &self,
        runtime: &tokio::runtime::Runtime,
        client: &reqwest::Client,
        deadline: Option<Instant>,
    ) -> bool {
        // Records read so far; re-read when the cursor passes them (another
        // process appended, or forwarded, meanwhile).
        let mut records: Vec<AuditRecord> = Vec::new();
        let mut reread = true;
        loop {
            if reread {
                records = match self.log.records() {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "audit sink: cannot read the log");
                        return false;
                    }
                };
            }
            let mut beyond = false;
            let mut failed = false;
            let claimed = self.store.with_sink_cursor(&mut |cursor| {
                let Some(record) = records.iter().find(|r| r.seq == cursor + 1) else {
                    beyond = true;
                    return cursor;
                };
                let send = self.send(client, record);
                let delivered = runtime.block_on(async {
                    match deadline {
                        Some(d) => {
                            let left = d.saturating_duration_since(Instant::now());
                            tokio::time::timeout(left, send).await.unwrap_or(false)
                        }
                        None => send.await,
                    }
                });
                if delivered {
                    cursor + 1
                } else {
                    failed = true;
                    cursor
                }
            });
            match claimed {
                // Nothing after the cursor even in a fresh read: caught up.
                Ok(Some(_)) if beyond && reread => return true,
                Ok(Some(_)) if beyond => reread = true,
                Ok(Some(_)) if !failed => reread = false,
                // Failed, or another machine is sending: rest, then retry.
                Ok(_) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "audit sink: cannot claim or move the cursor");
                    return false;
                }
            }
        }
    }

    async fn send(&self, client: &reqwest::Client, record: &AuditRecord) -> bool {
        let target = Target::new("audit sink", &self.sink.url, self.sink.token.clone());
        let key = format!("audit:{}", record.hash);
        let (_, answer) =
            http::exchange(&target, "POST audit record", self.sink.retry, &(), || {
                client
                    .post(&target.url)
                    .header("Idempotency-Key", &key)
                    .json(record)
            })
            .await;
        match answer {
            Ok(a) if a.status.is_success() => true,
            Ok(a) => {
                tracing::warn!(seq = record.seq, status = a.status.as_u16(), body = %a.excerpt(),
                    "audit sink refused a record; forwarding stops here until a later run");
                false
            }
            Err(e) => {
                tracing::warn!(seq = record.seq, error = %e, "audit sink unreachable; will retry");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use serde_json::{Value, json};

    use super::*;
    use crate::audit::Event;

    /// (Authorization, Idempotency-Key, body) of each accepted request.
    type Received = (Option<String>, Option<String>, Value);

    #[derive(Clone, Default)]
    struct Sink {
        got: Arc<Mutex<Vec<Received>>>,
        calls: Arc<AtomicU32>,
        /// Answer this status to the first `fail_first` calls.
        fail_first: u32,
        status: u16,
        /// Never answer at all.
        hang: bool,
    }

    async fn receive(
        State(r): State<Sink>,
        headers: HeaderMap,
        axum::Json(body): axum::Json<Value>,
    ) -> StatusCode {
        let n = r.calls.fetch_add(1, Ordering::SeqCst);
        if r.hang {
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        if n < r.fail_first {
            return StatusCode::from_u16(r.status).unwrap();
        }
        let h = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_string());
        r.got
            .lock()
            .unwrap()
            .push((h("authorization"), h("idempotency-key"), body));
        StatusCode::ACCEPTED
    }

    /// A real HTTP sink on loopback, on its own runtime thread.
    fn serve(r: Sink) -> (String, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/audit", post(receive))
            .with_state(r);
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/audit"), rt)
    }

    fn config(url: &str, token: Option<&str>, flush_ms: u64) -> SinkConfig {
        SinkConfig {
            url: url.to_string(),
            token: token.map(|t| Secret::from(t.to_string())),
            retry: RetryPolicy {
                retries: 2,
                backoff_ms: 5,
                timeout: Duration::from_millis(300),
            },
            flush: Duration::from_millis(flush_ms),
            rest: Duration::from_millis(20),
        }
    }

    /// The sink's cursor, as the store keeps it.
    fn cursor(log: &AuditLog) -> u64 {
        log.store().with_sink_cursor(&mut |c| c).unwrap().unwrap()
    }

    fn append(log: &AuditLog, n: usize) {
        for i in 0..n {
            log.append(Event::DeployStart, "42", "dev", json!({"i": i}))
                .unwrap();
        }
    }

    #[test]
    fn records_arrive_in_order_with_auth_and_idempotency_key() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with_actor(dir.path(), "ana").unwrap();
        let sink = Sink::default();
        let (url, _rt) = serve(sink.clone());
        let outbox = Outbox::start(&log, config(&url, Some("tok"), 5000)).unwrap();
        append(&log, 3);
        outbox.wake();
        drop(outbox);
        let got = sink.got.lock().unwrap().clone();
        let records = log.records().unwrap();
        assert_eq!(got.len(), 3);
        for (g, r) in got.iter().zip(&records) {
            assert_eq!(g.0.as_deref(), Some("Bearer tok"));
            assert_eq!(g.1, Some(format!("audit:{}", r.hash)));
            assert_eq!(g.2, serde_json::to_value(r).unwrap());
        }
        assert_eq!(cursor(&log), 3);
    }

    #[test]
    fn transient_failures_are_retried_and_nothing_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with_actor(dir.path(), "ana").unwrap();
        append(&log, 2);
        let sink = Sink {
            fail_first: 4,
            status: 503,
            ..Default::default()
        };
        let (url, _rt) = serve(sink.clone());
        drop(Outbox::start(&log, config(&url, None, 5000)).unwrap());
        let got = sink.got.lock().unwrap();
        let seqs: Vec<u64> = got.iter().map(|g| g.2["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(cursor(&log), 2);
    }

    #[test]
    fn a_hung_sink_costs_at_most_the_flush_time_and_the_next_run_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with_actor(dir.path(), "ana").unwrap();
        let hung = Sink {
            hang: true,
            ..Default::default()
        };
        let (url, _rt) = serve(hung.clone());
        let started = Instant::now();
        let outbox = Outbox::start(&log, config(&url, None, 300)).unwrap();
        // Appending never waits for the sink.
        append(&log, 5);
        outbox.wake();
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(outbox);
        // Bounded by the flush time (plus slack for a loaded machine), far
        // below the 600 s the sink would hang.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(hung.got.lock().unwrap().is_empty());
        assert_eq!(cursor(&log), 0, "nothing acknowledged, nothing lost");

        // The next run, with a working sink, forwards all of it in order.
        let sink = Sink::default();
        let (url, _rt2) = serve(sink.clone());
        drop(Outbox::start(&log, config(&url, None, 5000)).unwrap());
        let seqs: Vec<u64> = sink
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|g| g.2["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_permanent_refusal_stops_forwarding_without_moving_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with_actor(dir.path(), "ana").unwrap();
        append(&log, 2);
        let sink = Sink {
            fail_first: u32::MAX,
            status: 403,
            ..Default::default()
        };
        let (url, _rt) = serve(sink.clone());
        drop(Outbox::start(&log, config(&url, None, 300)).unwrap());
        assert_eq!(cursor(&log), 0);
        assert!(sink.got.lock().unwrap().is_empty());
    }
}
