//! Issue 31: the documentation cannot drift from the program. The config
//! reference (`docs/config.md`) names exactly the keys the parser accepts,
//! every YAML example in the docs passes `gracesrv check`, and the command
//! line's help points to the docs.

mod util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const PROBE: &str = "zzz_probe";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A key's place: each step a field name, and whether its value is a list
/// (whose items hold the next step).
type Place = Vec<(String, bool)>;

/// `listeners[].routes[].proxy`: how docs/config.md writes a place.
fn written(place: &Place) -> String {
    let mut s = String::new();
    for (i, (name, list)) in place.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(name);
        if *list && i + 1 < place.len() {
            s.push_str("[]");
        }
    }
    s
}

/// The config (as JSON, which is YAML) with `leaf: 1` at `place`.
fn nested(place: &[(String, bool)], leaf: &str) -> serde_json::Value {
    match place.split_first() {
        None => serde_json::json!({ leaf: 1 }),
        Some(((name, list), rest)) => {
            let inner = nested(rest, leaf);
            let value = if *list {
                serde_json::json!([inner])
            } else {
                inner
            };
            serde_json::json!({ name.as_str(): value })
        }
    }
}

/// What the parser says of a config with `leaf` at `place`: the message
/// of its error, or None if it took it.
fn parse(dir: &Path, place: &[(String, bool)], leaf: &str) -> Option<String> {
    let file = dir.join("probe.yaml");
    std::fs::write(&file, nested(place, leaf).to_string()).unwrap();
    gracesrv::check(&file).err().map(|e| e.to_string())
}

/// The fields of the struct at `place`, if the value there is one: the
/// parser refuses an unknown field and lists the ones it takes.
fn fields(dir: &Path, place: &[(String, bool)]) -> Option<Vec<String>> {
    let msg = parse(dir, place, PROBE)?;
    let (_, list) = msg.split_once(&format!("unknown field `{PROBE}`, expected "))?;
    let list = list.trim_start_matches("one of").trim();
    Some(
        list.split(',')
            .map(|f| f.trim().trim_matches('`').to_string())
            .filter(|f| !f.is_empty())
            .collect(),
    )
}

/// Every key the parser accepts, by place, found through the parser
/// itself: what it lists at the top, then within each value that is a
/// struct or a list of structs.
fn parser_keys(dir: &Path) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut todo: Vec<Place> = vec![vec![]];
    while let Some(place) = todo.pop() {
        let Some(names) = fields(dir, &place) else {
            continue;
        };
        for name in names {
            let mut as_map = place.clone();
            as_map.push((name.clone(), false));
            keys.insert(written(&as_map));
            let mut as_list = place.clone();
            as_list.push((name, true));
            for inner in [as_map, as_list] {
                if fields(dir, &inner).is_some() {
                    todo.push(inner);
                    break;
                }
            }
        }
    }
    keys
}

/// The keys docs/config.md documents: the first cell of each table row,
/// when it is a key in backticks.
fn documented_keys(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |"))
        .map(|(key, _)| key.trim().to_string())
        .collect()
}

/// `listeners[].routes[].proxy.upstreams[].url` as a place (the last step
/// a field, never a list).
fn place_of(key: &str) -> Place {
    key.split('.')
        .map(|step| match step.strip_suffix("[]") {
            Some(name) => (name.to_string(), true),
            None => (step.to_string(), false),
        })
        .collect()
}

#[test]
fn the_config_reference_names_every_key_the_parser_accepts_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let page = std::fs::read_to_string(root().join("docs/config.md")).expect("docs/config.md");
    let documented = documented_keys(&page);
    let accepted = parser_keys(dir.path());
    assert!(
        accepted.len() > 50,
        "the probe found too few keys: {accepted:?}"
    );
    let missing: Vec<_> = accepted.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "keys the parser accepts, missing from docs/config.md: {missing:?}"
    );
    // A documented key the probe did not list (inside a value that is not a
    // struct to the parser, such as `ready: { http: ... }`) must at least
    // not be refused as unknown where the page puts it.
    for key in documented.difference(&accepted) {
        let mut place = place_of(key);
        let (last, _) = place.pop().unwrap();
        if let Some(msg) = parse(dir.path(), &place, &last) {
            assert!(
                !msg.contains(&format!("unknown field `{last}`")),
                "docs/config.md names `{key}`, which the parser refuses: {msg}"
            );
        }
    }
}

/// The fenced blocks tagged `yaml` in `text`, with the line each starts on.
fn yaml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut current {
            Some(_) if fence.starts_with("```") => blocks.extend(current.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None if fence == "```yaml" => current = Some((i + 1, String::new())),
            None => {}
        }
    }
    blocks
}

#[test]
fn every_yaml_example_in_the_docs_passes_check() {
    let mut pages = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages.sort();
    let mut checked = 0;
    let mut failures = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (line, yaml) in yaml_blocks(&text) {
            // A directory like a checkout's: the example's certificate
            // beside it and in ../certs, a public/ directory for `static`
            // beside it and in ../public, a key file for a fleet's store.
            let dir = tempfile::tempdir().unwrap();
            let here = dir.path().join("config");
            std::fs::create_dir_all(dir.path().join("certs")).unwrap();
            for public in [here.join("public"), dir.path().join("public")] {
                std::fs::create_dir_all(&public).unwrap();
                std::fs::write(public.join("index.html"), "hello\n").unwrap();
            }
            for f in ["localhost.crt", "localhost.key"] {
                std::fs::copy(root().join("certs").join(f), here.join(f)).unwrap();
                std::fs::copy(
                    root().join("certs").join(f),
                    dir.path().join("certs").join(f),
                )
                .unwrap();
            }
            // The fleet's storage_key_file (docs/fleet.md).
            std::fs::write(here.join("store.key"), [7u8; 32]).unwrap();
            let file = here.join("example.yaml");
            std::fs::write(&file, &yaml).unwrap();
            let out = std::process::Command::new(util::bin())
                .args(["check", "-c"])
                .arg(&file)
                .output()
                .unwrap();
            checked += 1;
            if !out.status.success() {
                failures.push(format!(
                    "{}:{line}: {}",
                    page.strip_prefix(root()).unwrap_or(page).display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} YAML examples found in {pages:?}"
    );
    assert!(
        failures.is_empty(),
        "examples that fail `gracesrv check`:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_help_says_what_each_command_does_and_where_its_docs_are() {
    let help = |args: &[&str]| {
        let out = std::process::Command::new(util::bin())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    for (command, page) in [
        ("check", "docs/config.md"),
        ("reload", "docs/restarts.md"),
        ("deploy", "docs/apps.md"),
    ] {
        // One line in the overview, naming its page.
        let line = top
            .lines()
            .find(|l| l.trim_start().starts_with(command))
            .unwrap_or_else(|| panic!("{command} missing from --help:\n{top}"));
        assert!(line.contains(page), "{line}");
        let own = help(&[command, "--help"]);
        assert!(own.contains(page), "{command} --help:\n{own}");
        assert!(root().join(page).exists(), "{page} does not exist");
    }
    assert!(top.contains("docs/"), "{top}");
}
