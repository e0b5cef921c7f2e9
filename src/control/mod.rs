//! Starting, restarting and stopping: the restart's state machine
//! (`restart`) and the new process's side of it (`successor`), a serving
//! generation, the supervisor, old generations draining (`predecessors`),
//! `reload` and `deploy` over the control socket, and the config prepared
//! for serving (`prepare`).

pub(crate) mod deploy;
pub(crate) mod generation;
pub(crate) mod predecessors;
pub(crate) mod prepare;
pub(crate) mod reload;
pub(crate) mod restart;
pub(crate) mod run;
pub(crate) mod spawn;
pub(crate) mod successor;
pub(crate) mod supervisor;
