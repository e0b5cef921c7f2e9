//! Connections to what the proxy sends to: an upstream of the config, or
//! an app instance. Each gets a pool of its own per serving thread.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::wire::body::Body;

/// A pooled, keep-alive HTTP/1.1 client for one upstream.
fn client(connect_timeout: Duration) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// Most serving threads with a pool of their own; more share by index.
const SLOTS: usize = 64;

/// An upstream's pools, one per serving thread. A connection's task runs on
/// the thread that opened it; with one pool shared by every thread, a request
/// would mostly check out another thread's connection and wake that thread
/// for each read and write. nginx's workers keep their own upstream
/// connections for the same reason.
pub(crate) struct Pools {
    clients: Box<[std::sync::OnceLock<Client<HttpConnector, Body>>]>,
    connect_timeout: Duration,
}

impl Pools {
    pub(crate) fn new(connect_timeout: Duration) -> Pools {
        Pools {
            clients: (0..SLOTS).map(|_| std::sync::OnceLock::new()).collect(),
            connect_timeout,
        }
    }

    /// The current serving thread's pool.
    pub(crate) fn get(&self) -> &Client<HttpConnector, Body> {
        let slot = &self.clients[serving_thread() % SLOTS];
        slot.get_or_init(|| client(self.connect_timeout))
    }
}

thread_local! {
    /// This serving thread's place among the process's (0 elsewhere).
    static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as serving thread `index`: its pools are its own.
pub(crate) fn set_serving_thread(index: usize) {
    SERVING_THREAD.with(|t| t.set(index));
}

fn serving_thread() -> usize {
    SERVING_THREAD.with(|t| t.get())
}
