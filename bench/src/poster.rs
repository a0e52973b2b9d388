//! The open-loop poster: `rate` posts per second, each at a time fixed in
//! advance. A late tick sends at once and never skips; latency is counted
//! from the scheduled time. Runs on its own thread and runtime, so the
//! clients' work does not delay the schedule.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

use crate::client::{message_text, new_histogram};
use crate::procfs::mono_ns;

#[derive(Debug, Clone)]
pub struct Plan {
    pub backends: Vec<SocketAddr>,
    pub rooms: Vec<String>,
    pub rate: f64,
    pub total: u64,
    /// Scheduled time of post 0 (CLOCK_MONOTONIC ns).
    pub start_ns: u64,
    pub size: usize,
    pub max_inflight: usize,
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct Outcome {
    /// Per room, bit `seq` set: post `seq` of that room was accepted (201).
    pub accepted: Vec<Vec<u64>>,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub statuses: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    /// Scheduled time → 201 received, µs.
    pub latency: Histogram<u64>,
    /// Scheduled time → request handed to the connection pool, µs.
    pub lag: Histogram<u64>,
    pub finished_ns: u64,
}

struct State {
    outcome: Outcome,
}

/// Posts the whole plan; returns when every post is answered.
///
/// The schedule is kept by the calling thread with `nanosleep` (tens of
/// microseconds of slack, where an async timer rounds up to the next
/// millisecond); a second thread runs the HTTP client and sends each tick's
/// post as soon as it is handed over.
pub fn run(plan: Plan, abort: Arc<AtomicBool>) -> Outcome {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Tick>();
    let sender_plan = plan.clone();
    let sender = std::thread::Builder::new()
        .name("post-sender".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poster runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, post_all(sender_plan, rx))
        })
        .expect("post sender thread");
    let interval_ns = 1e9 / plan.rate;
    for k in 0..plan.total {
        if abort.load(Ordering::Relaxed) {
            break;
        }
        let scheduled = plan.start_ns + (k as f64 * interval_ns) as u64;
        let now = mono_ns();
        if now < scheduled {
            std::thread::sleep(Duration::from_nanos(scheduled - now));
        }
        if tx.send(Tick { k, scheduled }).is_err() {
            break;
        }
    }
    drop(tx);
    sender.join().expect("post sender thread panicked")
}

struct Tick {
    k: u64,
    scheduled: u64,
}

async fn post_all(plan: Plan, mut ticks: tokio::sync::mpsc::UnboundedReceiver<Tick>) -> Outcome {
    let rooms = plan.rooms.len() as u64;
    let per_room = plan.total.div_ceil(rooms) as usize;
    let state = Rc::new(RefCell::new(State {
        outcome: Outcome {
            accepted: vec![vec![0u64; per_room.div_ceil(64)]; rooms as usize],
            sent: 0,
            ok: 0,
            failed: 0,
            statuses: BTreeMap::new(),
            errors: Vec::new(),
            latency: new_histogram(),
            lag: new_histogram(),
            finished_ns: 0,
        },
    }));
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(plan.max_inflight)
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    let gate = Rc::new(Semaphore::new(plan.max_inflight.max(1)));
    let uris: Vec<hyper::Uri> = plan
        .backends
        .iter()
        .map(|a| {
            format!("http://{a}/back/message")
                .parse()
                .expect("valid uri")
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(Tick { k, scheduled }) = ticks.recv().await {
        let room = (k % rooms) as usize;
        let seq = k / rooms;
        let body = serde_json::json!({
            "room": plan.rooms[room],
            "message": message_text(seq, scheduled, plan.size),
        })
        .to_string();
        let request = hyper::Request::post(uris[(k as usize) % uris.len()].clone())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("valid request");
        let (client, gate, state) = (client.clone(), gate.clone(), state.clone());
        let timeout = plan.timeout;
        tasks.spawn_local(async move {
            let _permit = gate.acquire().await.expect("gate never closed");
            let handed = mono_ns();
            let answer = tokio::time::timeout(timeout, async {
                let response = client
                    .request(request)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                let status = response.status().as_u16();
                // Read the body so the connection goes back to the pool.
                let _ = response.into_body().collect().await;
                Ok::<u16, String>(status)
            })
            .await;
            let done = mono_ns();
            let mut s = state.borrow_mut();
            let o = &mut s.outcome;
            o.sent += 1;
            o.lag
                .saturating_record((handed.saturating_sub(scheduled) / 1000).max(1));
            let key = match answer {
                Ok(Ok(201)) => {
                    o.ok += 1;
                    o.latency
                        .saturating_record((done.saturating_sub(scheduled) / 1000).max(1));
                    let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                    o.accepted[room][word] |= bit;
                    "201".to_owned()
                }
                Ok(Ok(status)) => {
                    o.failed += 1;
                    status.to_string()
                }
                Ok(Err(e)) => {
                    o.failed += 1;
                    if o.errors.len() < 10 {
                        o.errors.push(e);
                    }
                    "error".to_owned()
                }
                Err(_) => {
                    o.failed += 1;
                    "timeout".to_owned()
                }
            };
            *o.statuses.entry(key).or_default() += 1;
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut s = state.borrow_mut();
    s.outcome.finished_ns = mono_ns();
    std::mem::replace(
        &mut s.outcome,
        Outcome {
            accepted: Vec::new(),
            sent: 0,
            ok: 0,
            failed: 0,
            statuses: BTreeMap::new(),
            errors: Vec::new(),
            latency: new_histogram(),
            lag: new_histogram(),
            finished_ns: 0,
        },
    )
}
