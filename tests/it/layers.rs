//! The module map in `src/lib.rs` promises that dependencies point one way. This reads `src/` the
//! way a reviewer would (every `crate::` path outside comments) and fails on an import cycle between
//! top-level modules, naming it, so the promise stays true without anyone re-measuring it. One
//! level down the same holds: the files of one folder (reading `super::` and `self::` paths too)
//! import each other one way only.

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

// ---- Files of one folder -------------------------------------------------------------------------
//
// Inside a module's folder the same promise holds one level down: its parts (each file, or each
// sub-folder with its root file) point one way. The folder's root file (`m.rs` or `m/mod.rs`)
// declares the parts and sits above them; an item a part names through the root (`super::X`,
// `crate::m::X`) counts as naming the part the root imports it from, so a re-export hides no cycle.

/// A file's module path: `src/store/postgres/claim.rs` → `store::postgres::claim`, `src/m/mod.rs`
/// → `m`, `src/lib.rs` → the crate root (empty).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut path: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if path
        .last()
        .is_some_and(|last| last == "mod" || last == "lib")
    {
        path.pop();
    }
    path
}

/// The inline modules of `code` (`mod tests { … }`): each one's name and the span of its body.
fn inline_modules(code: &str) -> Vec<(String, std::ops::Range<usize>)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(i) = code[from..].find("mod ").map(|i| i + from) {
        from = i + 4;
        let preceded_by_ident = code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        let name = ident_at(&code[from..]);
        let after = code[from + name.len()..].trim_start();
        if preceded_by_ident || name.is_empty() || !after.starts_with('{') {
            continue; // not a module, or a file module (`mod x;`)
        }
        let open = code.len() - after.len();
        let mut depth = 0usize;
        let mut end = code.len();
        let mut j = open;
        while j < bytes.len() {
            match bytes[j] {
                // '{' and '}' as character literals are not braces.
                b'\'' if bytes.get(j + 2) == Some(&b'\'') => j += 2,
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        found.push((name, open..end));
    }
    found
}

/// The paths of a use tree or an expression path, without its prefix: `a::b::C` → `[a, b, C]`,
/// `{a, b::{c, self}}` → `[a]`, `[b, c]`, `[b]`; `*` and `self` name the module they follow.
fn use_tree(s: &str) -> (Vec<Vec<String>>, &str) {
    let s = s.trim_start();
    if let Some(mut rest) = s.strip_prefix('{') {
        let mut paths = Vec::new();
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                return (paths, after);
            }
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
                continue;
            }
            let (more, after) = use_tree(rest);
            if after.len() == rest.len() {
                return (paths, after); // not a use tree after all
            }
            paths.extend(more);
            rest = after;
        }
    }
    if let Some(after) = s.strip_prefix('*') {
        return (vec![Vec::new()], after);
    }
    let name = ident_at(s);
    if name.is_empty() {
        return (Vec::new(), s);
    }
    let rest = &s[name.len()..];
    let head = if name == "self" {
        Vec::new()
    } else {
        vec![name]
    };
    if let Some(after) = rest.trim_start().strip_prefix("::") {
        let (tails, after) = use_tree(after);
        if !tails.is_empty() {
            let paths = tails
                .into_iter()
                .map(|tail| head.iter().cloned().chain(tail).collect())
                .collect();
            return (paths, after);
        }
    }
    (vec![head], rest)
}

