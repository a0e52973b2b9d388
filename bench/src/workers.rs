//! Clients spread over several processes (`--client-procs K`), for idle runs
//! with more connections than one process may hold open files.
//!
//! The bench re-runs itself K times as a worker (`--worker`), each with a
//! contiguous share of the client ids, so rooms, targets and source addresses
//! are assigned exactly as in one process. A worker connects its clients and
//! prints one JSON line once all have joined or failed; it then keeps them
//! until its standard input closes, closes them, and prints a second line
//! with what it saw meanwhile. The coordinating process measures the servers.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};

use crate::client;
use crate::procfs::mono_ns;

/// One worker process and the pipe it reports on.
struct Worker {
    child: Child,
    lines: BufReader<ChildStdout>,
}

impl Worker {
    /// The next JSON line the worker prints; an error if it exits first.
    fn report(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .lines
            .read_line(&mut line)
            .map_err(|e| format!("worker {}: {e}", self.child.id()))?;
        if n == 0 {
            return Err(format!(
                "worker {} exited without a report",
                self.child.id()
            ));
        }
        serde_json::from_str(&line).map_err(|e| format!("worker {}: {e}: {line}", self.child.id()))
    }
}

/// The workers of one run. Dropping it kills those still running.
pub struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `procs` workers sharing `clients` clients over `fronts`;
    /// `args` are the options every worker gets (rooms, timeouts, ...).
    pub fn start(
        procs: usize,
        clients: usize,
        fronts: &[SocketAddr],
        args: &[String],
    ) -> Result<Workers, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot re-run the bench: {e}"))?;
        let mut workers = Workers {
            workers: Vec::new(),
        };
        let share = clients.div_ceil(procs);
        for p in 0..procs {
            let offset = p * share;
            let count = share.min(clients.saturating_sub(offset));
            if count == 0 {
                break;
            }
            let mut cmd = Command::new(&exe);
            cmd.arg("--worker")
                .args(["--client-offset", &offset.to_string()])
                .args(["--clients", &count.to_string()])
                .args(args);
            for front in fronts {
                cmd.arg("--frontend").arg(format!("http://{front}"));
            }
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
            tie_to_parent(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start a worker: {e}"))?;
            let stdout = child.stdout.take().expect("piped stdout");
            eprintln!(
                "chat-bench: worker {p} pid {} runs clients {offset}..{}",
                child.id(),
                offset + count
            );
            workers.workers.push(Worker {
                child,
                lines: BufReader::new(stdout),
            });
        }
        Ok(workers)
    }

    /// Waits until every worker's clients joined or failed; their reports.
    pub fn joined(&mut self) -> Result<Vec<Value>, String> {
        self.workers.iter_mut().map(Worker::report).collect()
    }

    /// Tells every worker to close its clients; their last reports.
    pub fn stop(mut self) -> Result<Vec<Value>, String> {
        for w in &mut self.workers {
            drop(w.child.stdin.take());
        }
        let reports = self.workers.iter_mut().map(Worker::report).collect();
        for w in &mut self.workers {
            let _ = w.child.wait();
        }
        self.workers.clear();
        reports
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
}

/// A worker dies with the bench, even if the bench is killed.
fn tie_to_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// What a worker does (`--worker`): connects the clients `offset..offset +
/// count` (ids, hence rooms, targets and source addresses, as in one
/// process), reports, keeps them until standard input closes, reports again.
pub async fn work(
    offset: usize,
    count: usize,
    rooms: usize,
    fronts: &[SocketAddr],
    shared: Arc<client::Shared>,
    per_source: usize,
    eio3: bool,
) -> Result<(), String> {
    let names: Vec<String> = (0..rooms).map(|r| format!("bench-r{r}")).collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::with_capacity(count);
    for id in offset..offset + count {
        handles.push(tokio::spawn(client::run(
            client::Spec::new(id, per_source, fronts, &names)?.speaking_eio3(eio3),
            shared.clone(),
            stop_rx.clone(),
        )));
    }
    while shared.joined.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < count {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let setup = shared.setup.lock().unwrap().clone();
    print_line(&json!({
        "pid": std::process::id(),
        "clients": count,
        "joined": shared.joined.load(Ordering::Relaxed),
        "failed": shared.failed.load(Ordering::Relaxed),
        "first_start_ns": shared.first_start_ns.load(Ordering::Relaxed),
        "last_joined_ns": shared.last_joined_ns.load(Ordering::Relaxed),
        "setup_ms": crate::quantiles(&setup),
        "at_ns": mono_ns(),
    }));

    // Standard input closes when the coordinator says stop (or dies).
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .map_err(|e| e.to_string())?;
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = h.await;
    }
    print_line(&json!({
        "dropped": shared.dropped.load(Ordering::Relaxed),
        "errors": *shared.errors.lock().unwrap(),
    }));
    Ok(())
}

fn print_line(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}
