//! Layout rules for every crate under `crates/`, checked on the source text (syn, no compiler):
//!
//! - no import cycle between the source files of a crate: a file imports another when it names
//!   an item of the other's module through a path starting with `crate::`, `super::` or
//!   `self::`, in a `use` item or an inline path (also inside macro calls). A parent's `mod x;`
//!   declaration is not an import; a child naming its parent's items (`super::Service`) is.
//! - no source file over [`MAX_LINES`] lines, not counting its `#[cfg(test)]` module.
//! - nothing below the top rooms ([`TOP_ROOMS`]: the HTTP layer, the CLI, the application
//!   layer) imports them, and the HTTP handlers import only the application layer
//!   ([`HANDLERS`]).
//! - no function over [`MAX_FN_LINES`] lines outside [`LONG_FUNCTIONS`], and no type whose
//!   inherent `impl` blocks are spread over more than [`MAX_IMPL_FILES`] files outside
//!   [`SPREAD_TYPES`]: both lists name each entry and why, and only shrink.
//!
//! `#[cfg(test)]` modules (inline or in their own file) and `tests/`, `examples/`, `benches/`
//! are left out of both.

use proc_macro2::{TokenStream, TokenTree};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// Import cycles in the tree today, each as the files of one strongly connected component of
/// the import graph (sorted).
/// The architecture step empties this list; an entry that no longer is a cycle fails the test
/// (remove it), so the list only shrinks.
const KNOWN_CYCLES: &[&[&str]] = &[];

/// Files over [`MAX_LINES`] today. The architecture step empties this list; an entry that is no
/// longer too long fails the test (remove it), so the list only shrinks.
const KNOWN_LONG_FILES: &[&str] = &[];

/// The daemon's top rooms and who may import them: the HTTP layer and the CLI sit above every
/// other room, so nothing below may reach up into them.
const TOP_ROOMS: &[(&str, &[&str])] = &[
    ("crates/memwarden/src/api/", &["crates/memwarden/src/api/", "crates/memwarden/src/server.rs"]),
    // The application layer: called by the ways an operation arrives (HTTP; the socket's
    // requests are answered inside it, `app/socket.rs`), never by the rooms it orchestrates.
    (
        "crates/memwarden/src/app/",
        &["crates/memwarden/src/app/", "crates/memwarden/src/api/", "crates/memwarden/src/server.rs"],
    ),
    ("crates/memwarden/src/cli/", &["crates/memwarden/src/cli/", "crates/memwarden/src/main.rs"]),
];

/// The HTTP handlers call only the application layer: within the crate, a file under `api/`
/// imports only `api/` and `app/` files (the app re-exports the types its use cases take and
/// return; the rooms themselves are private fields of `App`).
const HANDLERS: (&str, &[&str]) =
    ("crates/memwarden/src/api/", &["crates/memwarden/src/api/", "crates/memwarden/src/app/"]);

/// The most lines a source file may have, its `#[cfg(test)]` module not counted.
const MAX_LINES: usize = 600;

/// One crate's sources: path relative to its `src/` (`service/mod.rs`) → text.
type Sources = BTreeMap<String, String>;

/// File → the files it imports, within one crate (paths relative to `src/`).
type Graph = BTreeMap<String, BTreeSet<String>>;

/// A module: its path from the crate root and the file that holds it.
#[derive(Debug)]
struct Module {
    path: Vec<String>,
    file: String,
}

fn is_test_cfg(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && {
            let tokens = a.meta.require_list().map(|l| l.tokens.to_string()).unwrap_or_default();
            let words: Vec<&str> = tokens.split(|c: char| !c.is_alphanumeric() && c != '_').collect();
            words.contains(&"test") && !words.contains(&"not")
        }
    })
}