/// Every module path the code of the file at module path `file` names through `crate::`,
/// `super::` or `self::`, made absolute (from the crate root).
fn absolute_references(file: &[String], code: &str) -> Vec<Vec<String>> {
    let inline = inline_modules(code);
    let mut found = Vec::new();
    let mut at = 0;
    while at < code.len() {
        let rest = &code[at..];
        let prefix = ["crate::", "super::", "self::"]
            .into_iter()
            .find(|p| rest.starts_with(p));
        let preceded_by_ident = code[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        let Some(prefix) = prefix.filter(|_| !preceded_by_ident) else {
            at += rest.chars().next().unwrap().len_utf8();
            continue;
        };
        // The module this code sits in: the file's, and the inline modules around it.
        let mut base: Vec<String> = file.to_vec();
        let mut around: Vec<_> = inline
            .iter()
            .filter(|(_, span)| span.contains(&at))
            .collect();
        around.sort_by_key(|(_, span)| span.start);
        base.extend(around.into_iter().map(|(name, _)| name.clone()));
        let mut tail = &rest[prefix.len()..];
        match prefix {
            "crate::" => base.clear(),
            "super::" => {
                base.pop();
                while let Some(after) = tail.strip_prefix("super::") {
                    base.pop();
                    tail = after;
                }
            }
            _ => {}
        }
        let (paths, _) = use_tree(tail);
        found.extend(
            paths
                .into_iter()
                .map(|p| base.iter().cloned().chain(p).collect()),
        );
        at = code.len() - tail.len();
    }
    found
}

/// One folder's parts and the parts each imports: `(folder, part → parts)`, for every module
/// whose folder holds at least two parts (the crate root's are the test above's business).
fn folder_graphs() -> Vec<(String, BTreeMap<String, BTreeSet<String>>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files: Vec<(Vec<String>, String)> = rust_files(&src)
        .into_iter()
        .filter(|f| !f.starts_with(src.join("bin")))
        .map(|f| {
            let code = strip_comments(&fs::read_to_string(&f).unwrap());
            (module_path(&src, &f), code)
        })
        .collect();
    let mut graphs = Vec::new();
    for dir in directories(&src) {
        let folder = module_path(&src, &dir.join("mod.rs"));
        if folder.is_empty() || folder.first().is_some_and(|f| f == "bin") {
            continue;
        }
        let parts: BTreeSet<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir() || (p.extension().is_some_and(|e| e == "rs")))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .filter(|name| name != "mod")
            .collect();
        if parts.len() < 2 {
            continue;
        }
        // The part under `folder` that an absolute path names, if any.
        let part_of = |path: &[String]| -> Option<String> {
            path.strip_prefix(folder.as_slice())?
                .first()
                .filter(|p| parts.contains(*p))
                .cloned()
        };
        // Items the root file imports from its parts (`use self::slot::Slot`): name → part.
        let mut reexported: BTreeMap<String, String> = BTreeMap::new();
        for (path, code) in files.iter().filter(|(p, _)| *p == folder) {
            for r in absolute_references(path, code) {
                if let (Some(part), Some(item)) = (part_of(&r), r.last())
                    && r.len() > folder.len() + 1
                {
                    reexported.entry(item.clone()).or_insert(part);
                }
            }
        }
        let mut graph: BTreeMap<String, BTreeSet<String>> =
            parts.iter().map(|p| (p.clone(), BTreeSet::new())).collect();
        for (path, code) in &files {
            let Some(from) = part_of(path) else { continue };
            for r in absolute_references(path, code) {
                let to = part_of(&r).or_else(|| {
                    let rest = r.strip_prefix(folder.as_slice())?;
                    reexported.get(rest.first()?).cloned()
                });
                if let Some(to) = to.filter(|to| *to != from) {
                    graph.get_mut(&from).unwrap().insert(to);
                }
            }
        }
        graphs.push((format!("src/{}", folder.join("/")), graph));
    }
    graphs
}

fn directories(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.push(path.clone());
            out.extend(directories(&path));
        }
    }
    out.sort();
    out
}

#[test]
fn files_of_one_folder_import_each_other_without_cycles() {
    let graphs = folder_graphs();
    assert!(
        graphs.iter().any(|(folder, _)| folder == "src/broker"),
        "src/ was read: {graphs:?}"
    );
    let mut cycles = Vec::new();
    for (folder, graph) in &graphs {
        let mut reported: Vec<BTreeSet<String>> = Vec::new();
        for part in graph.keys() {
            let found = cycle_from(
                graph,
                part,
                part,
                &mut vec![part.clone()],
                &mut BTreeSet::new(),
            );
            if let Some(cycle) = found {
                let members: BTreeSet<String> = cycle.iter().cloned().collect();
                if !reported.contains(&members) {
                    reported.push(members);
                    cycles.push(format!("{folder}: {}", cycle.join(" → ")));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between files of one folder (each must point one way; move the shared \
         item into a file of its own):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_folder_reader_resolves_super_self_and_inline_modules() {
    let code = strip_comments(
        "use super::{slot::Slot, Inner, policy};\nuse crate::broker::refresh::{self, X};\n\
         fn f() { self::g::h(); super::super::store::Y::z(); }\n\
         #[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::events::E;\n    fn c() -> char { '}' }\n}\n\
         fn after() { super::admin::A; }",
    );
    let file = ["broker".to_owned(), "get".to_owned()];
    let found: Vec<String> = absolute_references(&file, &code)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        found,
        [
            "broker::slot::Slot",
            "broker::Inner",
            "broker::policy",
            "broker::refresh",
            "broker::refresh::X",
            "broker::get::g::h",
            "store::Y::z",
            "broker::get",
            "broker::events::E",
            "broker::admin::A",
        ]
    );
}
