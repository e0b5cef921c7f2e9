//! Where an HTTP/2 stream's future runs: on the connection's own task when
//! one poll finishes it, in a task of its own only when it waits.
//!
//! hyper hands each HTTP/2 request to an executor, which with
//! `TokioExecutor` spawns a task for it: an allocation, a trip through the
//! scheduler, a poll of that task, and a wake-up of the connection's task
//! to write what it sent. Most answers need none of it: a fixed response,
//! a redirect, a file in the cache, an error is made in one poll.
//!
//! [`Inline`] keeps the streams hyper hands it while it polls the
//! connection; once that poll returns, [`run`] polls each of them once on
//! the same task, and spawns only those that wait (a proxied request, a
//! file read, a body still coming). Not polling them at once, inside
//! hyper's poll, keeps the answers to the requests of one read together:
//! hyper writes them in one go when the connection is polled again, as it
//! does for spawned tasks, rather than one write per answer.

use std::cell::RefCell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The streams handed over during the current connection poll; `None`
    /// outside one (then a stream is spawned at once).
    static QUEUE: RefCell<Option<Vec<Stream>>> = const { RefCell::new(None) };
}

/// An executor for hyper's HTTP/2 server connections (see the module).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Inline;

impl<F> hyper::rt::Executor<F> for Inline
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let fut: Stream = Box::pin(fut);
        let left = QUEUE.with(|q| match q.borrow_mut().as_mut() {
            Some(queue) => {
                queue.push(fut);
                None
            }
            None => Some(fut),
        });
        if let Some(fut) = left {
            tokio::spawn(fut);
        }
    }
}

/// Polls `poll` (a connection) with streams kept for [`run`], then runs
/// them; while any ran, polls the connection again, which writes what they
/// sent (together) and may hand over more.
pub(crate) fn poll_with<T>(mut poll: impl FnMut() -> Poll<T>) -> Poll<T> {
    loop {
        let outer = QUEUE.with(|q| q.borrow_mut().replace(Vec::new()));
        let res = poll();
        let queued = QUEUE.with(|q| std::mem::replace(&mut *q.borrow_mut(), outer));
        let queued = queued.unwrap_or_default();
        let again = res.is_pending() && !queued.is_empty();
        run(queued);
        if !again {
            return res;
        }
    }
}

/// Polls each stream once; spawns those still waiting. A waker that does
/// nothing: the task's first poll registers the task's own waker wherever
/// this poll registered this one, and sees whatever happened between.
fn run(streams: Vec<Stream>) {
    let mut cx = Context::from_waker(Waker::noop());
    for mut fut in streams {
        // A panic ends this stream alone, as it did in a task of its own
        // (its response handle, dropped, resets it), not the connection.
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx)));
        if let Ok(Poll::Pending) = polled {
            tokio::spawn(fut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn streams_run_after_the_connection_poll_and_those_that_wait_are_spawned() {
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut rx = Some(rx);
        let mut polls = 0;
        let res = poll_with(|| {
            polls += 1;
            if polls == 1 {
                let d = done.clone();
                Inline.execute(async move {
                    d.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(
                    done.load(Ordering::Relaxed),
                    0,
                    "kept until the poll returns"
                );
                let (d, rx) = (done.clone(), rx.take().expect("first poll"));
                Inline.execute(async move {
                    let _ = rx.await;
                    d.fetch_add(1, Ordering::Relaxed);
                });
                Inline.execute(async { panic!("a handler's bug") });
                return Poll::Pending;
            }
            Poll::Ready(done.load(Ordering::Relaxed))
        });
        assert_eq!(polls, 2, "polled again once the streams ran");
        assert_eq!(
            res,
            Poll::Ready(1),
            "the ready one ran before the second poll"
        );
        tx.send(()).unwrap();
        // The spawned one wakes through its task's waker, not the no-op one.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while done.load(Ordering::Relaxed) < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the waiting future finished in its task");
        // Outside a connection's poll: spawned at once.
        let d = done.clone();
        Inline.execute(async move {
            d.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 2);
        tokio::task::yield_now().await;
        assert_eq!(done.load(Ordering::Relaxed), 3);
    }
}
