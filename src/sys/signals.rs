//! What the process is asked to do by signals (SPEC section 3).
//!
//! The handlers are installed before the config is read, so a HUP that
//! arrives while the process starts is remembered (the stream holds it) and
//! acted on once the process is ready, instead of killing it.

use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sig {
    /// HUP: graceful restart.
    Restart,
    /// TERM or INT: graceful stop.
    Stop,
    /// QUIT: immediate stop.
    Quit,
    /// USR1: reopen the access log (after logrotate renamed it).
    Reopen,
    /// USR2, to a draining generation: finish now (HTTP/2 connections get
    /// their GOAWAY at once; what is left after [`FINISH_WITHIN`] is cut).
    /// What a newer generation sends the oldest beyond `max_draining`.
    Finish,
}

/// How long a generation told to finish has before it cuts what is left.
pub(crate) const FINISH_WITHIN: std::time::Duration = std::time::Duration::from_millis(800);

pub(crate) struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
    quit: Signal,
    usr1: Signal,
    usr2: Signal,
}

impl Signals {
    /// Installs the handlers. Must be called inside a tokio runtime.
    pub(crate) fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    pub(crate) async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.hup.recv() => Sig::Restart,
            _ = self.term.recv() => Sig::Stop,
            _ = self.int.recv() => Sig::Stop,
            _ = self.quit.recv() => Sig::Quit,
            _ = self.usr1.recv() => Sig::Reopen,
            _ = self.usr2.recv() => Sig::Finish,
        }
    }
}
