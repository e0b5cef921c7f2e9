//! Starting, restarting and stopping: the restart's state machine
//! (`restart`) and the new process's side of it (`successor`), a serving
//! generation, the supervisor, old generations draining (`predecessors`),
//! `reload` and `deploy` over the control socket, and the config prepared
//! for serving (`prepare`).

pub mod deploy;
pub mod generation;
pub mod predecessors;
pub mod prepare;
pub mod reload;
pub mod restart;
pub mod run;
pub mod spawn;
pub mod successor;
pub mod supervisor;
