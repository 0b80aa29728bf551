//! The layering ARCHITECTURE.md promises, checked on the module graph of
//! `host/src`.
//!
//! Every top-level module of the crate (each `mod` in `host/src/lib.rs`, plus
//! the binary `main.rs`) sits in one layer of [`LAYERS`], bottom to top. A
//! module may use modules of lower layers only: `supervisor`, `wasm` and
//! `native` share `backend` and never use each other, the front ends (`cli`,
//! `serve`) sit on top, and nothing below them reaches up. An edge against
//! the order is an error unless [`ALLOWED`] lists it with its reason; the
//! graph without those edges must also have no cycle (a cycle is reported
//! as such, since no order of the table could hold it). To see the graph:
//! `cargo test -p embedhost --test all layering::print_module_graph --
//! --ignored --nocapture`.
//!
//! Why a scanner and not `grep crate::wasm`: a dependency is any path that
//! lands in another module, however it is written: grouped and nested
//! imports (`use crate::{wasm, native::X}` over several lines),
//! `super::super::wasm` climbing out of a module, `$crate::` in macros, and
//! paths in types, expressions and trait impls
//! (`impl From<crate::supervisor::SupervisorError> for RemoteError`). The
//! scanner tokenizes each file (comments, strings and char literals
//! dropped), follows inline `mod x { .. }` blocks, and resolves every path
//! that starts with `crate`, `super`, `self` (or `embedhost` in `main.rs`)
//! to the top-level module it lands in. It does not resolve bare paths
//! brought in by a `use` (the `use` itself is the edge), items re-exported
//! at the crate root (`lib.rs` has none), nor `#[path]` modules other than
//! `*_tests.rs` (a test says so if one appears).
//!
//! Files named `*_tests.rs` and `test_support.rs` are tests: edges from
//! them are not counted, and nothing counts as depending on `test_support`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The top-level modules, bottom layer first. A module may use modules of
/// lower layers only; modules of one layer may not use each other (unless
/// [`ALLOWED`] says so). To add or move a module, edit this table.
const LAYERS: &[&[&str]] = &[
    // Leaves: timeouts and limits, guards on untrusted text, the generated
    // plugin bytes (`lib.rs`'s `plugins`), where the native deps live,
    // atomic writes and hashing, where a model's tokens are.
    &["limits", "untrusted", "plugins", "deps", "files", "tokens"],
    // The allocator's settings; vector maths; the model store.
    &["memory", "vectors", "model"],
    // The typed message bus (`BoxFuture`, `RemoteError` come from here).
    &["bus"],
    // The backend contract.
    &["backend"],
    // The message catalogue.
    &["messages"],
    // The users of the backend contract: never each other.
    &["supervisor", "wasm", "native"],
    // `embedhost.toml`, then the ceilings checked on it.
    &["config"],
    &["ceilings"],
    // Starting the configured pool (shared by the CLI and the service).
    &["launch"],
    // The front door every caller embeds through, and its bus peer.
    &["embedder"],
    // Its callers inside the host: the indexing worker, the conformance
    // suite; then the fuzz entry points.
    &["worker", "conformance"],
    &["fuzzing"],
    // The front ends: `cli` may find a running service through `serve`,
    // `serve` never uses `cli`.
    &["serve"],
    &["cli"],
    // The binary.
    &["main"],
];

/// Edges that go against [`LAYERS`] and are accepted until fixed:
/// `(from, to, why)`. A test fails on an entry the code no longer needs.
/// Keep this short: each entry is a known defect of the layering.
const ALLOWED: &[(&str, &str, &str)] = &[(
    "config",
    "ceilings",
    "Config::parse refuses a value past its ceiling (config.rs, \
         `crate::ceilings::first_past`), while ceilings.rs reads Config's \
         fields: a cycle inside ARCHITECTURE's one `config` part. Fix: call \
         the check from the callers of parse, or merge the two modules.",
)];

/// Modules that exist for tests only: no edge to them is counted.
const TEST_ONLY_MODULES: &[&str] = &["test_support"];

