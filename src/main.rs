//! The `gracesrv` command (SPEC section 1).

#![deny(unsafe_code)]

use std::path::PathBuf;

/// mimalloc rather than glibc's malloc (README, Dependencies): a connection
/// at rest frees hyper's buffers, and mimalloc gives the pages back to the
/// system at once; glibc keeps them (issue 30: 2.5 KB of RSS per idle plain
/// connection against 13 KB, and the RSS falls back when connections close).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `purge_delay`'s index in mimalloc's `mi_option_t`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed pages go back to the system at once: mimalloc waits a second by
/// default, and purges only when the thread allocates again, so an idle
/// serving thread would keep them. (Arenas committed as used, not when
/// reserved: `.cargo/config.toml`.)
#[allow(unsafe_code)]
fn allocator_options() {
    // SAFETY: mi_option_set takes any option index and value; mimalloc
    // reads this one at each purge, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
}

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gracesrv",
    version,
    about = "HTTP/HTTPS server with zero-downtime restarts"
)]
struct Cli {
    /// Config file.
    #[arg(short, long, global = true, default_value = "config/server.yaml")]
    config: PathBuf,

    /// Run under a supervisor whose pid never changes: restarts replace
    /// worker processes (for terminals, containers and process managers).
    #[arg(long)]
    supervise: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate the config, load every certificate and key, check every route.
    Check,
    /// Restart the running server (the pid in the config's pid_file) and wait
    /// until the new generation is ready (exit 0) or the restart failed (exit 1).
    Reload,
    /// Deploy a new instance of an app (`apps:`): start it, switch to it once
    /// it is ready, stop the old one once nothing is in flight on it; exit 0,
    /// or 1 with the reason the new one failed (the old one keeps serving).
    Deploy {
        /// The app's name in `apps:`.
        app: String,
    },
}

fn main() {
    allocator_options();
    let cli = Cli::parse();
    let code = match cli.command {
        None => gracesrv::Server::new(cli.config)
            .supervise(cli.supervise)
            .run(),
        Some(Command::Check) => match gracesrv::check(&cli.config) {
            Ok(summary) => {
                print!("{summary}");
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        Some(Command::Reload) => match gracesrv::reload(&cli.config) {
            Ok(done) => {
                println!("{done}");
                0
            }
            Err(e) => {
                eprintln!("gracesrv reload: {e}");
                1
            }
        },
        Some(Command::Deploy { app }) => match gracesrv::deploy(&cli.config, &app) {
            Ok(done) => {
                println!("deployed {app}: {done}");
                0
            }
            Err(e) => {
                eprintln!("gracesrv deploy {app}: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}
