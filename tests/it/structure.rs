//! The shape of the code, checked: the library's top-level modules depend on each other
//! one way (no cycle, however long), and every source path the README and docs/ name
//! exists. A new cycle fails here with the edges that make it and the files they are in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The identifiers a text names as `crate::NAME`, `crate::{NAME, …}` included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::`, `some_crate::`
        }
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // the first name of each entry at the group's top level
            let mut depth = 0;
            let mut entry_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        entry_start = true;
                        continue;
                    }
                    c if c.is_whitespace() => continue,
                    _ => {}
                }
                if entry_start && depth == 0 {
                    out.insert(ident(&group[i..]));
                    entry_start = false;
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

/// Top-level module → the top-level modules it names, with the files that name them.
/// Unit-test modules at the end of a file do not count: they may reach anywhere.
fn module_graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| {
            let rel = f.strip_prefix(&src).ok()?;
            let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
            Some(first.trim_end_matches(".rs").to_owned())
        })
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let module = first.trim_end_matches(".rs").to_owned();
        if !modules.contains(&module) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(at) => &text[..at],
            None => &text[..],
        };
        for dep in crate_paths(text) {
            if dep != module && modules.contains(&dep) {
                graph
                    .entry(module.clone())
                    .or_default()
                    .entry(dep)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
        graph.entry(module).or_default();
    }
    graph
}

/// A cycle through `start`, if there is one: the modules along it.
fn cycle_from(
    graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    start: &str,
) -> Option<Vec<String>> {
    // breadth first, so the shortest cycle is the one shown
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(m) = queue.pop_front() {
        for dep in graph.get(m).into_iter().flat_map(|d| d.keys()) {
            if dep == start {
                let mut back = Vec::new();
                let mut at = m;
                while at != start {
                    back.push(at.to_owned());
                    at = came_from[at];
                }
                back.reverse();
                let mut path = vec![start.to_owned()];
                path.extend(back);
                path.push(start.to_owned());
                return Some(path);
            }
            if !came_from.contains_key(dep.as_str()) && dep != start {
                came_from.insert(dep, m);
                queue.push_back(dep);
            }
        }
    }
    None
}

#[test]
fn modules_depend_one_way() {
    let graph = module_graph();
    assert!(
        graph.len() > 20,
        "the module graph was not read: {:?}",
        graph.keys()
    );
    // the scan sees real edges: the request path reaches the policy and the config
    assert!(graph["proxy"].contains_key("policy") && graph["policy"].contains_key("config"));
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|path| {
            let edges: Vec<String> = path
                .windows(2)
                .map(|w| format!("{} -> {} ({:?})", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect();
            format!("{}\n    {}", path.join(" -> "), edges.join("\n    "))
        })
        .collect();
    assert!(
        cycles.is_empty(),
        "module cycles (each module depends on the next through `crate::` paths in these files):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut g: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().entry(b.into()).or_default();
        g.entry(b.into()).or_default();
    }
    assert_eq!(
        cycle_from(&g, "a"),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(cycle_from(&g, "d"), None);
    assert_eq!(
        crate_paths("use crate::{a::X, b, c::{d, e}};\nlet x = crate::f::g(); $crate::h"),
        ["a", "b", "c", "f"].iter().map(|s| s.to_string()).collect()
    );
}

#[test]
fn every_source_path_the_docs_name_exists() {
    let root = root();
    let mut docs = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            docs.push(e.path());
        }
    }
    let mut missing = Vec::new();
    let mut seen = 0;
    for d in &docs {
        let text = std::fs::read_to_string(d).unwrap();
        for (at, _) in text.match_indices("`src/") {
            let path: String = text[at + 1..]
                .chars()
                .take_while(|c| *c != '`' && !c.is_whitespace())
                .collect();
            // a glob or a brace list stands for several files: check its fixed part
            let fixed = path.split(['{', '*']).next().unwrap_or(&path);
            seen += 1;
            if !root.join(fixed).exists() {
                missing.push(format!("{}: {path}", d.display()));
            }
        }
    }
    assert!(seen > 10, "the docs name few source paths: {seen}");
    assert!(
        missing.is_empty(),
        "docs name source paths that do not exist:\n{}",
        missing.join("\n")
    );
}