/// Whether the file at `path` is test code (edges from it are not counted).
fn is_test_file(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.ends_with("_tests.rs") || name == "test_support.rs"
}

// ---------------------------------------------------------------- tokens

/// One token of Rust source, with comments and literals' contents gone.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Sep,
    Punct(char),
    /// A string, byte string, raw string or char literal; strings keep
    /// their raw text (for `#[path = "..."]`).
    Lit(String),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

/// The tokens of `src`, with comments (nested block comments too),
/// string, raw-string and char literals reduced to [`Tok::Lit`].
fn tokenize(src: &str) -> Vec<Token> {
    let s: Vec<char> = src.chars().collect();
    let mut lx = Lexer { s, i: 0, line: 1 };
    let mut out = Vec::new();
    while let Some(&c) = lx.s.get(lx.i) {
        let line = lx.line;
        let next = lx.s.get(lx.i + 1).copied();
        let tok = if c == '\n' {
            lx.line += 1;
            lx.i += 1;
            None
        } else if c.is_whitespace() {
            lx.i += 1;
            None
        } else if c == '/' && next == Some('/') {
            while lx.s.get(lx.i).is_some_and(|&c| c != '\n') {
                lx.i += 1;
            }
            None
        } else if c == '/' && next == Some('*') {
            lx.block_comment();
            None
        } else if c == '"' {
            lx.i += 1;
            Some(Tok::Lit(lx.string()))
        } else if c == '\'' {
            Some(lx.quote())
        } else if c.is_alphanumeric() || c == '_' {
            Some(lx.word())
        } else if c == ':' && next == Some(':') {
            lx.i += 2;
            Some(Tok::Sep)
        } else {
            lx.i += 1;
            Some(Tok::Punct(c))
        };
        out.extend(tok.map(|tok| Token { tok, line }));
    }
    out
}

struct Lexer {
    s: Vec<char>,
    i: usize,
    line: usize,
}

impl Lexer {
    fn at(&self, i: usize) -> Option<char> {
        self.s.get(i).copied()
    }

    /// Skips one char, counting lines.
    fn bump(&mut self) {
        if self.at(self.i) == Some('\n') {
            self.line += 1;
        }
        self.i += 1;
    }

    /// Skips `/* .. */`, nested ones included.
    fn block_comment(&mut self) {
        let mut depth = 0;
        while let Some(c) = self.at(self.i) {
            let next = self.at(self.i + 1);
            if c == '/' && next == Some('*') {
                depth += 1;
                self.i += 2;
            } else if c == '*' && next == Some('/') {
                depth -= 1;
                self.i += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.bump();
            }
        }
    }

    /// The rest of a `"` string (after the opening quote), escapes skipped.
    fn string(&mut self) -> String {
        let start = self.i;
        while let Some(c) = self.at(self.i) {
            if c == '"' {
                break;
            }
            if c == '\\' {
                self.bump();
            }
            self.bump();
        }
        let text = self.s[start..self.i.min(self.s.len())].iter().collect();
        self.i += 1;
        text
    }

    /// A raw string from its first `#` or `"` (after the `r`/`br`/`cr`).
    fn raw_string(&mut self) -> String {
        let mut hashes = 0;
        while self.at(self.i) == Some('#') {
            hashes += 1;
            self.i += 1;
        }
        self.i += 1; // the opening quote
        let start = self.i;
        while self.i < self.s.len() {
            let closes = self.at(self.i) == Some('"')
                && (1..=hashes).all(|k| self.at(self.i + k) == Some('#'));
            if closes {
                let text = self.s[start..self.i].iter().collect();
                self.i += 1 + hashes;
                return text;
            }
            self.bump();
        }
        String::new()
    }

