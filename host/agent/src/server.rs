//! The accept loop: HTTP/1.1 connections with a header read timeout and a
//! cap on how many are open at once.
//!
//! Why not `axum::serve`: it sets no timer on hyper, so hyper's header read
//! timeout never fires, and it accepts without limit. A client that opens
//! connections and sends a request line without its final CRLF then holds a
//! file descriptor each, forever; the red team's 1,100 such connections left
//! an agent with 1,024 descriptors unable to answer `/healthz`, and 1,500 on
//! a 20,000-descriptor agent were still open after 77 s. Here:
//! - every connection must deliver each request's headers within
//!   `header_read_timeout` of starting to wait for them (hyper's own timer,
//!   which also closes connections that stay idle between requests);
//! - at most `max_connections` are open. When one more arrives, the oldest
//!   connection with no request in flight (one still waiting for its
//!   headers, or idle between requests) is closed to make room: a flood of
//!   half-open connections then only ever displaces its own, and a health
//!   check, which sends its request at once, is answered throughout. When
//!   every open connection is busy with a request, the new one is closed at
//!   once, so the listen backlog never fills with connections nobody reads.
//!   The first time the cap is hit (then at most once per 10 s) a line says
//!   so, with the counts.
//!
//! `--max-connections` should stay below the process's file-descriptor limit
//! (`LimitNOFILE` in the systemd unit) with room for the data dir's files.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, warn};

/// Limits on connections, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// How long a client has to send a request's headers.
    pub header_read_timeout: Duration,
}

/// How often the "cap reached" line may repeat while the cap holds.
const CAP_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a new connection waits for the slot of the one closed for it.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Conn {
    /// Requests being handled on it now.
    in_flight: AtomicUsize,
    /// Told when the connection must close to make room.
    close: Notify,
}

/// The open connections, oldest first (entries of closed ones are dropped
/// lazily).
#[derive(Default)]
struct Open {
    conns: Mutex<VecDeque<Weak<Conn>>>,
}

impl Open {
    fn add(&self, conn: &Arc<Conn>, cap: usize) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() >= 2 * cap {
            conns.retain(|c| c.strong_count() > 0);
        }
        conns.push_back(Arc::downgrade(conn));
    }

    /// Tells the oldest connection with no request in flight to close;
    /// `false` when every open connection is busy.
    fn evict_oldest_idle(&self) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| c.strong_count() > 0);
        let victim = conns.iter().position(|c| {
            c.upgrade()
                .is_some_and(|c| c.in_flight.load(Ordering::SeqCst) == 0)
        });
        match victim
            .and_then(|i| conns.remove(i))
            .and_then(|c| c.upgrade())
        {
            Some(conn) => {
                conn.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting and waits for the open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Open::default();
    let (refused, evicted) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut last_cap_log: Option<Instant> = None;
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset
                    // before it was accepted: wait a little instead of
                    // spinning, then go on serving the open connections.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let made_room = open.evict_oldest_idle();
                let slot = match made_room {
                    true => tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok),
                    false => None,
                };
                let (n_evicted, n_refused) = match slot {
                    Some(_) => (
                        evicted.fetch_add(1, Ordering::Relaxed) + 1,
                        refused.load(Ordering::Relaxed),
                    ),
                    None => (
                        evicted.load(Ordering::Relaxed),
                        refused.fetch_add(1, Ordering::Relaxed) + 1,
                    ),
                };
                if last_cap_log.is_none_or(|t| t.elapsed() >= CAP_LOG_EVERY) {
                    last_cap_log = Some(Instant::now());
                    warn!(
                        max_connections = limits.max_connections,
                        idle_closed_total = n_evicted,
                        refused_total = n_refused,
                        %peer,
                        "connection cap reached: {} connections are open; the oldest one without a request \
                         in flight is closed for each new one, and new ones are refused while all are busy \
                         (--max-connections; headers must arrive within {} ms)",
                        limits.max_connections,
                        limits.header_read_timeout.as_millis()
                    );
                }
                slot
            }
        };
        let Some(slot) = slot else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::default());
        open.add(&conn, limits.max_connections);
        let service = {
            let conn = conn.clone();
            let router = router.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut router = router.clone();
                let conn = conn.clone();
                conn.in_flight.fetch_add(1, Ordering::SeqCst);
                async move {
                    let request = request.map(axum::body::Body::new);
                    let response = tower_service::Service::call(&mut router, request).await;
                    conn.in_flight.fetch_sub(1, Ordering::SeqCst);
                    response
                }
            })
        };
        let served = builder.serve_connection(TokioIo::new(stream), service);
        let served = graceful.watch(served);
        tokio::spawn(async move {
            tokio::select! {
                result = served => {
                    if let Err(e) = result {
                        // Timeouts and resets end here; they are the client's doing.
                        debug!(%peer, error = %e, "connection closed with an error");
                    }
                }
                () = conn.close.notified() => {
                    debug!(%peer, "closed an idle connection to make room under the connection cap");
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