/// The file of child module `name` declared (`mod name;`) in `file`.
fn child_file(file: &str, name: &str, sources: &Sources) -> Option<String> {
    let dir = match file.rsplit_once('/') {
        _ if matches!(file, "lib.rs" | "main.rs") => String::new(),
        Some((dir, "mod.rs")) => format!("{dir}/"),
        None if file == "mod.rs" => String::new(),
        // `a/b.rs` (or a `bin/x.rs` root): children live in `a/b/`.
        _ => format!("{}/", file.trim_end_matches(".rs")),
    };
    [format!("{dir}{name}.rs"), format!("{dir}{name}/mod.rs")].into_iter().find(|f| sources.contains_key(f))
}

/// Every module of the crate reachable from its roots through non-test `mod` items (inline
/// modules map to the file that holds them), and the files of `#[cfg(test)] mod x;` modules.
fn modules(sources: &Sources, asts: &BTreeMap<String, syn::File>) -> (Vec<Module>, BTreeSet<String>) {
    fn walk(
        items: &[syn::Item],
        path: &[String],
        file: &str,
        sources: &Sources,
        asts: &BTreeMap<String, syn::File>,
        out: &mut (Vec<Module>, BTreeSet<String>),
    ) {
        for item in items {
            let syn::Item::Mod(m) = item else { continue };
            let name = m.ident.to_string();
            let mut child = path.to_vec();
            child.push(name.clone());
            match &m.content {
                Some(_) if is_test_cfg(&m.attrs) => {}
                Some((_, inner)) => {
                    out.0.push(Module { path: child.clone(), file: file.to_string() });
                    walk(inner, &child, file, sources, asts, out);
                }
                None => {
                    let Some(f) = child_file(file, &name, sources) else { continue };
                    if is_test_cfg(&m.attrs) {
                        out.1.insert(f);
                        continue;
                    }
                    out.0.push(Module { path: child.clone(), file: f.clone() });
                    if let Some(ast) = asts.get(&f) {
                        walk(&ast.items, &child, &f, sources, asts, out);
                    }
                }
            }
        }
    }
    let mut out = (Vec::new(), BTreeSet::new());
    // The library root; a binary root's own modules would need a tree of their own, and the
    // crates here have none (main.rs only uses the library by name).
    if let Some(ast) = asts.get("lib.rs") {
        out.0.push(Module { path: Vec::new(), file: "lib.rs".into() });
        walk(&ast.items, &[], "lib.rs", sources, asts, &mut out);
    }
    out
}

/// Collects the module-relative paths a file names, with the module they are named from.
struct PathCollector {
    /// The module the visitor is in (changes inside inline modules).
    module: Vec<String>,
    /// (module the path is written in, its segments).
    paths: Vec<(Vec<String>, Vec<String>)>,
}

impl PathCollector {
    /// Keeps a path if it starts with `crate`, `super` or `self`. A path through a child module's
    /// bare name (`device::Fit` in `service/mod.rs`) is the parent using what it declared, like
    /// its `mod device;`, and is no edge: counted, every parent that uses a child would form a
    /// cycle with each child that uses `super::`.
    fn record(&mut self, segments: Vec<String>) {
        let Some(first) = segments.first() else { return };
        let relative = matches!(first.as_str(), "crate" | "super" | "self");
        // A lone `self` is a method receiver or `use x::{self}`, handled by its use tree.
        if relative && !(segments.len() == 1 && first == "self") {
            self.paths.push((self.module.clone(), segments));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) if n.ident == "self" => self.record(prefix.clone()),
            syn::UseTree::Name(syn::UseName { ident }) | syn::UseTree::Rename(syn::UseRename { ident, .. }) => {
                let mut full = prefix.clone();
                full.push(ident.to_string());
                self.record(full);
            }
            syn::UseTree::Glob(_) => self.record(prefix.clone()),
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(prefix, t)),
        }
    }

    /// Paths inside macro calls (`format!("{}", crate::x::y())`): runs of `ident :: ident …`.
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < trees.len() {
            match &trees[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) => {
                    let mut segments = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)), Some(TokenTree::Ident(next))) =
                        (trees.get(j), trees.get(j + 1), trees.get(j + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        segments.push(next.to_string());
                        j += 3;
                    }
                    let after_path_sep = i >= 1 && matches!(&trees[i - 1], TokenTree::Punct(p) if p.as_char() == ':');
                    if segments.len() > 1 && !after_path_sep {
                        self.record(segments);
                    }
                    i = j.max(i + 1);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for PathCollector {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test_cfg(&m.attrs) {
            return;
        }
        if let Some((_, items)) = &m.content {
            self.module.push(m.ident.to_string());
            items.iter().for_each(|i| self.visit_item(i));
            self.module.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        self.record(p.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }

    // `pub(crate)`, `pub(super)`, `pub(in crate::x)` say who may see an item, not what it uses.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}
}

/// The file that defines the item a path names, written in module `from`: the longest prefix
/// of the absolute path that is a module (`crate::service::Service` → `service/mod.rs`,
/// `crate::service::device::Fit` → `service/device.rs`).
fn resolve<'m>(from: &[String], segments: &[String], modules: &'m [Module]) -> Option<&'m str> {
    let mut abs = from.to_vec();
    let mut rest = segments;
    match segments.first().map(String::as_str) {
        Some("crate") => {
            abs.clear();
            rest = &segments[1..];
        }
        Some("self") => rest = &segments[1..],
        _ => {}
    }
    while rest.first().map(String::as_str) == Some("super") {
        abs.pop()?;
        rest = &rest[1..];
    }
    abs.extend(rest.iter().cloned());
    (0..=abs.len()).rev().find_map(|n| modules.iter().find(|m| m.path == abs[..n]).map(|m| m.file.as_str()))
}