    /// A char literal (`'x'`, `'\n'`, `'\u{1F600}'`) or a lifetime's quote.
    fn quote(&mut self) -> Tok {
        if self.at(self.i + 1) == Some('\\') {
            self.i += 3; // quote, backslash, escaped char
            while self.at(self.i).is_some_and(|c| c != '\'') {
                self.bump();
            }
            self.i += 1;
            Tok::Lit(String::new())
        } else if self.at(self.i + 2) == Some('\'') {
            self.i += 3;
            Tok::Lit(String::new())
        } else {
            self.i += 1; // a lifetime or label: its name follows
            Tok::Punct('\'')
        }
    }

    /// An identifier, keyword or number, or a literal that starts like one
    /// (`r"..."`, `r#"..."#`, `b"..."`, `b'x'`, `c"..."`) or a raw
    /// identifier (`r#type`).
    fn word(&mut self) -> Tok {
        let start = self.i;
        while self
            .at(self.i)
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            self.i += 1;
        }
        let word: String = self.s[start..self.i].iter().collect();
        let (next, after) = (self.at(self.i), self.at(self.i + 1));
        let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
        if raw_prefix
            && (next == Some('"') || (next == Some('#') && matches!(after, Some('"' | '#'))))
        {
            return Tok::Lit(self.raw_string());
        }
        if matches!(word.as_str(), "b" | "c") && next == Some('"') {
            self.i += 1;
            return Tok::Lit(self.string());
        }
        if word == "b" && next == Some('\'') {
            return self.quote();
        }
        if word == "r" && next == Some('#') {
            self.i += 1;
            return match self.word() {
                Tok::Ident(name) => Tok::Ident(format!("r#{name}")),
                other => other,
            };
        }
        Tok::Ident(word)
    }
}

// ---------------------------------------------------------------- paths

/// One path that starts at the crate root or climbs with `super`, resolved.
#[derive(Debug, Clone, PartialEq)]
struct Reference {
    /// The line of the segment that names the top-level module (else of
    /// the path's first token).
    line: usize,
    /// The path as written, groups flattened (`crate::wasm::Engine`).
    written: String,
    /// The absolute module path it lands in (`["wasm", "Engine"]`).
    target: Vec<String>,
}

/// Every crate-rooted or `super`/`self` path in `tokens`, resolved against
/// `module`, the module path of the file (`["serve", "tei"]`). `aliases`
/// are other names of the crate root (`embedhost` in `main.rs`).
fn references(tokens: &[Token], module: &[String], aliases: &[&str]) -> Vec<Reference> {
    let mut out = Vec::new();
    // Inline `mod name { .. }` blocks open here: (name, brace depth inside).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    // Tokens up to here belong to a path already followed.
    let mut followed = 0;
    for (i, t) in tokens.iter().enumerate() {
        if i < followed {
            continue;
        }
        let ident = |k: usize| match tokens.get(k).map(|t| &t.tok) {
            Some(Tok::Ident(w)) => Some(w.as_str()),
            _ => None,
        };
        let tok_at = |k: usize| tokens.get(k).map(|t| &t.tok);
        match &t.tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if inline.last().is_some_and(|&(_, d)| d == depth) {
                    inline.pop();
                }
                depth -= 1;
            }
            Tok::Ident(w) if w == "mod" => {
                if let (Some(name), Some(Tok::Punct('{'))) = (ident(i + 1), tok_at(i + 2)) {
                    inline.push((name.to_string(), depth + 1));
                }
            }
            Tok::Ident(w) => {
                let starts = tok_at(i + 1) == Some(&Tok::Sep)
                    && (i == 0 || tok_at(i - 1) != Some(&Tok::Sep));
                if !starts {
                    continue;
                }
                if aliases.contains(&w.as_str()) {
                    let from = Walk {
                        abs: Vec::new(),
                        written: format!("{w}::"),
                        top_line: None,
                    };
                    followed = walk(tokens, i + 2, from, t.line, &mut out);
                } else if matches!(w.as_str(), "crate" | "super" | "self") {
                    let here = module.iter().cloned();
                    let from = Walk {
                        abs: here.chain(inline.iter().map(|(n, _)| n.clone())).collect(),
                        written: String::new(),
                        top_line: None,
                    };
                    followed = walk(tokens, i, from, t.line, &mut out);
                }
            }
            _ => {}
        }
    }
    out
}

