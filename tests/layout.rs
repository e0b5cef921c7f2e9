//! The crate's layout: folders by layer, each importing only the layers
//! below it, and modules importing each other one way only (no cycle,
//! however long, between modules or between folders). Read from the
//! sources: every `crate::PATH` outside comments is an edge from the
//! module of the file to the module the path names. In a layer folder a
//! module is `folder::name` (its own files included); `apps`, `config` and
//! `quic` count as one module each.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first: each may import only those after it.
const LAYERS: [&str; 12] = [
    "control", "quic", "serve", "http", "process", "apps", "tls", "store", "observe", "wire",
    "sys", "config",
];
/// Folders whose modules are units of their own.
const SPLIT: [&str; 9] = [
    "control", "serve", "http", "process", "tls", "store", "observe", "wire", "sys",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `folder::name`, or `folder`, for a path below `src` (its components).
fn unit(parts: &[String]) -> String {
    let folder = parts[0].trim_end_matches(".rs").to_string();
    match parts.get(1).map(|p| p.trim_end_matches(".rs")) {
        Some(name) if name != "mod" && SPLIT.contains(&folder.as_str()) => {
            format!("{folder}::{name}")
        }
        _ => folder,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a `crate::` path names: `folder::name` where that module
/// exists, else the folder (or the item of `lib.rs`).
fn named(path: &[&str]) -> String {
    let folder = path[0];
    if let Some(name) = path.get(1) {
        let d = src().join(folder);
        if SPLIT.contains(&folder)
            && (d.join(format!("{name}.rs")).is_file() || d.join(name).is_dir())
        {
            return format!("{folder}::{name}");
        }
    }
    folder.to_string()
}

/// Module → the modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let parts: Vec<String> = f
            .strip_prefix(&src)
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let m = unit(&parts);
        if m == "lib" || m == "main" {
            continue;
        }
        let deps = g.entry(m.clone()).or_default();
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let path: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
                if path.is_empty() || path[0].chars().any(|c| c.is_uppercase()) {
                    continue;
                }
                let to = named(&path);
                if to != m {
                    deps.insert(to);
                }
            }
            assert!(
                !code.contains("crate::{"),
                "{f:?}: name each import's module (`use crate::{{...}}` hides it)"
            );
        }
    }
    g
}

/// The folder of a module.
fn folder(m: &str) -> &str {
    m.split("::").next().unwrap()
}

/// Folder → the folders its modules name.
fn folders(g: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let mut f: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, deps) in g {
        let from = f.entry(folder(m).to_string()).or_default();
        for d in deps {
            if folder(d) != folder(m) {
                from.insert(folder(d).to_string());
            }
        }
    }
    f
}

/// A cycle through `g`, if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(m) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|p| p == m).unwrap();
                let mut cycle = path[start..].to_vec();
                cycle.push(m.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(m.to_string(), Mark::Open);
        path.push(m.to_string());
        for d in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, d, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(m.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in g.keys() {
        if let Some(c) = visit(g, m, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn modules_import_one_way() {
    let g = graph();
    assert!(g.len() > 30, "read the modules: {g:?}");
    assert!(
        g["serve::connection"].contains("process::context"),
        "the reader sees imports: {g:?}"
    );
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn folders_import_one_way() {
    let f = folders(&graph());
    if let Some(cycle) = find_cycle(&f) {
        panic!("import cycle between folders: {}", cycle.join(" -> "));
    }
}

/// No arrow runs back up: a layer imports only the layers below it.
#[test]
fn each_layer_imports_only_layers_below_it() {
    let f = folders(&graph());
    let rank = |l: &str| LAYERS.iter().position(|x| *x == l);
    for (from, deps) in &f {
        let r = rank(from).unwrap_or_else(|| panic!("{from} is in no layer: {LAYERS:?}"));
        for d in deps {
            let rd = rank(d).unwrap_or_else(|| panic!("{d} is in no layer: {LAYERS:?}"));
            assert!(rd > r, "{from} imports {d}, a layer above it: {LAYERS:?}");
        }
    }
}

/// `src/` holds `lib.rs`, `main.rs` and the layers' folders, nothing else;
/// and only `sys` has `unsafe` code.
#[test]
fn every_module_has_a_layer_and_only_sys_is_unsafe() {
    for e in std::fs::read_dir(src()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name == "lib.rs" || name == "main.rs" || LAYERS.contains(&name.as_str()),
            "src/{name} is in no layer folder: {LAYERS:?}"
        );
    }
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let rel = f.strip_prefix(src()).unwrap();
        let allowed =
            rel.starts_with("sys") || rel == Path::new("lib.rs") || rel == Path::new("main.rs");
        let unsafe_code = text.lines().any(|l| {
            let code = l.split("//").next().unwrap_or("");
            code.contains("unsafe {") || code.contains("unsafe fn") || code.contains("unsafe impl")
        });
        assert!(
            allowed || !unsafe_code,
            "{rel:?} has unsafe code outside sys/"
        );
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let edge = |g: &mut BTreeMap<String, BTreeSet<String>>, a: &str, b: &str| {
        g.entry(a.into()).or_default().insert(b.into());
    };
    edge(&mut g, "a", "b");
    edge(&mut g, "b", "c");
    assert_eq!(find_cycle(&g), None);
    edge(&mut g, "c", "a");
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