/// The import graph of one crate, its files parsed once.
fn import_graph(sources: &Sources) -> Result<Graph, String> {
    let asts = parse_all(sources)?;
    let (modules, _) = modules(sources, &asts);
    let mut graph = Graph::new();
    for m in &modules {
        if graph.contains_key(&m.file) {
            continue; // inline modules share their file's entry, visited with it.
        }
        let mut c = PathCollector { module: m.path.clone(), paths: Vec::new() };
        c.visit_file(&asts[&m.file]);
        let edges = graph.entry(m.file.clone()).or_default();
        for (from, segments) in c.paths {
            if let Some(to) = resolve(&from, &segments, &modules) {
                if to != m.file {
                    edges.insert(to.to_string());
                }
            }
        }
    }
    Ok(graph)
}

fn parse_all(sources: &Sources) -> Result<BTreeMap<String, syn::File>, String> {
    sources
        .iter()
        .map(|(f, text)| syn::parse_file(text).map(|ast| (f.clone(), ast)).map_err(|e| format!("{f}: {e}")))
        .collect()
}

/// The strongly connected components of more than one file (Tarjan), each sorted.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out.sort();
    t.out
}

/// Lines of a file without its `#[cfg(test)]` modules (attribute to closing brace).
fn counted_lines(text: &str, ast: &syn::File) -> usize {
    let total = text.lines().count();
    let test_lines: usize = ast
        .items
        .iter()
        .filter_map(|item| match item {
            syn::Item::Mod(m) if is_test_cfg(&m.attrs) => {
                let first = m.attrs.iter().map(|a| a.pound_token.span.start().line).min().unwrap_or(0);
                let last = match &m.content {
                    Some((brace, _)) => brace.span.close().end().line,
                    None => m.semi.as_ref().map_or(first, |s| s.span.end().line),
                };
                Some(last + 1 - first)
            }
            _ => None,
        })
        .sum();
    total - test_lines
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Each crate's name and its `src/` sources.
fn crates() -> Vec<(String, Sources)> {
    fn collect(dir: &Path, base: &Path, out: &mut Sources) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src dir").flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                collect(&p, base, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(base).expect("under src").to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read_to_string(&p).expect("read source"));
            }
        }
    }
    let mut dirs: Vec<_> =
        std::fs::read_dir(workspace_root().join("crates")).expect("crates/").flatten().map(|e| e.path()).collect();
    dirs.sort();
    dirs.into_iter()
        .filter(|d| d.join("src").is_dir())
        .map(|d| {
            let mut sources = Sources::new();
            collect(&d.join("src"), &d.join("src"), &mut sources);
            (d.file_name().expect("name").to_string_lossy().into_owned(), sources)
        })
        .collect()
}

