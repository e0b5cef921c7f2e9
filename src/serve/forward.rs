//! A busy HTTP/2 connection of a draining generation keeps its client, and
//! the newest generation serves its requests.
//!
//! A GOAWAY that reaches a client while it is mid-request fails that request
//! in some of the most used clients, whatever the GOAWAY says: python-h2
//! (httpx) moves to CLOSED on any GOAWAY and then refuses to send the body of
//! a request whose headers went out a moment before, and every response
//! still coming. The only GOAWAY such a client survives is one that arrives
//! while it is quiet, and a client in a loop is never quiet. So a draining
//! generation does not hurry a busy HTTP/2 connection: it keeps it, and
//! sends each request that starts on it after the drain began to the newest
//! generation, which serves it with its own config, routes and apps, as if
//! it had come in on its own listener from the same client. The connection
//! gets its GOAWAY once the client has been quiet for [`QUIET`] (nothing in
//! flight, nothing started); for a client that never is, after
//! [`busy_for`], at the first moment with no stream open, or in hyper's two
//! steps if none comes (see `drive`).
//!
//! How the requests travel: every generation shares one listening Unix
//! socket in the abstract namespace, handed from generation to generation
//! with the listeners (`GRACESRV_FORWARD_FD`); like them, only the newest
//! generation accepts on it, so a connection to it reaches whichever
//! generation is newest when it is made. A draining connection opens one
//! HTTP/2 connection to it, with a first line saying what the new
//! generation must know of the client (listener, address, TLS), and sends
//! its requests there. Only this user, or root, may connect.
//!
//! The newest generation's pid is in shared memory beside the socket
//! (`sys::forward`): before each request, a draining connection checks that
//! the generation at the other end of its forwarding connection is still
//! the newest, and opens a new one if not. So the generation that served
//! those requests never has to refuse one when it is replaced in turn: it
//! drains the forwarded connection like any other, once quiet, by when its
//! client has moved on. (hyper's two-step GOAWAY refused some: h2's client
//! writes its answer to the drain's PING before HEADERS it has queued.)

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tracing::debug;

use crate::observe::access_log::TlsInfo;
use crate::observe::logging::Chain;
use crate::process::context::Peer;
use crate::sys::forward::ForwardSocket;
use crate::wire::body::Body;

use super::connection::{ListenerSpec, Thread};

/// How long a draining HTTP/2 connection must be quiet (no stream open,
/// none started) before its GOAWAY goes out.
pub(crate) const QUIET: Duration = Duration::from_millis(300);

/// How long a draining generation waits for a busy HTTP/2 connection to be
/// quiet for [`QUIET`] (handing its requests on meanwhile); then its GOAWAY
/// goes at the first moment with no stream open. All of `shutdown_timeout`
/// but the time a drain then needs: half of it, up to 5 s.
pub(crate) fn busy_for(shutdown_timeout: Duration) -> Duration {
    shutdown_timeout.saturating_sub((shutdown_timeout / 2).min(Duration::from_secs(5)))
}

/// How long a new generation waits for the first line of a forwarded
/// connection; the longest line it takes.
const HELLO_WITHIN: Duration = Duration::from_secs(1);
const HELLO_MAX: usize = 1024;

/// What the serving generation is told of a forwarded connection's client:
/// the first line on the connection, as JSON.
#[derive(Serialize, Deserialize)]
struct Hello {
    listener: String,
    peer: std::net::SocketAddr,
    /// The TLS version (`TLSv1.3`), when the client came over TLS.
    tls: Option<String>,
    sni: Option<String>,
}

/// Accepts forwarded connections on thread `thread` while this generation
/// is the newest (the accept pauses with the drain, and resumes with it).
pub(crate) fn serve(
    socket: &ForwardSocket,
    specs: Vec<Arc<ListenerSpec>>,
    thread: Arc<Thread>,
) -> io::Result<()> {
    let listener = tokio::net::UnixListener::from_std(socket.listener()?)?;
    let me = socket.owner();
    let drain = thread.shared.process.drain.clone();
    // Counted before the task runs, so a drain that starts first waits.
    let (guard, held) = (drain.acceptor(), drain.socket());
    let specs: Arc<[Arc<ListenerSpec>]> = specs.into();
    tokio::spawn(async move {
        // Locals drop in reverse order: the socket is closed before `_held`
        // counts it closed.
        let _held = held;
        let mut listener = listener;
        let mut guard = Some(guard);
        loop {
            accept_loop(&listener, me, &specs, &thread).await;
            match super::accept::pause(listener, &drain, &mut guard, "(forward)").await {
                Some(l) => listener = l,
                None => return,
            }
        }
    });
    Ok(())
}

/// Accepts forwarded connections until the process drains.
async fn accept_loop(
    listener: &tokio::net::UnixListener,
    me: u32,
    specs: &Arc<[Arc<ListenerSpec>]>,
    thread: &Arc<Thread>,
) {
    let stop = thread.shared.process.drain.started();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let uid = stream.peer_cred().map(|c| c.uid());
        if uid.is_ok_and(|u| u == 0 || u == me) {
            tokio::spawn(serve_one(stream, specs.clone(), thread.clone()));
        }
    }
}

