//! Preload libraries (`LD_PRELOAD`) that put the real binary, unchanged, in
//! a world a test cannot otherwise make: a filesystem slow to answer, or a
//! record of the mode every file is created with. Built once per test run
//! with the system's C compiler (gcc, on every machine of this project).

use std::path::PathBuf;

/// Builds `name`'s shared library from `source` (once per run).
fn build(name: &str, source: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join(format!("{name}.c"));
    let lib = dir.join(format!("lib{name}.so"));
    // Each test binary builds its own copy: they may run at once.
    let tmp = dir.join(format!("lib{name}.{}.so", std::process::id()));
    std::fs::write(&src, source).unwrap();
    let ok = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&tmp)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("cc runs");
    assert!(ok.success(), "cc built {name}");
    std::fs::rename(&tmp, &lib).unwrap();
    lib
}

/// `statx` takes 2 s for any path holding `slow-stat` (Rust's std calls
/// libc's `statx` through a weak symbol, so a preload reaches it).
pub fn slow_stat() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            build(
                "slowstat",
                r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf) {
    static int (*real)(int, const char *, int, unsigned int, struct statx *);
    if (!real) real = dlsym(RTLD_NEXT, "statx");
    if (path && strstr(path, "slow-stat")) usleep(2000000);
    return real(dirfd, path, flags, mask, buf);
}
"#,
            )
        })
        .clone()
}

/// Every `open` that may create a file appends `MODE PATH` (octal, as
/// passed, before the umask) to the file `CREATED_LOG` names.
pub fn record_created() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            build(
                "recordcreated",
                r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void note(const char *path, int flags, unsigned mode) {
    static int (*real)(const char *, int, ...);
    const char *log = getenv("CREATED_LOG");
    if (!log || !path || !(flags & O_CREAT)) return;
    if (!real) real = dlsym(RTLD_NEXT, "open64");
    int fd = real(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return;
    char line[4200];
    int n = snprintf(line, sizeof line, "%o %s\n", mode, path);
    if (n > 0) (void)!write(fd, line, n < (int)sizeof line ? n : (int)sizeof line - 1);
    close(fd);
}
#define MODE unsigned mode = 0; \
    if (flags & O_CREAT) { va_list ap; va_start(ap, flags); mode = va_arg(ap, unsigned); va_end(ap); }
#define OPEN(name) int name(const char *path, int flags, ...) { \
    static int (*real)(const char *, int, ...); MODE \
    if (!real) real = dlsym(RTLD_NEXT, #name); \
    note(path, flags, mode); return real(path, flags, mode); }
#define OPENAT(name) int name(int dir, const char *path, int flags, ...) { \
    static int (*real)(int, const char *, int, ...); MODE \
    if (!real) real = dlsym(RTLD_NEXT, #name); \
    note(path, flags, mode); return real(dir, path, flags, mode); }
OPEN(open) OPEN(open64) OPENAT(openat) OPENAT(openat64)
"#,
            )
        })
        .clone()
}