#[test]
fn no_import_cycles_no_upward_imports_and_no_long_files() {
    let mut found_cycles: Vec<Vec<String>> = Vec::new();
    let mut long_files: Vec<(String, usize)> = Vec::new();
    let mut all_edges: Vec<(String, String)> = Vec::new();
    for (name, sources) in crates() {
        let prefix = |f: &str| format!("crates/{name}/src/{f}");
        let graph = import_graph(&sources).unwrap_or_else(|e| panic!("crate {name}: {e}"));
        found_cycles.extend(cycles(&graph).into_iter().map(|c| c.iter().map(|f| prefix(f)).collect()));
        all_edges.extend(graph.iter().flat_map(|(f, to)| to.iter().map(move |t| (prefix(f), prefix(t)))));
        let asts = parse_all(&sources).expect("parsed above");
        let (_, test_files) = modules(&sources, &asts);
        for (f, text) in &sources {
            let lines = counted_lines(text, &asts[f]);
            if !test_files.contains(f) && lines > MAX_LINES {
                long_files.push((prefix(f), lines));
            }
        }
    }
    for c in &found_cycles {
        eprintln!("import cycle among: {}", c.join(", "));
    }
    for (f, n) in &long_files {
        eprintln!("{n} lines (> {MAX_LINES}): {f}");
    }

    let known_cycles: BTreeSet<Vec<String>> = KNOWN_CYCLES
        .iter()
        .map(|c| c.iter().map(|f| f.to_string()).collect::<BTreeSet<_>>().into_iter().collect())
        .collect();
    let new_cycles: Vec<_> = found_cycles.iter().filter(|c| !known_cycles.contains(*c)).collect();
    let fixed_cycles: Vec<_> = known_cycles.iter().filter(|c| !found_cycles.contains(c)).collect();
    let known_long: BTreeSet<&str> = KNOWN_LONG_FILES.iter().copied().collect();
    let new_long: Vec<_> = long_files.iter().filter(|(f, _)| !known_long.contains(f.as_str())).collect();
    let fixed_long: Vec<_> = known_long.iter().filter(|f| !long_files.iter().any(|(l, _)| l == *f)).collect();

    let mut problems = Vec::new();
    for c in &new_cycles {
        let within: Vec<String> = c
            .iter()
            .flat_map(|from| {
                all_edges.iter().filter(move |(f, t)| f == from && c.contains(t)).map(|(f, t)| format!("{f} -> {t}"))
            })
            .collect();
        problems.push(format!("import cycle among files: {} (imports: {})", c.join(", "), within.join("; ")));
    }
    for (f, n) in &new_long {
        problems.push(format!("{f} has {n} lines outside its test module (at most {MAX_LINES})"));
    }
    for (from, to) in &all_edges {
        for (room, allowed) in TOP_ROOMS {
            if to.starts_with(room) && !allowed.iter().any(|a| from.starts_with(a)) {
                problems.push(format!("{from} imports {to}: nothing below {room} may import it"));
            }
        }
    }
    for (from, to) in all_edges.iter().filter(|(from, _)| from.starts_with(HANDLERS.0)) {
        if to.starts_with("crates/memwarden/src/") && !HANDLERS.1.iter().any(|a| to.starts_with(a)) {
            problems.push(format!("{from} imports {to}: handlers call only the application layer"));
        }
    }
    for c in &fixed_cycles {
        problems.push(format!("no longer a cycle, remove it from KNOWN_CYCLES: {}", c.join(", ")));
    }
    for f in &fixed_long {
        problems.push(format!("no longer over {MAX_LINES} lines, remove it from KNOWN_LONG_FILES: {f}"));
    }
    assert!(problems.is_empty(), "layout rules broken:\n  {}", problems.join("\n  "));
}

/// The most lines a function may have (signature to closing brace), outside [`LONG_FUNCTIONS`].
const MAX_FN_LINES: usize = 80;