/// The state of a path being followed: where it is so far.
#[derive(Clone)]
struct Walk {
    abs: Vec<String>,
    written: String,
    top_line: Option<usize>,
}

/// Follows the path or use tree at `tokens[i]`, pushing one [`Reference`]
/// per leaf (a group `{a, b::c}` has several); returns the index after it.
fn walk(
    tokens: &[Token],
    mut i: usize,
    mut at: Walk,
    start_line: usize,
    out: &mut Vec<Reference>,
) -> usize {
    let tok = |k: usize| tokens.get(k).map(|t| &t.tok);
    loop {
        match tok(i) {
            Some(Tok::Ident(seg)) => {
                match seg.as_str() {
                    "crate" => at.abs.clear(),
                    "super" => drop(at.abs.pop()),
                    "self" => {}
                    name => at.abs.push(name.trim_start_matches("r#").to_string()),
                }
                if at.abs.is_empty() {
                    at.top_line = None;
                } else if at.abs.len() == 1 && !matches!(seg.as_str(), "super" | "self") {
                    at.top_line = Some(tokens[i].line);
                }
                at.written.push_str(seg);
                i += 1;
                if tok(i) != Some(&Tok::Sep) {
                    break;
                }
                at.written.push_str("::");
                i += 1;
            }
            Some(Tok::Punct('{')) => return walk_group(tokens, i + 1, &at, out),
            Some(Tok::Punct('*')) => {
                at.written.push('*');
                i += 1;
                break;
            }
            _ => break, // `<` of a turbofish, or the end of the path
        }
    }
    let written = at.written.trim_end_matches("::").to_string();
    out.push(Reference {
        line: at.top_line.unwrap_or(start_line),
        written,
        target: at.abs,
    });
    i
}

/// Follows each member of a `{ .. }` group (from after its `{`); returns
/// the index after its `}`.
fn walk_group(tokens: &[Token], mut i: usize, at: &Walk, out: &mut Vec<Reference>) -> usize {
    let tok = |k: usize| tokens.get(k).map(|t| &t.tok);
    while let Some(t) = tok(i) {
        if *t == Tok::Punct('}') {
            return i + 1;
        }
        let member_line = tokens[i].line;
        let before = i;
        i = walk(tokens, i, at.clone(), member_line, out);
        // Skip `as name`, then the `,`.
        while tok(i).is_some_and(|t| *t != Tok::Punct(',') && *t != Tok::Punct('}')) {
            i += 1;
        }
        if tok(i) == Some(&Tok::Punct(',')) {
            i += 1;
        }
        if i == before {
            i += 1; // never loop on a token `walk` does not take
        }
    }
    i
}

// ---------------------------------------------------------------- graph

/// Where one edge is made: the file, the line, the path as written.
#[derive(Debug, Clone)]
struct Site {
    file: String,
    line: usize,
    written: String,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: `{}`", self.file, self.line, self.written)
    }
}

/// Edges between top-level modules (`from` → `to`), with every site.
type Graph = BTreeMap<(String, String), Vec<Site>>;

/// `host/src`.
fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The module path of a file under `src`: `lib.rs` is the root `[]`,
/// `foo.rs` and `foo/mod.rs` are `["foo"]`, `foo/bar.rs` is
/// `["foo", "bar"]`, and the binary `main.rs` is `["main"]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") || parts == ["lib"] {
        parts.pop();
    }
    parts
}

/// The top-level modules: each `mod` at the top of `lib.rs`, and `main`.
fn declared_modules(src: &Path) -> BTreeSet<String> {
    let tokens = tokenize(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut modules = BTreeSet::from(["main".to_string()]);
    let mut depth = 0;
    for (i, t) in tokens.iter().enumerate() {
        match &t.tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => depth -= 1,
            Tok::Ident(w) if w == "mod" && depth == 0 => {
                if let Some(Token {
                    tok: Tok::Ident(name),
                    ..
                }) = tokens.get(i + 1)
                {
                    modules.insert(name.clone());
                }
            }
            _ => {}
        }
    }
    modules
}

