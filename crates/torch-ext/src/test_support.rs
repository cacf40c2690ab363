//! Helpers for this crate's unit tests: two Gloo ranks as two threads of the test process.

use crate::dist::{GlooDevice, ProcessGroup, Store};
use std::sync::Arc;
use std::time::Duration;

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// Runs `body(rank, group)` on two Gloo ranks (two threads of this process) whose group keys live
/// under `prefix`; returns (rank 0's result, rank 1's).
pub(crate) fn two_ranks<T: Send + 'static>(
    prefix: &'static str,
    body: impl Fn(usize, Arc<ProcessGroup>) -> T + Send + Sync + Copy + 'static,
) -> (T, T) {
    let port = free_port();
    let timeout = Duration::from_secs(20);
    let run = move |rank: usize| {
        let store = Store::tcp("127.0.0.1", port, 2, rank == 0, timeout).unwrap();
        let device = GlooDevice::Hostname("127.0.0.1".into());
        let pg = ProcessGroup::gloo(&store, prefix, rank, 2, timeout, &device).unwrap();
        let out = body(rank, Arc::new(pg));
        drop(store);
        out
    };
    let other = std::thread::spawn(move || run(1));
    let mine = run(0);
    (mine, other.join().unwrap())
}