/// Functions over [`MAX_FN_LINES`] today (`crate/src/file.rs::Type::name`, or `::name` for a
/// free function), each with why. The architecture step (issue 23) empties this list; an entry
/// that is no longer too long fails the test (remove it), so the list only shrinks.
const LONG_FUNCTIONS: &[(&str, &str)] = &[
    ("memwarden-core/src/tlsf.rs::Tlsf::validate", "one pass over every invariant, each a check and its message"),
    (
        "memwarden-sys/src/vulkan/device.rs::VulkanDevice::open",
        "Vulkan's instance and device creation, one builder chain",
    ),
    ("memwarden/src/cli/mod.rs::::run", "the CLI's one match over its commands"),
];

/// The most files a type's inherent `impl` blocks may be spread over, outside [`SPREAD_TYPES`].
const MAX_IMPL_FILES: usize = 2;

/// Types whose inherent `impl` blocks are spread over more than [`MAX_IMPL_FILES`] files today
/// (`crate::Type`), each with why: one object split across files by size, not by
/// responsibility. The architecture step (issue 23: `Service` split by responsibility) empties
/// this list; it only shrinks.
const SPREAD_TYPES: &[(&str, &str)] =
    &[("memwarden-sys::VulkanDevice", "one device's raw calls, split by concern (external memory, heaps, transfer)")];

/// Every function (free, inherent or trait method with a body) outside `#[cfg(test)]` modules,
/// with its lines; and every inherent `impl` block's type, with its file.
#[derive(Default)]
struct Shapes {
    file: String,
    owner: Vec<String>,
    functions: Vec<(String, usize)>,
    impls: Vec<(String, String)>,
}

impl Shapes {
    fn function(&mut self, name: &syn::Ident, attrs_start: usize, end: usize) {
        let owner = self.owner.last().cloned().unwrap_or_default();
        self.functions.push((format!("{}::{owner}::{name}", self.file), end + 1 - attrs_start));
    }
}

fn type_name(ty: &syn::Type) -> Option<String> {
    match ty {
        syn::Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    }
}

