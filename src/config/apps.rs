//! `apps:`: the applications gracesrv runs behind `proxy: { app }` routes,
//! checked and given their defaults.

use super::validate::Validator;
use super::*;

/// Signals an app may be stopped with (`stop_signal`).
const STOP_SIGNALS: [(&str, nix::sys::signal::Signal); 7] = {
    use nix::sys::signal::Signal::*;
    [
        ("TERM", SIGTERM),
        ("INT", SIGINT),
        ("QUIT", SIGQUIT),
        ("HUP", SIGHUP),
        ("USR1", SIGUSR1),
        ("USR2", SIGUSR2),
        ("KILL", SIGKILL),
    ]
};

impl Validator<'_> {
    pub(super) fn apps(&self, raw: &[Spanned<raw::App>]) -> Result<Vec<AppConfig>, ConfigError> {
        let mut apps: Vec<AppConfig> = Vec::new();
        for (i, a) in raw.iter().enumerate() {
            let app = self.app(i, a)?;
            if apps.iter().any(|o| o.name == app.name) {
                return self.err(
                    Pos::from(&a.value.name),
                    format!("apps[{i}].name: duplicate app name {:?}", app.name),
                );
            }
            apps.push(app);
        }
        Ok(apps)
    }

    fn app(&self, i: usize, a: &Spanned<raw::App>) -> Result<AppConfig, ConfigError> {
        let raw = &a.value;
        let key = |f: &str| format!("apps[{i}].{f}");
        let name = &self.name(&raw.name, &key("name"))?;
        let here = self.file.parent().unwrap_or(Path::new("/"));
        let dir = match &raw.dir {
            Some(d) if d.value.is_empty() => {
                return self.err(Pos::from(d), format!("{}: must not be empty", key("dir")))
            }
            Some(d) => here.join(&d.value),
            None => here.to_path_buf(),
        };
        let command = raw.command.value.clone();
        let Some(first) = command.first().filter(|c| !c.is_empty()) else {
            return self.err(
                Pos::from(&raw.command),
                format!("{}: must name a program", key("command")),
            );
        };
        // A bare name is looked up on PATH when the app starts (and by
        // `check`); a path is the app's own, relative to its directory.
        let program = if first.contains('/') {
            dir.join(first)
        } else {
            PathBuf::from(first)
        };
        let socket = match raw.socket.as_ref().map(|s| (s, s.value.as_str())) {
            None | Some((_, "fd")) => AppSocket::Fd,
            Some((_, "port")) => AppSocket::Port,
            Some((s, other)) => {
                return self.err(
                    Pos::from(s),
                    format!(
                        "{}: {other:?} is not a socket kind (use fd or port)",
                        key("socket")
                    ),
                )
            }
        };
        let ready = match &raw.ready {
            None => AppReady::Answers,
            Some(r) => match &r.value {
                raw::AppReady::Word(w) if w == "notify" => AppReady::Notify,
                raw::AppReady::Http(h) if h.http.starts_with('/') => AppReady::Http(h.http.clone()),
                raw::AppReady::Http(h) => {
                    return self.err(
                        Pos::from(r),
                        format!("{}: {:?} must start with '/'", key("ready.http"), h.http),
                    )
                }
                raw::AppReady::Word(w) => {
                    return self.err(
                        Pos::from(r),
                        format!(
                            "{}: {w:?} is not a readiness check (use notify, or {{ http: /path }})",
                            key("ready")
                        ),
                    )
                }
            },
        };
        let stop_signal = match &raw.stop_signal {
            None => nix::sys::signal::Signal::SIGTERM,
            Some(s) => {
                let bare = s.value.trim_start_matches("SIG");
                match STOP_SIGNALS.iter().find(|(n, _)| *n == bare) {
                    Some((_, sig)) => *sig,
                    None => {
                        return self.err(
                            Pos::from(s),
                            format!(
                                "{}: {:?} is not one of TERM, INT, QUIT, HUP, USR1, USR2, KILL",
                                key("stop_signal"),
                                s.value
                            ),
                        )
                    }
                }
            }
        };
        let start_timeout = self.duration(
            &raw.start_timeout,
            &key("start_timeout"),
            Duration::from_secs(30),
        )?;
        let stop_timeout = self.duration(
            &raw.stop_timeout,
            &key("stop_timeout"),
            Duration::from_secs(30),
        )?;
        if start_timeout.is_zero() {
            return self.err(
                raw.start_timeout.as_ref().map(Pos::from),
                format!("{}: must be more than 0", key("start_timeout")),
            );
        }
        let mut watch = Vec::new();
        for w in &raw.watch {
            if w.value.is_empty() {
                return self.err(Pos::from(w), format!("{}: must not be empty", key("watch")));
            }
            watch.push(dir.join(&w.value));
        }
        Ok(AppConfig {
            name: name.clone(),
            program,
            command,
            dir,
            env: raw
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            socket,
            ready,
            start_timeout,
            stop_signal,
            stop_timeout,
            watch,
            canary: match &raw.canary {
                Some(c) => self.canary(&c.value, &key("canary"))?,
                None => Canary::default(),
            },
            pos: Pos::from(a),
        })
    }

    fn canary(&self, raw: &raw::Canary, key: &str) -> Result<Canary, ConfigError> {
        let d = Canary::default();
        // `1%`, or `1`: percentage points either way; the ratio a number.
        let number = |v: &Option<Spanned<String>>, name: &str, percent: bool| {
            let Some(v) = v else { return Ok(None) };
            let text = v.value.trim();
            let text = if percent {
                text.strip_suffix('%').unwrap_or(text).trim()
            } else {
                text
            };
            match text.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
                _ => self.err(
                    Pos::from(v),
                    format!(
                        "{key}.{name}: {:?} is not {}",
                        v.value,
                        if percent {
                            "a percentage (1%)"
                        } else {
                            "a number"
                        }
                    ),
                ),
            }
        };
        let steps = match &raw.steps {
            None => d.steps,
            Some(s) => {
                let mut steps = Vec::new();
                for v in &s.value {
                    match v.value.trim().trim_end_matches('%').parse::<u32>() {
                        Ok(n) if (1..=100).contains(&n) && steps.last().is_none_or(|&l| n > l) => {
                            steps.push(n)
                        }
                        _ => {
                            return self.err(
                                Pos::from(v),
                                format!(
                                    "{key}.steps: {:?} is not a share from 1 to 100, above the one before",
                                    v.value
                                ),
                            )
                        }
                    }
                }
                if steps.last() != Some(&100) {
                    return self.err(
                        Pos::from(s),
                        format!("{key}.steps: must end at 100 (the new version takes everything)"),
                    );
                }
                steps
            }
        };
        let step = self.duration(&raw.step, &format!("{key}.step"), d.step)?;
        if step.is_zero() {
            return self.err(
                raw.step.as_ref().map(Pos::from),
                format!("{key}.step: must be more than 0"),
            );
        }
        let max_error_increase = number(&raw.max_error_increase, "max_error_increase", true)?
            .map_or(d.max_error_increase, |n| n / 100.0);
        let max_p99_ratio =
            number(&raw.max_p99_ratio, "max_p99_ratio", false)?.unwrap_or(d.max_p99_ratio);
        if max_p99_ratio < 1.0 {
            return self.err(
                raw.max_p99_ratio.as_ref().map(Pos::from),
                format!("{key}.max_p99_ratio: must be at least 1"),
            );
        }
        let min_requests = match &raw.min_requests {
            None => d.min_requests,
            Some(v) => match v.value.trim().parse::<u64>() {
                Ok(n) => n,
                Err(_) => {
                    return self.err(
                        Pos::from(v),
                        format!("{key}.min_requests: {:?} is not a whole number", v.value),
                    )
                }
            },
        };
        Ok(Canary {
            steps,
            step,
            max_error_increase,
            max_p99_ratio,
            min_requests,
        })
    }
}

impl AppConfig {
    /// The program to execute: a path as given, or a bare name found on
    /// `PATH` (the app's own `env: { PATH }` first).
    pub(crate) fn resolve_program(&self) -> Result<PathBuf, String> {
        let executable = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if self.program.components().count() > 1 {
            return if executable(&self.program) {
                Ok(self.program.clone())
            } else {
                Err(format!(
                    "{} is not an executable file",
                    self.program.display()
                ))
            };
        }
        let path = self
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| std::ffi::OsString::from(v))
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|d| self.dir.join(d).join(&self.program))
            .find(|p| executable(p))
            .ok_or_else(|| format!("{} is not found on PATH", self.program.display()))
    }
}