/// The graph of the crate at `src`: every reference from one top-level
/// module into another (test files and test-only modules left out).
fn module_graph(src: &Path) -> Graph {
    let modules = declared_modules(src);
    let mut graph = Graph::new();
    for file in rust_files(src) {
        let module = module_path(src, &file);
        let Some(from) = module.first().cloned() else {
            continue; // lib.rs's own items: the root declares every module
        };
        if is_test_file(&file) || TEST_ONLY_MODULES.contains(&from.as_str()) {
            continue;
        }
        let aliases: &[&str] = if from == "main" { &["embedhost"] } else { &[] };
        let tokens = tokenize(&std::fs::read_to_string(&file).unwrap());
        let shown = file
            .strip_prefix(src.parent().unwrap().parent().unwrap())
            .unwrap_or(&file);
        for r in references(&tokens, &module, aliases) {
            let Some(to) = r.target.first().filter(|to| modules.contains(*to)) else {
                continue; // an item of the root, or a path that stays at it
            };
            if *to == from || TEST_ONLY_MODULES.contains(&to.as_str()) {
                continue;
            }
            let site = Site {
                file: shown.display().to_string(),
                line: r.line,
                written: r.written,
            };
            graph
                .entry((from.clone(), to.clone()))
                .or_default()
                .push(site);
        }
    }
    graph
}

/// Each module's layer, counted from the bottom (0).
fn layer_of() -> BTreeMap<&'static str, usize> {
    let mut layer = BTreeMap::new();
    for (n, modules) in LAYERS.iter().enumerate() {
        for m in *modules {
            layer.insert(*m, n);
        }
    }
    layer
}

/// The first cycle found in `graph`, as its modules in order, if any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in graph.keys() {
        next.entry(from.as_str()).or_default().push(to.as_str());
    }
    // Depth first; `path` is the chain being explored, `done` the modules
    // proven to reach no cycle.
    fn visit<'a>(
        m: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| *p == m) {
            let mut cycle: Vec<String> = path[at..].iter().map(|s| s.to_string()).collect();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m);
        for n in next.get(m).into_iter().flatten() {
            if let Some(cycle) = visit(n, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(m);
        None
    }
    let mut done = BTreeSet::new();
    let starts: Vec<&str> = next.keys().copied().collect();
    starts
        .into_iter()
        .find_map(|m| visit(m, &next, &mut Vec::new(), &mut done))
}

// ---------------------------------------------------------------- checks

