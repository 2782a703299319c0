//! The module map in `src/lib.rs` promises that dependencies point one way. This reads `src/` the
//! way a reviewer would (every `crate::` path outside comments) and fails on an import cycle between
//! top-level modules, naming it, so the promise stays true without anyone re-measuring it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Top-level module → the files that make it up (`src/m.rs` and everything under `src/m/`).
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut map: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name == "bin" {
                continue; // binaries sit above the library
            }
            map.entry(name).or_default().extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" {
            map.entry(name).or_default().push(path);
        }
    }
    map
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The code without comments (line comments, doc comments, block comments); string literals are
/// kept, which is harmless: no string here spells `crate::`.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Every top-level module named after `crate::`: `crate::a::b`, `crate::a`, and each item of
/// `crate::{a, b::c, d::{e, f}}`.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let preceded_by_ident = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !preceded_by_ident {
            if let Some(group) = after.strip_prefix('{') {
                let mut depth = 0usize;
                let mut item_start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if item_start && (c.is_alphanumeric() || c == '_') => {
                            found.insert(ident_at(&group[j..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                found.insert(ident_at(after));
            }
        }
        rest = after;
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    modules
        .iter()
        .map(|(name, files)| {
            let mut deps = BTreeSet::new();
            for file in files {
                let code = strip_comments(&fs::read_to_string(file).unwrap());
                deps.extend(crate_references(&code));
            }
            deps.remove(name);
            deps.retain(|d| modules.contains_key(d));
            (name.clone(), deps)
        })
        .collect()
}

/// A cycle through `start`, if there is one (depth-first search).
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    node: &str,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    for next in &graph[node] {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_owned());
            return Some(cycle);
        }
        if seen.insert(next.clone()) {
            path.push(next.clone());
            if let Some(c) = cycle_from(graph, start, next, path, seen) {
                return Some(c);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let graph = graph();
    assert!(graph.len() > 10, "src/ was read: {graph:?}");
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| {
            cycle_from(&graph, m, m, &mut vec![m.clone()], &mut BTreeSet::new())
                .map(|c| c.join(" → "))
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles between top-level modules (each must point one way):\n{}",
        cycles.join("\n")
    );
}

/// The modules in the order `src/lib.rs`'s `# Layout` lists them, top (knows most) to bottom.
fn layout() -> Vec<String> {
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! - [`"))
        .map(|l| l.split('`').next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_layout_map_names_every_module_and_nothing_else() {
    let mapped: BTreeSet<String> = layout().into_iter().collect();
    let declared: BTreeSet<String> = graph().into_keys().collect();
    assert_eq!(
        mapped, declared,
        "src/lib.rs's # Layout vs the modules in src/"
    );
}

#[test]
fn every_module_imports_only_modules_listed_below_it() {
    let order = layout();
    let rank = |m: &str| order.iter().position(|o| o == m);
    let upward: Vec<String> = graph()
        .iter()
        .flat_map(|(m, deps)| deps.iter().map(move |d| (m.clone(), d.clone())))
        .filter(|(m, d)| rank(d) <= rank(m))
        .map(|(m, d)| format!("{m} → {d}"))
        .collect();
    assert!(
        upward.is_empty(),
        "imports that point up src/lib.rs's # Layout (move the module or the import):\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reader_finds_grouped_and_nested_imports() {
    let code = strip_comments(
        "use crate::{a::X, b, c::{d, e}};\n// crate::ignored\nfn f() { crate::g::h(); my_crate::z(); }",
    );
    let found: Vec<_> = crate_references(&code).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "g"]);
}
