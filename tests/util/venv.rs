//! The Python clients the tests drive that Debian does not package in the
//! versions people use: aioquic (HTTP/3), httpx with h2 (HTTP/2), grpcio and
//! REDbot (mnot's HTTP linter), from
//! PyPI, in a venv made once under the target dir. `GRACESRV_TEST_PYTHON`
//! (or `GRACESRV_H3_PYTHON`, its old name) names a Python that has them
//! instead.

use std::path::PathBuf;
use std::process::Stdio;

/// What the venv holds, and what proves it does.
const PACKAGES: [&str; 4] = ["aioquic", "httpx[http2]", "grpcio", "redbot"];
const IMPORTS: &str = "import aioquic, httpx, h2, grpc, redbot.cli";

/// A Python with the packages, made if needed (one test at a time: a file lock).
pub fn python() -> PathBuf {
    for var in ["GRACESRV_TEST_PYTHON", "GRACESRV_H3_PYTHON"] {
        if let Ok(p) = std::env::var(var) {
            return p.into();
        }
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-venv");
    let python = dir.join("bin/python");
    let has = |p: &PathBuf| {
        std::process::Command::new(p)
            .args(["-c", IMPORTS])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let lock = std::fs::File::create(format!("{}.lock", dir.display())).unwrap();
    lock.lock().unwrap();
    if !has(&python) {
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new(dir.join("bin/pip"))
                .args(["install", "-q"])
                .args(PACKAGES)
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && has(&python),
            "cannot make a venv with {PACKAGES:?} in {dir:?} (needs python3-venv and PyPI)"
        );
    }
    python
}