/// One forwarded connection: its first line, then HTTP/2 on the listener
/// it names, as a connection of that client.
async fn serve_one(mut stream: UnixStream, specs: Arc<[Arc<ListenerSpec>]>, thread: Arc<Thread>) {
    let _counted = thread.shared.process.drain.connection();
    let hello = match tokio::time::timeout(HELLO_WITHIN, read_hello(&mut stream)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return debug!("forwarded connection: {e}", e = Chain(&e)),
        Err(_) => return debug!("forwarded connection: no first line"),
    };
    let Some(spec) = specs.iter().find(|s| s.ctx.name == hello.listener) else {
        // The listener is gone from the config: the old generation answers
        // its client itself.
        let _ = stream.write_all(b"-").await;
        return debug!(listener = %hello.listener, "forwarded connection for a listener this generation does not have");
    };
    let mut answer = [b'+', 0, 0, 0, 0];
    answer[1..].copy_from_slice(&std::process::id().to_le_bytes());
    if stream.write_all(&answer).await.is_err() {
        return;
    }
    let peer = Peer {
        addr: hello.peer,
        tls: hello.tls.is_some(),
    };
    let tls = match (&spec.access_log, &hello.tls) {
        (Some(_), Some(version)) => Some(Arc::new(TlsInfo {
            version: match version.as_str() {
                "TLSv1.3" => "TLSv1.3",
                "TLSv1.2" => "TLSv1.2",
                _ => "TLS",
            },
            sni: hello.sni.map(Into::into),
        })),
        _ => None,
    };
    super::connection::serve_forwarded(stream, peer, tls, spec.clone(), thread).await
}

/// The first line: its length in two bytes, then the JSON. The answer is
/// `+` and the serving process's pid (four bytes), or `-` (no such
/// listener).
async fn read_hello(stream: &mut UnixStream) -> io::Result<Hello> {
    let len = usize::from(stream.read_u16().await?);
    if len > HELLO_MAX {
        return Err(io::Error::other(format!("a first line of {len} bytes")));
    }
    let mut buf = vec![0; len];
    stream.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf).map_err(io::Error::other)
}

/// One draining connection's way to the newest generation.
pub(crate) struct Forwarder {
    socket: Arc<ForwardSocket>,
    hello: Vec<u8>,
    /// The connection in use, and the pid of the generation serving it.
    sender: tokio::sync::Mutex<Option<(http2::SendRequest<Incoming>, u32)>>,
}

/// Why a request was not forwarded: it comes back unsent, for this
/// generation to serve.
pub(crate) struct NotSent(pub(crate) Request<Incoming>);

impl Forwarder {
    pub(crate) fn new(
        socket: Arc<ForwardSocket>,
        listener: &str,
        peer: Peer,
        tls: Option<&TlsInfo>,
    ) -> Forwarder {
        let hello = Hello {
            listener: listener.to_string(),
            peer: peer.addr,
            tls: peer
                .tls
                .then(|| tls.map_or("TLS", |t| t.version).to_string()),
            sni: tls.and_then(|t| t.sni.as_deref().map(str::to_string)),
        };
        let json = serde_json::to_vec(&hello).unwrap_or_default();
        let mut line = Vec::with_capacity(json.len() + 2);
        line.extend_from_slice(&(json.len() as u16).to_be_bytes());
        line.extend_from_slice(&json);
        Forwarder {
            socket,
            hello: line,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `req` to the newest generation, on this connection's HTTP/2
    /// connection to it (a new one if it has none, or the generation at the
    /// other end is no longer the newest). A request that could not be
    /// sent comes back.
    pub(crate) async fn send(&self, req: Request<Incoming>) -> Result<Response<Body>, NotSent> {
        let mut req = req;
        // Twice at most: the connection held may have closed since its last
        // request; a new one reaches the newest generation.
        for _ in 0..2 {
            let mut sender = match self.sender().await {
                Ok(s) => s,
                Err(e) => {
                    debug!("cannot forward: {e}", e = Chain(&e));
                    return Err(NotSent(req));
                }
            };
            match sender.try_send_request(req).await {
                Ok(res) => return Ok(res.map(Body::new)),
                Err(mut e) => match e.take_message() {
                    // Unsent: `sender` makes a new connection for it if
                    // this one takes no more.
                    Some(back) => req = back,
                    None => {
                        debug!(
                            "forwarded request failed: {}",
                            crate::observe::logging::causes(e.error())
                        );
                        return Ok(crate::wire::body::text(
                            http::StatusCode::BAD_GATEWAY,
                            "bad gateway\n",
                        ));
                    }
                },
            }
        }
        Err(NotSent(req))
    }

    /// The connection to use: the one held while the generation at its
    /// other end is the newest, else a new one (which reaches the newest).
    /// The one it replaces closes once its requests are answered; the
    /// generation it served never has to refuse one.
    async fn sender(&self) -> io::Result<http2::SendRequest<Incoming>> {
        let mut held = self.sender.lock().await;
        let newest = self.socket.newest();
        if let Some((s, pid)) = held.as_ref() {
            if !s.is_closed() && (*pid == newest || newest == 0) {
                return Ok(s.clone());
            }
        }
        let mut stream = self.socket.connect().await?;
        stream.write_all(&self.hello).await?;
        // `+` and the pid serving: the listener is served there; anything
        // else: it is not.
        let mut answer = [0u8; 5];
        tokio::time::timeout(HELLO_WITHIN, stream.read_exact(&mut answer[..1]))
            .await
            .map_err(|_| io::Error::other("no answer"))??;
        if answer[0] != b'+' {
            return Err(io::Error::other(
                "the newest generation does not have this listener",
            ));
        }
        tokio::time::timeout(HELLO_WITHIN, stream.read_exact(&mut answer[1..]))
            .await
            .map_err(|_| io::Error::other("no answer"))??;
        let pid = u32::from_le_bytes([answer[1], answer[2], answer[3], answer[4]]);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!("forwarding connection ended: {e}", e = Chain(&e));
            }
        });
        *held = Some((sender.clone(), pid));
        Ok(sender)
    }
}
