//! The threads the simulated clients run on: one single-threaded runtime
//! per thread, each client on one of them for its whole life.
//!
//! The bench shares the machine's cores with the servers it measures, so
//! what it spends per received message is taken from them. On one
//! multi-threaded runtime a client's readiness may be picked up by a parked
//! worker that another must wake first, and its task may be stolen across
//! cores; here the thread whose driver sees a socket ready is the one that
//! reads it.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// `n` client threads; dropping the pool stops them (their tasks are dropped).
pub struct ClientPool {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl ClientPool {
    pub fn new(n: usize) -> Result<Self, String> {
        let mut pool = ClientPool {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("client runtime: {e}"))?;
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            pool.handles.push(runtime.handle().clone());
            pool.stops.push(stop_tx);
            let thread = std::thread::Builder::new()
                .name(format!("clients-{i}"))
                .spawn(move || {
                    let _ = runtime.block_on(stop_rx);
                })
                .map_err(|e| format!("client thread: {e}"))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Runs `client` on thread `i mod len`; its result comes back through
    /// the handle, which any runtime may await.
    pub fn spawn<F>(&self, i: usize, client: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[i % self.handles.len()].spawn(client)
    }
}

impl Drop for ClientPool {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_each_task_on_the_thread_its_index_picks() {
        let pool = ClientPool::new(3).unwrap();
        let outer = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let names: Vec<String> = outer.block_on(async {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    pool.spawn(i, async {
                        std::thread::current().name().unwrap_or("").to_owned()
                    })
                })
                .collect();
            let mut names = Vec::new();
            for h in handles {
                names.push(h.await.unwrap());
            }
            names
        });
        assert_eq!(
            names,
            [
                "clients-0",
                "clients-1",
                "clients-2",
                "clients-0",
                "clients-1",
                "clients-2"
            ]
        );
    }
}