impl<'ast> Visit<'ast> for Shapes {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_cfg(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.function(&f.sig.ident, f.sig.fn_token.span.start().line, f.block.brace_token.span.close().end().line);
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        let name = type_name(&i.self_ty).unwrap_or_default();
        if i.trait_.is_none() {
            self.impls.push((name.clone(), self.file.clone()));
        }
        self.owner.push(name);
        syn::visit::visit_item_impl(self, i);
        self.owner.pop();
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.function(&f.sig.ident, f.sig.fn_token.span.start().line, f.block.brace_token.span.close().end().line);
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.function(&f.sig.ident, f.sig.fn_token.span.start().line, block.brace_token.span.close().end().line);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

/// Per type (`crate::Type`), the files its inherent `impl` blocks are in.
type ImplFiles = BTreeMap<String, BTreeSet<String>>;

/// Each crate's functions with their lines, and its types with the files their inherent `impl`
/// blocks are in (test modules and test files left out).
fn shapes() -> (Vec<(String, usize)>, ImplFiles) {
    let (mut functions, mut spread) = (Vec::new(), ImplFiles::new());
    for (name, sources) in crates() {
        let asts = parse_all(&sources).expect("parsed");
        let (_, test_files) = modules(&sources, &asts);
        for (f, ast) in asts.iter().filter(|(f, _)| !test_files.contains(*f)) {
            let mut v = Shapes { file: format!("{name}/src/{f}"), ..Shapes::default() };
            v.visit_file(ast);
            functions.extend(v.functions);
            for (ty, file) in v.impls {
                spread.entry(format!("{name}::{ty}")).or_default().insert(file);
            }
        }
    }
    (functions, spread)
}

/// An allowlist that only shrinks: entries over the limit must be listed; listed entries must
/// still be over it.
fn only_shrinks(what: &str, over: &BTreeMap<String, String>, allowed: &[(&str, &str)], list: &str) -> Vec<String> {
    let allowed: BTreeMap<&str, &str> = allowed.iter().copied().collect();
    let mut problems = Vec::new();
    for (key, detail) in over {
        if !allowed.contains_key(key.as_str()) {
            problems.push(format!("{what}: {key} ({detail})"));
        }
    }
    for key in allowed.keys().filter(|k| !over.contains_key(**k)) {
        problems.push(format!("no longer {what}, remove it from {list}: {key}"));
    }
    problems
}

#[test]
fn short_functions_and_types_in_at_most_two_files() {
    let (functions, spread) = shapes();
    let long: BTreeMap<String, String> = functions
        .into_iter()
        .filter(|(_, n)| *n > MAX_FN_LINES)
        .map(|(f, n)| (f, format!("{n} lines > {MAX_FN_LINES}")))
        .collect();
    let wide: BTreeMap<String, String> = spread
        .into_iter()
        .filter(|(_, files)| files.len() > MAX_IMPL_FILES)
        .map(|(ty, files)| {
            (ty, format!("impl blocks in {} files: {}", files.len(), files.into_iter().collect::<Vec<_>>().join(", ")))
        })
        .collect();
    for (f, d) in long.iter().chain(&wide) {
        eprintln!("{f}: {d}");
    }
    let mut problems = only_shrinks("a function over the limit", &long, LONG_FUNCTIONS, "LONG_FUNCTIONS");
    problems.extend(only_shrinks("a type spread over too many files", &wide, SPREAD_TYPES, "SPREAD_TYPES"));
    assert!(problems.is_empty(), "layout rules broken:\n  {}", problems.join("\n  "));
}

/// The types that derive `ToSchema` in `asts`, with their files: a type's name is its schema's
/// name in the OpenAPI document, where a second type of the same name silently replaces the
/// first (as analytics' `DefragDto` once replaced the defragmentation run's).
fn schema_types(asts: &BTreeMap<String, syn::File>) -> Vec<(String, String)> {
    struct Finder<'f> {
        file: &'f str,
        out: Vec<(String, String)>,
    }
    impl<'ast> Visit<'ast> for Finder<'_> {
        fn visit_item_struct(&mut self, s: &'ast syn::ItemStruct) {
            self.check(&s.attrs, &s.ident);
        }
        fn visit_item_enum(&mut self, e: &'ast syn::ItemEnum) {
            self.check(&e.attrs, &e.ident);
        }
    }
    impl Finder<'_> {
        fn check(&mut self, attrs: &[syn::Attribute], ident: &syn::Ident) {
            let derives_schema = attrs.iter().filter(|a| a.path().is_ident("derive")).any(|a| {
                a.meta
                    .require_list()
                    .is_ok_and(|l| l.tokens.to_string().split(',').any(|t| t.trim().ends_with("ToSchema")))
            });
            if derives_schema {
                self.out.push((ident.to_string(), self.file.to_string()));
            }
        }
    }
    let mut out = Vec::new();
    for (file, ast) in asts {
        let mut f = Finder { file, out: Vec::new() };
        f.visit_file(ast);
        out.extend(f.out);
    }
    out
}

#[test]
fn every_schema_type_has_its_own_name() {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, sources) in crates() {
        let asts = parse_all(&sources).expect("parse");
        for (ty, file) in schema_types(&asts) {
            seen.entry(ty).or_default().push(format!("crates/{name}/src/{file}"));
        }
    }
    assert!(seen.len() > 50, "the API's types were not found: {seen:?}");
    let shared: Vec<String> = seen
        .iter()
        .filter(|(_, files)| files.len() > 1)
        .map(|(ty, files)| format!("{ty}: {}", files.join(", ")))
        .collect();
    assert!(shared.is_empty(), "schema names used by more than one type:\n  {}", shared.join("\n  "));
}

#[cfg(test)]
mod resolver {
    use super::*;

    fn sources(files: &[(&str, &str)]) -> Sources {
        files.iter().map(|(f, t)| (f.to_string(), t.to_string())).collect()
    }

    fn edges(graph: &Graph, file: &str) -> Vec<String> {
        graph.get(file).map(|e| e.iter().cloned().collect()).unwrap_or_default()
    }

