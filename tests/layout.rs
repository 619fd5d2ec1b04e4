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

/// The modules `text` names through `crate::` in code (comments and unit
/// tests aside), its re-exported types mapped to the modules that define
/// them.
fn imports(text: &str) -> BTreeSet<String> {
    reached(text, "crate::")
        .into_iter()
        .filter_map(|name| match name.as_str() {
            "Error" => Some("error".to_owned()),
            "TestContext" => Some("context".to_owned()),
            "Tenant" | "" => None,
            _ => Some(name),
        })
        .collect()
}

#[test]
fn the_runtimes_modules_import_each_other_without_a_cycle() {
    let modules = modules();
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(module, files)| {
            let mut uses: BTreeSet<String> =
                files.iter().flat_map(|(_, text)| imports(text)).collect();
            uses.remove(module);
            (module.clone(), uses)
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
    assert_no_cycle(&graph, "the runtime's modules");
}

/// The names `text` (code, comments and unit tests aside) reaches through
/// `prefix` (`super::` or `crate::isolation::`, say), single or grouped.
fn reached(text: &str, prefix: &str) -> BTreeSet<String> {
    let code: Vec<&str> = text
        .lines()
        .take_while(|line| *line != "#[cfg(test)]")
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect();
    let text = code.join("\n");
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &text[at + prefix.len()..];
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
            found.insert(name);
        }
    }
    found
}

/// Panics naming the cycle if `graph` has one.
fn assert_no_cycle(graph: &BTreeMap<String, BTreeSet<String>>, what: &str) {
    fn visit<'a>(
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        node: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        what: &str,
    ) {
        if let Some(start) = path.iter().position(|seen| *seen == node) {
            panic!(
                "{what} import each other in a cycle: {} -> {node}",
                path[start..].join(" -> ")
            );
        }
        if !done.insert(node) {
            return;
        }
        path.push(node);
        for next in &graph[node] {
            visit(graph, next, path, done, what);
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(graph, node, &mut Vec::new(), &mut done, what);
    }
}

/// The sources under `dir`, each with its text.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let text = fs::read_to_string(&path).unwrap();
                found.push((path, text));
            }
        }
    }
    found
}

#[test]
fn the_files_of_each_folder_import_each_other_without_a_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pgtest-runtime/src");
    let folders: Vec<PathBuf> = sources(&root)
        .into_iter()
        .filter(|(path, _)| path.ends_with("mod.rs"))
        .map(|(path, _)| path.parent().unwrap().to_owned())
        .collect();
    assert!(
        folders.len() >= 5,
        "the scan finds the folders: {folders:?}"
    );
    for folder in folders {
        // A folder's files and subfolders, its `mod.rs` (what it declares
        // and re-exports) aside: each names its siblings through `super::`
        // (from a file of the folder) or its path from the crate.
        let path = folder.strip_prefix(&root).unwrap();
        let from_crate = format!(
            "crate::{}::",
            path.iter()
                .map(|part| part.to_string_lossy())
                .collect::<Vec<_>>()
                .join("::")
        );
        let mut nodes: BTreeMap<String, Vec<(PathBuf, String)>> = BTreeMap::new();
        for entry in fs::read_dir(&folder).unwrap().flatten() {
            let entry = entry.path();
            let name = entry.file_stem().unwrap().to_string_lossy().into_owned();
            if entry.is_dir() {
                nodes.insert(name, sources(&entry));
            } else if name != "mod" && entry.extension().is_some_and(|ext| ext == "rs") {
                let text = fs::read_to_string(&entry).unwrap();
                nodes.insert(name, vec![(entry, text)]);
            }
        }
        let graph: BTreeMap<String, BTreeSet<String>> = nodes
            .iter()
            .map(|(node, files)| {
                let uses = files
                    .iter()
                    .flat_map(|(file, text)| {
                        let mut names = reached(text, &from_crate);
                        if file.parent() == Some(folder.as_path()) {
                            names.extend(reached(text, "super::"));
                        }
                        names
                    })
                    .filter(|name| name != node && nodes.contains_key(name))
                    .collect();
                (node.clone(), uses)
            })
            .collect();
        assert_no_cycle(&graph, &format!("the files of {}", path.display()));
    }
}

#[test]
fn the_folder_scan_reads_super_and_crate_paths() {
    let text = "use super::{finish::TestDatabase, claim};\nuse crate::isolation::database::finish;\n// super::nothing";
    let from_super: Vec<String> = reached(text, "super::").into_iter().collect();
    assert_eq!(from_super, ["claim", "finish"]);
    let from_crate: Vec<String> = reached(text, "crate::isolation::database::")
        .into_iter()
        .collect();
    assert_eq!(from_crate, ["finish"]);
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    let found = std::panic::catch_unwind(|| assert_no_cycle(&graph, "x"));
    assert!(found.is_err(), "a cycle is found");
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
