//! One QUIC connection: its HTTP/3 requests, and its drain (a GOAWAY at a
//! quiet moment, or in two steps), then its close.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::debug;

use crate::observe::access_log::TlsInfo;
use crate::observe::logging::Chain;
use crate::process::context::Peer;

use super::request::request;
use super::{Held, Spec, MAX_HEAD};

pub(super) async fn connection(
    incoming: quinn::Incoming,
    spec: &Arc<Spec>,
    endpoint: &quinn::Endpoint,
) {
    let t = spec.shared.timeouts;
    let handshaking = Held::new(&spec.handshaking);
    let handshake = async {
        let connecting = incoming.accept().map_err(|e| e.to_string())?;
        match tokio::time::timeout(t.handshake, connecting).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("handshake timed out".to_string()),
        }
    };
    let conn = handshake.await;
    drop(handshaking);
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            debug!(listener = %spec.ctx.name, "HTTP/3 handshake: {e}");
            return;
        }
    };
    let _open = Held::new(&spec.stats.connections);
    let peer = Peer {
        addr: conn.remote_address(),
        tls: true,
    };
    // For the access log: QUIC is always TLS 1.3, and the client's SNI.
    let tls = spec.access_log.as_ref().map(|_| {
        let sni = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.server_name)
            .map(String::into_boxed_str);
        Arc::new(TlsInfo {
            version: "TLSv1.3",
            sni,
        })
    });
    let h3 = h3::server::builder()
        .max_field_section_size(MAX_HEAD)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone()))
        .await;
    let mut h3 = match h3 {
        Ok(h) => h,
        Err(e) => {
            debug!(listener = %spec.ctx.name, "HTTP/3 connection: {e}", e = Chain(&e));
            return;
        }
    };
    let drain = &spec.shared.process.drain;
    let draining = drain.started();
    tokio::pin!(draining);
    let mut cut = drain.tunnel_cut();
    let in_flight = Arc::new(InFlight::default());
    // 0: serving; 3: draining, waiting for a quiet moment (no request in
    // flight, none started for QUIET): then one GOAWAY, and the connection
    // closes. If none comes within QUIET_WAIT, the two steps of RFC 9114
    // section 5.2: 1: a first GOAWAY (with the largest stream ID: open no
    // more) sent; 2: the real one, two round trips later (so requests the
    // client sent before it heard the first are not refused).
    //
    // Why wait: the connection can stay with this generation (the new one
    // passes its datagrams on), and Chromium fails the requests it has
    // queued on a connection when a GOAWAY arrives, without sending them
    // and without retrying (21 to 34 of 600 sub-resources, HUP every 0.3 s).
    // Between two bursts of requests it has none queued.
    let mut phase = 0;
    let step = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(step);
    let mut last_started = tokio::time::Instant::now();
    // The last request stream taken, and once the final GOAWAY is out, the
    // ID it names: streams from there on are refused unprocessed (h3 0.0.8
    // serves the stream the ID names, which RFC 9114 section 5.2 says was
    // not processed; its GOAWAY IDs are right).
    let mut last_id: Option<u64> = None;
    let mut refuse_from = u64::MAX;
    let mut wait_until = tokio::time::Instant::now();
    let code = quinn::VarInt::from_u32(0x100); // H3_NO_ERROR
    loop {
        tokio::select! {
            _ = &mut draining, if phase == 0 => {
                phase = 3;
                wait_until = tokio::time::Instant::now() + QUIET_WAIT;
                step.as_mut().reset((last_started + QUIET).min(wait_until));
            }
            _ = &mut step, if phase == 1 || phase == 3 => {
                if phase == 1 {
                    phase = 2;
                    refuse_from = last_id.map_or(0, |id| id + 4);
                    if let Err(e) = h3.shutdown(1).await {
                        debug!(listener = %spec.ctx.name, "HTTP/3 GOAWAY: {e}", e = Chain(&e));
                        break;
                    }
                    if in_flight.count.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    continue;
                }
                let now = tokio::time::Instant::now();
                let quiet = in_flight.count.load(Ordering::Acquire) == 0 && now >= last_started + QUIET;
                if quiet {
                    // One GOAWAY naming the stream after the last one taken.
                    refuse_from = last_id.map_or(0, |id| id + 4);
                    if let Err(e) = h3.shutdown(1).await {
                        debug!(listener = %spec.ctx.name, "HTTP/3 GOAWAY: {e}", e = Chain(&e));
                    }
                    break;
                }
                if now >= wait_until {
                    phase = 1;
                    if let Err(e) = h3.shutdown(usize::MAX >> 8).await {
                        debug!(listener = %spec.ctx.name, "HTTP/3 GOAWAY: {e}", e = Chain(&e));
                        break;
                    }
                    let rtt = conn.rtt();
                    step.as_mut().reset(now + 2 * rtt + Duration::from_millis(10));
                } else {
                    let next = if in_flight.count.load(Ordering::Acquire) == 0 {
                        last_started + QUIET
                    } else {
                        now + Duration::from_millis(5)
                    };
                    step.as_mut().reset(next.min(wait_until));
                }
            }
            _ = in_flight.idle.notified(), if phase == 2 => {
                if in_flight.count.load(Ordering::Acquire) == 0 {
                    break;
                }
            }
            _ = cut.changed() => {
                conn.close(code, b"shutting down");
                return;
            }
            accepted = h3.accept() => match accepted {
                Ok(Some(mut resolver)) => {
                    let id = resolver.frame_stream.id().into_inner();
                    if id >= refuse_from {
                        refuse(&mut resolver);
                        continue;
                    }
                    last_id = Some(id);
                    last_started = tokio::time::Instant::now();
                    spec.stats.requests_total.fetch_add(1, Ordering::Relaxed);
                    in_flight.count.fetch_add(1, Ordering::AcqRel);
                    let (spec, in_flight, tls) = (spec.clone(), in_flight.clone(), tls.clone());
                    tokio::spawn(async move {
                        request(resolver, &spec, peer, tls.as_deref()).await;
                        if in_flight.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                            in_flight.idle.notify_one();
                        }
                    });
                }
                // The client's GOAWAY, and every request done.
                Ok(None) => break,
                Err(e) => {
                    debug!(listener = %spec.ctx.name, "HTTP/3 connection: {e}", e = Chain(&e));
                    return;
                }
            }
        }
    }
    // Every request is answered, but maybe not yet acknowledged, and a
    // CONNECTION_CLOSE makes the client drop what it has not read: close
    // once the client closes, or after draining_idle.
    let wait = async {
        while in_flight.count.load(Ordering::Acquire) > 0 {
            in_flight.idle.notified().await;
        }
        // Streams below the GOAWAY's ID that arrive late are served; those
        // the client opened from it on before it heard the GOAWAY are
        // refused (H3_REQUEST_REJECTED: by h3 past the ID, by `refuse` at
        // it); until the client closes (`accept` fails then).
        loop {
            match h3.accept().await {
                Ok(Some(mut resolver))
                    if resolver.frame_stream.id().into_inner() >= refuse_from =>
                {
                    refuse(&mut resolver)
                }
                Ok(Some(resolver)) => request(resolver, spec, peer, tls.as_deref()).await,
                Ok(None) => {}
                Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(t.draining_idle, wait).await;
    conn.close(code, b"");
    // Let the endpoint send the CONNECTION_CLOSE before the process may exit.
    let _ = tokio::time::timeout(Duration::from_millis(100), endpoint.wait_idle()).await;
}

/// A draining QUIC connection is quiet once no request is in flight and
/// none has started for this long (see `connection`).
const QUIET: Duration = Duration::from_millis(300);
/// How long a draining QUIC connection waits for a quiet moment before it
/// drains in two steps; below `max_draining` generations' lifetime under
/// restarts in quick succession.
const QUIET_WAIT: Duration = Duration::from_millis(600);

/// A connection's requests in flight, and a signal when none is left.
#[derive(Default)]
struct InFlight {
    count: std::sync::atomic::AtomicU64,
    idle: tokio::sync::Notify,
}

/// Refuses a request stream unprocessed (RFC 9114 section 4.1.1): the
/// client may send it again on a new connection, whatever its method.
fn refuse(resolver: &mut h3::server::RequestResolver<h3_quinn::Connection, Bytes>) {
    use h3::quic::SendStream;
    resolver
        .frame_stream
        .reset(h3::error::Code::H3_REQUEST_REJECTED.value());
}