    #[test]
    fn a_two_file_cycle_is_found() {
        let s = sources(&[
            ("lib.rs", "mod a;\nmod b;\n"),
            ("a.rs", "use crate::b::B;\npub struct A;\n"),
            ("b.rs", "pub struct B;\npub fn f() -> usize { std::mem::size_of::<crate::a::A>() }\n"),
        ]);
        let g = import_graph(&s).expect("parses");
        assert_eq!(edges(&g, "a.rs"), ["b.rs"]);
        assert_eq!(edges(&g, "b.rs"), ["a.rs"]);
        assert_eq!(cycles(&g), [vec!["a.rs".to_string(), "b.rs".to_string()]]);
    }

    #[test]
    fn a_mod_declaration_is_not_an_edge() {
        let s = sources(&[
            ("lib.rs", "pub mod service;\n"),
            ("service/mod.rs", "mod device;\npub struct Service;\n"),
            ("service/device.rs", "use super::Service;\n"),
        ]);
        let g = import_graph(&s).expect("parses");
        assert!(edges(&g, "lib.rs").is_empty(), "{g:?}");
        assert!(edges(&g, "service/mod.rs").is_empty(), "{g:?}");
        assert_eq!(edges(&g, "service/device.rs"), ["service/mod.rs"], "a child using its parent is an edge");
        assert!(cycles(&g).is_empty());
    }

    #[test]
    fn paths_resolve_to_the_file_of_the_longest_module_prefix() {
        let s = sources(&[
            ("lib.rs", "pub mod service;\npub mod api;\npub mod analytics;\n"),
            ("service/mod.rs", "pub mod device;\npub struct Service;\n"),
            ("service/device.rs", "pub enum Fit {}\n"),
            ("api/mod.rs", "pub mod envelope;\npub mod models;\n"),
            ("api/envelope.rs", "pub fn rfc3339() {}\n"),
            (
                "api/models.rs",
                "use crate::service::Service;\nfn f() { super::envelope::rfc3339(); \
                 let _ = format!(\"{}\", crate::analytics::model_bytes_on(1)); }\n",
            ),
            ("analytics.rs", "use crate::service::device::Fit;\npub fn model_bytes_on(_: u8) -> u8 { 0 }\n"),
        ]);
        let g = import_graph(&s).expect("parses");
        assert_eq!(edges(&g, "api/models.rs"), ["analytics.rs", "api/envelope.rs", "service/mod.rs"]);
        assert_eq!(edges(&g, "analytics.rs"), ["service/device.rs"]);
    }

    #[test]
    fn test_modules_are_ignored_for_imports_and_lines() {
        let s = sources(&[
            ("lib.rs", "mod a;\nmod b;\n"),
            ("a.rs", "pub struct A;\n#[cfg(test)]\nmod tests {\n    use crate::b::B;\n}\n"),
            ("b.rs", "use crate::a::A;\npub struct B;\n#[cfg(test)]\nmod tests;\n"),
            ("b/tests.rs", "use crate::a::A;\n"),
        ]);
        let g = import_graph(&s).expect("parses");
        assert!(edges(&g, "a.rs").is_empty(), "{g:?}");
        assert!(!g.contains_key("b/tests.rs"), "{g:?}");
        let asts = parse_all(&s).expect("parses");
        assert_eq!(counted_lines(&s["a.rs"], &asts["a.rs"]), 1);
        assert_eq!(counted_lines(&s["b.rs"], &asts["b.rs"]), 2);
        assert_eq!(modules(&s, &asts).1, BTreeSet::from(["b/tests.rs".to_string()]));
    }

    #[test]
    fn a_bare_child_module_path_is_not_an_edge() {
        let s = sources(&[
            (
                "lib.rs",
                "mod metrics;
pub use self::metrics::G;
pub fn f() { metrics::g(); }
",
            ),
            (
                "metrics.rs",
                "pub struct G;
pub fn g() {}
",
            ),
        ]);
        let g = import_graph(&s).expect("parses");
        assert_eq!(edges(&g, "lib.rs"), ["metrics.rs"], "only the `self::` path is an edge");
    }
}
