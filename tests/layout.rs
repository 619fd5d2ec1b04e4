//! The runtime's modules import each other without a cycle, and only
//! `config` reads the environment: read from the runtime's sources.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The runtime's sources, by top-level module (a file, or a directory's
/// files), `lib.rs` aside.
fn modules() -> BTreeMap<String, Vec<(PathBuf, String)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pgtest-runtime/src");
    let mut modules: BTreeMap<String, Vec<(PathBuf, String)>> = BTreeMap::new();
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path.strip_prefix(&root).unwrap();
            let first = relative.iter().next().unwrap().to_string_lossy();
            let module = first.trim_end_matches(".rs").to_owned();
            if module != "lib" {
                let text = fs::read_to_string(&path).unwrap();
                modules.entry(module).or_default().push((path, text));
            }
        }
    }
    modules
}

/// The modules `text` names through `crate::` in code (comments aside),
/// its re-exported types mapped to the modules that define them.
fn imports(text: &str) -> BTreeSet<String> {
    let code: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect();
    let text = code.join("\n");
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        // `my_crate::tests` names another crate.
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[at + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap()].split(',').collect(),
            None => vec![rest],
        };
        for name in names {
            let name: String = name
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let module = match name.as_str() {
                "Error" => "error",
                "TestContext" => "context",
                "Tenant" | "" => continue,
                module => module,
            };
            found.insert(module.to_owned());
        }
    }
    found
}

#[test]
fn the_runtimes_modules_import_each_other_without_a_cycle() {
    let modules = modules();
    let graph: BTreeMap<&str, BTreeSet<String>> = modules
        .iter()
        .map(|(module, files)| {
            let mut uses: BTreeSet<String> =
                files.iter().flat_map(|(_, text)| imports(text)).collect();
            uses.remove(module);
            (module.as_str(), uses)
        })
        .collect();
    for uses in graph.values() {
        for module in uses {
            assert!(graph.contains_key(module.as_str()), "no module {module}");
        }
    }
    assert!(
        graph["runner"].contains("isolation"),
        "the scan reads imports"
    );
    // Depth-first, keeping the path: a module met again on it is a cycle.
    fn visit<'a>(
        graph: &'a BTreeMap<&str, BTreeSet<String>>,
        module: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(start) = path.iter().position(|seen| *seen == module) {
            panic!(
                "the runtime's modules import each other in a cycle: {} -> {module}",
                path[start..].join(" -> ")
            );
        }
        if !done.insert(module) {
            return;
        }
        path.push(module);
        for next in &graph[module] {
            visit(graph, next, path, done);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(&graph, module, &mut Vec::new(), &mut done);
    }
}

#[test]
fn only_config_reads_the_environment() {
    let mut readers = Vec::new();
    for (module, files) in modules() {
        for (path, text) in files {
            let reads = ["env::var", "var_os(", "dotenvy::var"]
                .iter()
                .any(|read| text.contains(read));
            if reads && module != "config" {
                readers.push(path);
            }
        }
    }
    assert!(
        readers.is_empty(),
        "these read environment variables; read them in config: {readers:#?}"
    );
}

#[test]
fn the_scan_finds_grouped_and_inline_imports() {
    let text = "use crate::{Error, catalog, names};\nlet x = crate::compat::raw(sql); my_crate::tests\n/// [`crate::budget`]";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, ["catalog", "compat", "error", "names"]);
}
