//! The `gracesrv` command (SPEC section 1).

#![deny(unsafe_code)]

use std::path::PathBuf;

/// mimalloc rather than glibc's malloc (docs/dependencies.md): a connection
/// at rest frees hyper's buffers, and mimalloc gives the pages back to the
/// system at once; glibc keeps them (issue 30: 2.0 KB of RSS per idle plain
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
    about = "An HTTP/1.1, HTTP/2 and HTTP/3 server that restarts without dropping a request",
    after_help = "Without a command, serves the config. Docs: README.md and docs/ \
                  (docs/config.md: every key; docs/restarts.md: signals and restarts)."
)]
struct Cli {
    /// Config file (docs/config.md).
    #[arg(short, long, global = true, default_value = "config/server.yaml")]
    config: PathBuf,

    /// Run under a supervisor whose pid never changes: restarts replace
    /// worker processes (for terminals, containers and process managers;
    /// docs/restarts.md).
    #[arg(long)]
    supervise: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check the config, its certificates, keys and routes, as a restart would (docs/config.md).
    #[command(
        long_about = "Check the config, its certificates, keys and routes, as a restart \
        would (docs/config.md).\n\nParses and validates the config, loads every certificate and key, \
        and builds every route; prints a summary (exit 0) or the error with its file, line, \
        column and cause (exit 1). Nothing is started."
    )]
    Check,
    /// Restart the running server and wait until the new generation serves (docs/restarts.md).
    #[command(
        long_about = "Restart the running server and wait until the new generation serves \
        (docs/restarts.md).\n\nSignals the pid in the config's pid_file and waits: exit 0 once \
        the new generation is ready, exit 1 with the reason if the restart failed (the running \
        generation serves on)."
    )]
    Reload,
    /// Deploy a new instance of an app and switch to it once it is ready (docs/apps.md).
    #[command(
        long_about = "Deploy a new instance of an app and switch to it once it is ready \
        (docs/apps.md).\n\nStarts the new instance, sends it the app's requests once it is \
        ready, and stops the old one once nothing is in flight on it; exit 0, or 1 with the \
        reason the new one failed (the old one keeps serving).\n\nWith --canary, the new \
        instance takes the app's requests in steps (`canary:` in the app's config), compared \
        with the old one at each step; it is promoted after the last, or rolled back as soon \
        as it is worse (exit 1 with both versions' figures). --abort and --promote end a \
        canary deploy under way by hand."
    )]
    Deploy {
        /// The app's name in `apps:`.
        app: String,
        /// Shift the app's requests to the new instance in steps
        /// (`canary.steps`), comparing it with the old one at each; promote it
        /// after the last, or roll it back as soon as it is worse.
        #[arg(long, conflicts_with_all = ["abort", "promote"])]
        canary: bool,
        /// Roll the canary deploy under way back.
        #[arg(long, conflicts_with = "promote")]
        abort: bool,
        /// Give the canary deploy under way everything now.
        #[arg(long)]
        promote: bool,
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
        Some(Command::Deploy {
            app,
            canary,
            abort,
            promote,
        }) => match gracesrv::deploy_as(
            &cli.config,
            &app,
            if canary {
                gracesrv::Deploy::Canary
            } else if abort {
                gracesrv::Deploy::Abort
            } else if promote {
                gracesrv::Deploy::Promote
            } else {
                gracesrv::Deploy::Switch
            },
        ) {
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
