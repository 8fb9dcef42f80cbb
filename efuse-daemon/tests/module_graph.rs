//! The daemon's modules import each other without a circle: each file of
//! `src/` is a module, and the `crate::…` and `super::…` paths its code
//! (not its comments, not its tests) names are its imports. A module may
//! name the folders that contain it (their `mod.rs` declares it, and it
//! adds to what they define).
//!
//! An import circle makes two modules one in all but name: neither can be
//! read, tested or changed alone (issue 21 removed the last one, cli ↔
//! control ↔ daemon).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`fs::inode`) -> source without comments and tests.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), code);
        }
    }
    out
}

/// The `a::b::c` paths after each `prefix` in `code`.
fn paths_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    code.match_indices(prefix).map(move |(i, _)| {
        code[i + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == ':')
            .collect::<String>()
            .trim_end_matches(':')
            .to_owned()
    })
}

/// The deepest module that `path` names.
fn resolve(mods: &BTreeMap<String, String>, path: &str) -> Option<String> {
    let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let k = parts.join("::");
        if mods.contains_key(&k) {
            return Some(k);
        }
        parts.pop();
    }
    None
}

fn imports(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, code) in mods {
        let parent = m.rsplit_once("::").map(|(p, _)| p.to_owned());
        let mut targets: Vec<String> = paths_after(code, "crate::")
            .filter_map(|p| resolve(mods, &p))
            .collect();
        if let Some(parent) = &parent {
            targets.extend(
                paths_after(code, "super::").filter_map(|p| resolve(mods, &format!("{parent}::{p}"))),
            );
        }
        for t in targets {
            // Not itself, nor a folder containing it: a child names its
            // parent (`super::`) to extend it. A parent naming its child is
            // an import like any other.
            if t != *m && !m.starts_with(&format!("{t}::")) {
                g.entry(m.clone()).or_default().insert(t);
            }
        }
    }
    g
}

/// A circle through `from`, if there is one.
fn circle(g: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    fn walk(
        g: &BTreeMap<String, BTreeSet<String>>,
        at: &str,
        goal: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(at).into_iter().flatten() {
            if next == goal {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, goal, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_owned()];
    walk(g, from, from, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn modules_import_without_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    assert!(
        mods.len() > 30,
        "found only {} modules under {}",
        mods.len(),
        src.display()
    );
    let g = imports(&mods);
    // The check sees imports: the dispatcher uses the filesystem.
    assert!(g.get("dispatch").is_some_and(|t| t.contains("fs")), "{g:?}");
    let circles: Vec<String> = mods
        .keys()
        .filter_map(|m| circle(&g, m))
        .map(|c| format!("{} -> {}", c.join(" -> "), c[0]))
        .collect();
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn the_check_finds_a_circle() {
    let mut mods = BTreeMap::new();
    mods.insert("a".to_owned(), "use crate::b::X;".to_owned());
    mods.insert("b".to_owned(), "fn f() { crate::c::g() }".to_owned());
    mods.insert("c".to_owned(), "use crate::a;".to_owned());
    mods.insert("d".to_owned(), "use crate::a::Y;".to_owned());
    // Through a folder: e uses its child e::f, which uses d, which uses e.
    mods.insert("e".to_owned(), "use f::Z; fn g() { crate::e::f::h() }".to_owned());
    mods.insert("e::f".to_owned(), "use super::W; use crate::g;".to_owned());
    mods.insert("g".to_owned(), "use crate::e::V;".to_owned());
    let g = imports(&mods);
    assert_eq!(circle(&g, "a").unwrap(), ["a", "b", "c"]);
    assert!(circle(&g, "d").is_none());
    assert_eq!(circle(&g, "g").unwrap(), ["g", "e", "e::f"]);
}
