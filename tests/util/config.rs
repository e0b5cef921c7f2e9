//! Typed configs for tests: built and edited as values, written as YAML
//! (JSON's syntax, which YAML accepts), so an edit that names something
//! missing fails loudly instead of silently changing nothing.

use serde_json::{json, Map, Value};

/// A config file.
#[derive(Clone, Debug)]
pub struct Config {
    top: Map<String, Value>,
    listeners: Vec<Listener>,
}

/// One listener of a config.
#[derive(Clone, Debug)]
pub struct Listener {
    pub name: String,
    fields: Map<String, Value>,
    /// path, action, the action's settings.
    routes: Vec<(String, String, Value)>,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    /// `shutdown_timeout: 10s`, no listeners.
    pub fn new() -> Config {
        Config {
            top: Map::new(),
            listeners: Vec::new(),
        }
        .set("shutdown_timeout", "10s")
    }

    /// One plain (`web`) and one TLS (`web-tls`) listener on kernel-picked
    /// ports: `/` answers `pid P gen G LISTENER`, `/delay` after 2 s, and
    /// `web` has `/status`.
    pub fn basic() -> Config {
        let root = json!({ "body": "pid {pid} gen {generation} {listener}\n" });
        let delay = json!({ "body": "slow {pid}\n", "delay": "2s" });
        Config::new()
            .listener(
                Listener::plain("web")
                    .route("/delay", "respond", delay.clone())
                    .route("/status", "status", json!({}))
                    .route("/", "respond", root.clone()),
            )
            .listener(
                Listener::tls("web-tls", "localhost.crt", "localhost.key")
                    .route("/delay", "respond", delay)
                    .route("/", "respond", root),
            )
    }

    /// Sets a top-level key (`watch`, `timeouts`, `pid_file`, ...).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Config {
        self.top.insert(key.to_string(), value.into());
        self
    }

    pub fn listener(mut self, l: Listener) -> Config {
        self.listeners.push(l);
        self
    }

    /// Inserts `l` before the listener named `before`.
    pub fn listener_before(mut self, before: &str, l: Listener) -> Config {
        let at = self.index(before);
        self.listeners.insert(at, l);
        self
    }

    fn index(&self, name: &str) -> usize {
        self.listeners
            .iter()
            .position(|l| l.name == name)
            .unwrap_or_else(|| panic!("no listener {name} in {self:?}"))
    }

    /// Edits the listener named `name`.
    pub fn edit(mut self, name: &str, f: impl FnOnce(Listener) -> Listener) -> Config {
        let at = self.index(name);
        let l = self.listeners.remove(at);
        self.listeners.insert(at, f(l));
        self
    }

    /// Sets `key` of every route whose action has it (e.g. every `delay`).
    pub fn every_route(mut self, key: &str, value: impl Into<Value>) -> Config {
        let value = value.into();
        let mut found = false;
        for l in &mut self.listeners {
            for (_, _, args) in &mut l.routes {
                if let Some(v) = args.get_mut(key) {
                    *v = value.clone();
                    found = true;
                }
            }
        }
        assert!(found, "no route has {key}");
        self
    }

    /// The config's text.
    pub fn yaml(&self) -> String {
        let mut doc = self.top.clone();
        doc.insert(
            "listeners".into(),
            Value::Array(self.listeners.iter().map(Listener::value).collect()),
        );
        serde_json::to_string_pretty(&Value::Object(doc)).unwrap() + "\n"
    }
}

impl Listener {
    /// A plain listener on 127.0.0.1, port picked by the kernel.
    pub fn plain(name: &str) -> Listener {
        Listener {
            name: name.to_string(),
            fields: Map::new(),
            routes: Vec::new(),
        }
        .set("addr", "127.0.0.1:0")
    }

    /// A TLS listener with `cert` and `key` (paths relative to the config).
    pub fn tls(name: &str, cert: &str, key: &str) -> Listener {
        Listener::plain(name).set("tls", json!({ "cert": cert, "key": key }))
    }

    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Listener {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// Adds a route (routes match by longest prefix, so order is free), or
    /// replaces the route at `path`.
    pub fn route(mut self, path: &str, action: &str, args: Value) -> Listener {
        self.routes.retain(|(p, _, _)| p != path);
        self.routes
            .push((path.to_string(), action.to_string(), args));
        self
    }

    /// The TLS settings, to change certificate paths.
    pub fn tls_files(self, cert: &str, key: &str) -> Listener {
        assert!(self.fields.contains_key("tls"), "{} has no tls", self.name);
        self.set("tls", json!({ "cert": cert, "key": key }))
    }

    fn value(&self) -> Value {
        let mut l = Map::new();
        l.insert("name".into(), self.name.clone().into());
        l.extend(self.fields.clone());
        let routes = self
            .routes
            .iter()
            .map(|(path, action, args)| {
                let mut r = Map::new();
                r.insert("path".into(), path.clone().into());
                r.insert(action.clone(), args.clone());
                Value::Object(r)
            })
            .collect();
        if !self.routes.is_empty() {
            l.insert("routes".into(), Value::Array(routes));
        }
        Value::Object(l)
    }
}