#[test]
fn every_module_is_in_exactly_one_layer() {
    let declared = declared_modules(&src_dir());
    let mut listed = BTreeSet::new();
    let mut problems = Vec::new();
    for m in LAYERS.iter().flat_map(|l| l.iter()) {
        if !listed.insert(m.to_string()) {
            problems.push(format!("`{m}` is in LAYERS twice; keep one"));
        }
        if !declared.contains(*m) {
            problems.push(format!(
                "`{m}` is in LAYERS but is no module of host/src/lib.rs; remove it"
            ));
        }
    }
    for m in &declared {
        if !listed.contains(m) && !TEST_ONLY_MODULES.contains(&m.as_str()) {
            problems.push(format!(
                "module `{m}` (host/src/lib.rs) has no layer: add it to LAYERS in tests/all/layering.rs, \
                 above every module it uses and below every module that uses it"
            ));
        }
    }
    for (from, to, why) in ALLOWED {
        if !listed.contains(*from) || !listed.contains(*to) || why.trim().is_empty() {
            problems.push(format!(
                "ALLOWED entry ({from}, {to}) names an unknown module or gives no reason"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_edge_goes_down_the_layers() {
    let graph = module_graph(&src_dir());
    let layer = layer_of();
    let mut problems = Vec::new();
    for ((from, to), sites) in &graph {
        let allowed = ALLOWED.iter().any(|(f, t, _)| f == from && t == to);
        let (Some(&lf), Some(&lt)) = (layer.get(from.as_str()), layer.get(to.as_str())) else {
            continue; // `every_module_is_in_exactly_one_layer` reports it
        };
        if lt < lf || allowed {
            continue;
        }
        let how = if lt == lf {
            "the same layer as"
        } else {
            "a layer above"
        };
        let mut msg = format!("`{from}` (layer {lf}) uses `{to}` (layer {lt}), {how} it:\n");
        for site in sites {
            writeln!(msg, "  {site}").unwrap();
        }
        write!(
            msg,
            "  Fix: remove the dependency (move what `{from}` needs from `{to}` down to `{from}` or below); \
             or, if the design changed, move `{to}` below `{from}` in LAYERS (tests/all/layering.rs); \
             or add (\"{from}\", \"{to}\", \"<why>\") to ALLOWED there."
        )
        .unwrap();
        problems.push(msg);
    }
    for (from, to, _) in ALLOWED {
        if !graph.contains_key(&(from.to_string(), to.to_string())) {
            problems.push(format!(
                "ALLOWED lists {from} -> {to}, which the code no longer has: remove the entry"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    // Apart from the edges ALLOWED excuses: each of those that closes a
    // cycle says so in its reason. A cycle here means no order of LAYERS
    // can pass `every_edge_goes_down_the_layers`.
    let mut graph = module_graph(&src_dir());
    graph.retain(|(from, to), _| !ALLOWED.iter().any(|(f, t, _)| f == from && t == to));
    if let Some(cycle) = find_cycle(&graph) {
        let mut msg = format!(
            "the modules depend on each other in a circle: {}\n",
            cycle.join(" -> ")
        );
        for pair in cycle.windows(2) {
            let site = &graph[&(pair[0].clone(), pair[1].clone())][0];
            writeln!(msg, "  {} -> {}: {site}", pair[0], pair[1]).unwrap();
        }
        msg.push_str(
            "  Fix: break one of these edges (no order of LAYERS can hold a circle), \
             or, for a known defect, add its backward edge to ALLOWED with the reason.",
        );
        panic!("{msg}");
    }
}

#[test]
fn only_test_files_are_included_by_path() {
    // The scanner gives a file the module path its place implies; a
    // `#[path]` module elsewhere would be resolved wrongly.
    let src = src_dir();
    for file in rust_files(&src) {
        let tokens = tokenize(&std::fs::read_to_string(&file).unwrap());
        for w in tokens.windows(3) {
            if let [
                Token {
                    tok: Tok::Ident(attr),
                    ..
                },
                Token {
                    tok: Tok::Punct('='),
                    ..
                },
                Token {
                    tok: Tok::Lit(target),
                    line,
                },
            ] = w
            {
                assert!(
                    attr != "path" || target.ends_with("_tests.rs"),
                    "{}:{line}: `#[path = \"{target}\"]`: layering.rs resolves `super` by file \
                     place and does not follow #[path]; teach it, or name the file *_tests.rs if it is a test",
                    file.display()
                );
            }
        }
    }
}

/// Prints the graph, each edge with one of its sites (see the module doc).
#[test]
#[ignore]
fn print_module_graph() {
    for ((from, to), sites) in module_graph(&src_dir()) {
        println!("{from} -> {to} ({} uses, e.g. {})", sites.len(), sites[0]);
    }
}

// ---------------------------------------------------------------- the scanner's own tests

/// `(top-level module, line)` of every reference in `src`, read as the
/// file with module path `module`.
fn tops(src: &str, module: &[&str]) -> Vec<(String, usize)> {
    let module: Vec<String> = module.iter().map(|s| s.to_string()).collect();
    references(&tokenize(src), &module, &[])
        .into_iter()
        .filter_map(|r| Some((r.target.first()?.clone(), r.line)))
        .collect()
}

fn names(src: &str, module: &[&str]) -> Vec<String> {
    tops(src, module).into_iter().map(|(m, _)| m).collect()
}

#[test]
fn scanner_reads_grouped_and_nested_uses() {
    assert_eq!(
        names("use crate::{wasm, native::X};", &["worker"]),
        ["wasm", "native"]
    );
    assert_eq!(
        names(
            "use crate::{bus::{transport::{child::A, mock}, envelope}, serve::{self as s}};",
            &["x"]
        ),
        ["bus", "bus", "bus", "serve"]
    );
    assert_eq!(
        names("use crate::wasm::{self, Engine};", &["x"]),
        ["wasm", "wasm"]
    );
    assert_eq!(
        names("pub(crate) use crate::*; pub(crate) fn f() {}", &["x"]),
        Vec::<String>::new()
    );
}

#[test]
fn scanner_gives_the_line_of_each_member_of_a_multi_line_group() {
    let src = "use std::io;\nuse crate::{\n    limits,\n    supervisor::Supervisor,\n};\n";
    assert_eq!(
        tops(src, &["wasm"]),
        [("limits".to_string(), 3), ("supervisor".to_string(), 4)]
    );
}

#[test]
fn scanner_resolves_super_against_the_file_and_inline_modules() {
    // From host/src/serve/x.rs, `super::super` is the crate root.
    assert_eq!(
        names("use super::super::wasm::Y;", &["serve", "x"]),
        ["wasm"]
    );
    assert_eq!(
        names("use super::{super::wasm, routes};", &["serve", "x"]),
        ["wasm", "serve"]
    );
    assert_eq!(
        names("fn f() { super::bus::send(); }", &["worker"]),
        ["bus"]
    );
    // Inside `mod tests { .. }` of host/src/limits.rs, `super` is `limits`.
    let src =
        "mod tests {\n    use super::*;\n    use super::super::memory;\n}\nuse super::vectors;";
    assert_eq!(names(src, &["limits"]), ["limits", "memory", "vectors"]);
    assert_eq!(names("use self::inner::X; mod inner {}", &["bus"]), ["bus"]);
}

#[test]
fn scanner_finds_paths_in_types_expressions_and_impls() {
    assert_eq!(
        names(
            "impl From<crate::supervisor::SupervisorError> for RemoteError {}",
            &["bus", "error"]
        ),
        ["supervisor"]
    );
    assert_eq!(
        names("impl Trait for crate::serve::X {}", &["bus"]),
        ["serve"]
    );
    assert_eq!(
        names("let n = crate::a::f(1) + crate::b::C;", &["x"]),
        ["a", "b"]
    );
    assert_eq!(names("let v = crate::a::Vec::<u8>::new();", &["x"]), ["a"]);
    assert_eq!(
        names("macro_rules! m { () => { $crate::limits::X } }", &["x"]),
        ["limits"]
    );
    // The binary reaches the library by its name.
    let r = references(
        &tokenize("embedhost::cli::main()"),
        &["main".into()],
        &["embedhost"],
    );
    assert_eq!(r[0].target, ["cli", "main"]);
    assert_eq!(r[0].written, "embedhost::cli::main");
}

#[test]
fn scanner_ignores_comments_and_literals() {
    let src = r##"
        // use crate::wasm;
        /* crate::native /* nested */ crate::serve */
        /// [`crate::cli`]
        let s = "crate::supervisor \" crate::bus";
        let r = r#"crate::worker " crate::model"#;
        let b = b"crate::config";
        let c = '"'; let d = '\''; let e: &'static str = "x";
        let f = br"crate::launch";
        let r#type = crate::limits::X;
    "##;
    assert_eq!(tops(src, &["x"]), [("limits".to_string(), 10)]);
}

#[test]
fn scanner_ignores_visibility_and_method_receivers() {
    let src =
        "pub(crate) fn f(&self) { self.x(); } pub(super) struct S; pub(in crate::bus) fn g() {}";
    assert_eq!(names(src, &["wasm", "a"]), ["bus"]);
}
