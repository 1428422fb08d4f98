//! The layer rules of ARCHITECTURE.md, checked on the source: a module names only modules
//! of lower layers (or its own top-level module), so intent and transports never depend
//! on each other, nothing in the library depends on the wiring, and the simulator stands
//! alone.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules by layer; a module may use a strictly lower layer.
const LAYERS: &[(&str, u32)] = &[
    ("config", 0),
    ("proto", 1),
    ("metrics", 2),
    ("state", 3),
    ("intent", 4),
    ("transport", 4),
    ("app", 5),
    ("cli", 5),
    ("demo", 6),
];

fn layer(top: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == top).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The code without `//` comments (doc comments mention modules freely).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every top-level module a file names with `crate::X`, including `use crate::{X, Y}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.insert(name);
        }
    }
    out
}

#[test]
fn every_module_uses_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        for used in named_modules(&code) {
            if used == top {
                continue;
            }
            if used == "sim" && top == "demo" {
                // The demo runs the proxy in front of the simulator.
                continue;
            }
            if top == "sim" || used == "sim" {
                problems.push(format!(
                    "{}: the simulator stands alone (uses or is used by crate::{used})",
                    rel.display()
                ));
                continue;
            }
            let (Some(mine), Some(theirs)) = (layer(&top), layer(&used)) else {
                problems.push(format!(
                    "{}: crate::{used} is in no layer of ARCHITECTURE.md",
                    rel.display()
                ));
                continue;
            };
            if theirs >= mine {
                problems.push(format!(
                    "{} (layer {mine}) uses crate::{used} (layer {theirs})",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layer rules broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_what_it_must() {
    let code = code_of("use crate::{state::State, proto};\n// crate::app in a comment\nlet x = crate::metrics::Metrics::new();");
    let named: Vec<String> = named_modules(&code).into_iter().collect();
    assert_eq!(named, ["metrics", "proto", "state"]);
}
