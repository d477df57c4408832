//! Analysis of the `.drv` graph: which targets a target depends on, through
//! any number of derivations that are not targets themselves.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::mpsc::Sender;

use anyhow::{Context, Result};
use nix_derivation::Derivation;

use crate::types::{DrvPath, StorePath};

/// Read and parse one `.drv` file from the store.
pub fn read_drv(path: &DrvPath) -> Result<Derivation> {
    let bytes = std::fs::read(path.as_str()).with_context(|| not_in_store(path))?;
    parse_drv(path, &bytes)
}

fn parse_drv(path: &DrvPath, bytes: &[u8]) -> Result<Derivation> {
    Derivation::from_aterm_bytes(bytes, path.name())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot parse {path}"))
}

fn not_in_store(path: &DrvPath) -> String {
    format!(
        "cannot read {path}: it is not in the Nix store (garbage-collected, or instantiated on another machine?)"
    )
}

/// The input derivations of a parsed `.drv`, as typed paths.
pub fn input_drvs(drv: &Derivation) -> Vec<DrvPath> {
    drv.input_derivations()
        .keys()
        .filter_map(|p| p.to_absolute_path().parse().ok())
        .collect()
}

/// The derivation graph below a set of roots, each `.drv` read once.
#[derive(Debug, Default)]
pub struct DrvGraph {
    inputs: HashMap<DrvPath, Vec<DrvPath>>,
    /// Some node's inputs are not all in the graph (a file the prefetch
    /// could not read). Otherwise a node's presence implies its closure's.
    open: bool,
}

/// The input derivations of the `.drv` at `path`, read through `buf`.
fn read_inputs(path: &DrvPath, buf: &mut Vec<u8>) -> Result<Vec<DrvPath>> {
    read_file(path.as_str(), buf).with_context(|| not_in_store(path))?;
    if let Some(inputs) = scan_input_drvs(buf) {
        return Ok(inputs);
    }
    // Anything the quick scan does not expect gets the full parser, which
    // also gives the error message.
    Ok(input_drvs(&parse_drv(path, buf)?))
}

/// The input derivations of a `Derive(...)` ATerm, found by skipping to its
/// second list; `None` for anything unexpected. Parsing the whole file
/// (environment, arguments) cost 4x more than reading it, and the graph
/// needs only this list.
fn scan_input_drvs(bytes: &[u8]) -> Option<Vec<DrvPath>> {
    let mut s = Scanner { bytes, pos: 0 };
    s.eat(b"Derive([")?;
    // Outputs: ("name","path","hashAlgo","hash"),...
    if !s.try_eat(b"]") {
        loop {
            s.eat(b"(")?;
            for i in 0..4 {
                if i > 0 {
                    s.eat(b",")?;
                }
                s.string()?;
            }
            s.eat(b")")?;
            if s.try_eat(b"]") {
                break;
            }
            s.eat(b",")?;
        }
    }
    s.eat(b",[")?;
    // Input derivations: ("path",["out",...]),...
    let mut inputs = Vec::new();
    if !s.try_eat(b"]") {
        loop {
            s.eat(b"(")?;
            inputs.push(std::str::from_utf8(s.string()?).ok()?.parse().ok()?);
            s.eat(b",[")?;
            if !s.try_eat(b"]") {
                loop {
                    s.string()?;
                    if s.try_eat(b"]") {
                        break;
                    }
                    s.eat(b",")?;
                }
            }
            s.eat(b")")?;
            if s.try_eat(b"]") {
                break;
            }
            s.eat(b",")?;
        }
    }
    s.eat(b",")?;
    inputs.sort_unstable();
    inputs.dedup();
    Some(inputs)
}

/// The output paths of the `.drv` at `path`, by output name; `None` for
/// an output whose path is not known before it is built (content-addressed
/// derivations).
pub fn read_outputs(path: &DrvPath) -> Result<Vec<(String, Option<StorePath>)>> {
    let mut buf = Vec::new();
    read_file(path.as_str(), &mut buf).with_context(|| not_in_store(path))?;
    scan_outputs(&buf).with_context(|| format!("cannot parse {path}: not a derivation"))
}

/// The first list of a `Derive(...)` ATerm: `("name","path","algo","hash")`.
fn scan_outputs(bytes: &[u8]) -> Option<Vec<(String, Option<StorePath>)>> {
    let mut s = Scanner { bytes, pos: 0 };
    s.eat(b"Derive([")?;
    let mut outputs = Vec::new();
    if s.try_eat(b"]") {
        return Some(outputs);
    }
    loop {
        s.eat(b"(")?;
        let name = std::str::from_utf8(s.string()?).ok()?.to_owned();
        s.eat(b",")?;
        let path = std::str::from_utf8(s.string()?).ok()?;
        // Anything but a plain store path (an empty one, an escape) is
        // "not known": never a path to look up wrongly.
        outputs.push((name, path.parse().ok()));
        for _ in 0..2 {
            s.eat(b",")?;
            s.string()?;
        }
        s.eat(b")")?;
        if s.try_eat(b"]") {
            return Some(outputs);
        }
        s.eat(b",")?;
    }
}

struct Scanner<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn try_eat(&mut self, token: &[u8]) -> bool {
        let found = self.bytes[self.pos..].starts_with(token);
        if found {
            self.pos += token.len();
        }
        found
    }

    fn eat(&mut self, token: &[u8]) -> Option<()> {
        self.try_eat(token).then_some(())
    }

    /// A string's raw bytes, escapes left in (store paths have none).
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b"\"")?;
        let start = self.pos;
        loop {
            match *self.bytes.get(self.pos)? {
                b'"' => break,
                b'\\' => self.pos += 2,
                _ => self.pos += 1,
            }
        }
        let raw = &self.bytes[start..self.pos];
        self.pos += 1;
        Some(raw)
    }
}

/// Read a whole file into `buf`. `read_to_end` on a `File` first asks for
/// its size (two more system calls); through `take` it just reads: open,
/// read, read, close, which counts for tens of thousands of small files.
fn read_file(path: &str, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.clear();
    std::fs::File::open(path)?
        .take(u64::MAX)
        .read_to_end(buf)
        .map(drop)
}

/// Below this many files one thread reads them: threads cost more.
const PARALLEL_MIN: usize = 256;

/// [`read_inputs`] of every path, in order. A large depot has tens of
/// thousands of `.drv` files and this is drvkite's main cost after Nix,
/// so the files are read by one thread per core (Nix is done by now).
fn read_all(paths: &[DrvPath]) -> Result<Vec<Vec<DrvPath>>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if threads < 2 || paths.len() < PARALLEL_MIN {
        let mut buf = Vec::new();
        return paths.iter().map(|p| read_inputs(p, &mut buf)).collect();
    }
    let per_thread = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    let mut buf = Vec::new();
                    part.iter()
                        .map(|p| read_inputs(p, &mut buf))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(paths.len());
        for h in handles {
            all.extend(h.join().expect("a .drv reader thread panicked")?);
        }
        Ok(all)
    })
}

/// Reads the closures of roots on a thread of its own as they arrive,
/// while Nix is still evaluating (it uses one core; this the other).
pub struct Prefetch {
    roots: Option<Sender<DrvPath>>,
    thread: std::thread::JoinHandle<DrvGraph>,
}

impl Prefetch {
    pub fn start() -> Self {
        let (roots, arrivals) = std::sync::mpsc::channel::<DrvPath>();
        let thread = std::thread::spawn(move || {
            let mut graph = DrvGraph::default();
            let mut buf = Vec::new();
            let mut stack = Vec::new();
            for root in arrivals {
                stack.push(root);
                while let Some(path) = stack.pop() {
                    if graph.inputs.contains_key(&path) {
                        continue;
                    }
                    // A file that cannot be read is left out: `load` reads
                    // it again if it is needed, and reports the error then.
                    match read_inputs(&path, &mut buf) {
                        Ok(ins) => {
                            stack.extend(
                                ins.iter()
                                    .filter(|i| !graph.inputs.contains_key(*i))
                                    .cloned(),
                            );
                            graph.inputs.insert(path, ins);
                        }
                        Err(_) => graph.open = true,
                    }
                }
            }
            graph
        });
        Prefetch {
            roots: Some(roots),
            thread,
        }
    }

    /// Where to send roots. Every sender must be gone before `finish`.
    pub fn sender(&self) -> Sender<DrvPath> {
        self.roots.clone().expect("not finished")
    }

    /// Everything read so far, once the roots sent are all read.
    pub fn finish(mut self) -> DrvGraph {
        self.roots = None;
        self.thread.join().expect("the .drv reader thread panicked")
    }
}

impl DrvGraph {
    /// Read the closure of `roots`, level by level (each level's files in
    /// parallel). Cost: one read and parse per `.drv`.
    pub fn load(roots: impl IntoIterator<Item = DrvPath>) -> Result<Self> {
        DrvGraph::default().complete(roots)
    }

    /// Add the closure of `roots` to what the graph holds (from a
    /// [`Prefetch`]), reading only the files it lacks.
    pub fn complete(mut self, roots: impl IntoIterator<Item = DrvPath>) -> Result<Self> {
        // Where presence implies the closure, only absent nodes are walked.
        let walk = |g: &Self, p: &DrvPath| g.open || !g.inputs.contains_key(p);
        let mut seen: HashSet<DrvPath> = HashSet::new();
        let mut level: Vec<DrvPath> = roots
            .into_iter()
            .filter(|r| walk(&self, r) && seen.insert(r.clone()))
            .collect();
        while !level.is_empty() {
            let missing: Vec<DrvPath> = level
                .iter()
                .filter(|p| !self.inputs.contains_key(*p))
                .cloned()
                .collect();
            let read = read_all(&missing)?;
            let mut next = Vec::new();
            for ins in &read {
                next.extend(
                    ins.iter()
                        .filter(|i| walk(&self, i) && seen.insert((*i).clone()))
                        .cloned(),
                );
            }
            if self.open {
                for path in level.iter().filter(|p| self.inputs.contains_key(*p)) {
                    next.extend(
                        self.inputs[path]
                            .iter()
                            .filter(|i| seen.insert((*i).clone()))
                            .cloned(),
                    );
                }
            }
            self.inputs.extend(missing.into_iter().zip(read));
            level = next;
        }
        Ok(self)
    }

    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// For each `known` derivation, the closest known derivations below it:
    /// along every path down the graph, the first known node met. Known nodes
    /// stop the walk; unknown ones are looked through, each computed once.
    /// Order: inputs in store-path order, first occurrence kept.
    ///
    /// Large sets are split across threads, each with its own memo: the
    /// result does not depend on what a memo holds.
    pub fn closest_known(&self, known: &HashSet<DrvPath>) -> HashMap<DrvPath, Vec<DrvPath>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        if threads < 2 || known.len() < PARALLEL_MIN * 4 {
            return self.closest_known_from(known, known.iter());
        }
        let roots: Vec<&DrvPath> = known.iter().collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = roots
                .chunks(roots.len().div_ceil(threads))
                .map(|part| {
                    scope.spawn(move || self.closest_known_from(known, part.iter().copied()))
                })
                .collect();
            let mut all = HashMap::with_capacity(known.len());
            for h in handles {
                all.extend(h.join().expect("a graph walking thread panicked"));
            }
            all
        })
    }

    /// [`DrvGraph::closest_known`] for some of the known nodes.
    fn closest_known_from<'a>(
        &self,
        known: &HashSet<DrvPath>,
        roots: impl Iterator<Item = &'a DrvPath>,
    ) -> HashMap<DrvPath, Vec<DrvPath>> {
        // Memo of "known nodes reachable through unknown nodes" per node.
        let mut below: HashMap<&DrvPath, Vec<&DrvPath>> = HashMap::new();
        let mut result = HashMap::new();
        for root in roots {
            let Some(inputs) = self.inputs.get(root) else {
                continue;
            };
            // Iterative post-order walk over unknown nodes: graphs can be
            // thousands of levels deep, too deep for recursion.
            let mut stack: Vec<(&DrvPath, bool)> = inputs
                .iter()
                .filter(|i| !known.contains(*i))
                .map(|i| (i, false))
                .collect();
            while let Some((node, expanded)) = stack.pop() {
                if below.contains_key(node) {
                    continue;
                }
                let children = self.inputs.get(node).map(Vec::as_slice).unwrap_or(&[]);
                if !expanded {
                    stack.push((node, true));
                    for c in children {
                        if !known.contains(c) && !below.contains_key(c) {
                            stack.push((c, false));
                        }
                    }
                    continue;
                }
                let mut seen = HashSet::new();
                let mut deps = Vec::new();
                for c in children {
                    if known.contains(c) {
                        if seen.insert(c) {
                            deps.push(c);
                        }
                    } else if let Some(sub) = below.get(c) {
                        for d in sub {
                            if seen.insert(*d) {
                                deps.push(*d);
                            }
                        }
                    }
                }
                below.insert(node, deps);
            }
            let mut seen = HashSet::new();
            let mut deps = Vec::new();
            for i in inputs {
                let found: &[&DrvPath] = if known.contains(i) {
                    &[i]
                } else {
                    below.get(i).map_or(&[], Vec::as_slice)
                };
                for &d in found {
                    if d != root && seen.insert(d) {
                        deps.push(d.clone());
                    }
                }
            }
            result.insert(root.clone(), deps);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(c: char) -> DrvPath {
        format!(
            "/nix/store/{}-{c}.drv",
            c.to_string().repeat(32).replace('e', "0")
        )
        .parse()
        .unwrap()
    }

    #[test]
    fn looks_through_unknown_nodes_and_stops_at_known() {
        // a -> m -> b -> c ; a -> c ; b and c known, m unknown.
        let mut g = DrvGraph::default();
        g.inputs.insert(p('a'), vec![p('m'), p('c')]);
        g.inputs.insert(p('m'), vec![p('b')]);
        g.inputs.insert(p('b'), vec![p('c')]);
        g.inputs.insert(p('c'), vec![]);
        let known: HashSet<_> = [p('a'), p('b'), p('c')].into();
        let deps = g.closest_known(&known);
        assert_eq!(deps[&p('a')], vec![p('b'), p('c')]);
        assert_eq!(deps[&p('b')], vec![p('c')]);
        assert!(deps[&p('c')].is_empty());
    }

    #[test]
    fn split_across_threads_it_finds_what_one_walk_finds() {
        // Known k_i -> unknown u_i -> k_(i-1), k_(i-7) and u_(i-3): enough
        // known nodes for the split, and memos that would differ.
        let digits = b"0123456789abcdfghijklmnpqrsvwxyz";
        let path = |kind: char, i: usize| -> DrvPath {
            let hash: String = (0..31)
                .map(|d| digits[(i >> (5 * (d % 4))) % 32] as char)
                .collect();
            let last = if kind == 'k' { '0' } else { '1' };
            format!("/nix/store/{hash}{last}-{kind}{i}.drv")
                .parse()
                .unwrap()
        };
        let n = PARALLEL_MIN * 8;
        let mut g = DrvGraph::default();
        let mut known = HashSet::new();
        for i in 0..n {
            let mut below = Vec::new();
            for back in [1, 7] {
                if i >= back {
                    below.push(path('k', i - back));
                }
            }
            if i >= 3 {
                below.push(path('u', i - 3));
            }
            below.sort();
            g.inputs.insert(path('k', i), vec![path('u', i)]);
            g.inputs.insert(path('u', i), below);
            known.insert(path('k', i));
        }
        let split = g.closest_known(&known);
        let whole = g.closest_known_from(&known, known.iter());
        assert_eq!(split.len(), n);
        assert_eq!(split, whole);
        // k10 -> u10 -> k9, k3, u7 -> k6, k0, u4 -> k3, u1.
        let mut k10 = split[&path('k', 10)].clone();
        k10.sort();
        let mut expected = [0, 3, 6, 9].map(|i| path('k', i)).to_vec();
        expected.sort();
        assert_eq!(k10, expected);
    }

    #[test]
    fn completing_reads_only_what_is_missing() {
        // a -> m -> b; none of these files exists, so any read fails.
        let mut g = DrvGraph::default();
        g.inputs.insert(p('a'), vec![p('m')]);
        g.inputs.insert(p('m'), vec![p('b')]);
        g.inputs.insert(p('b'), vec![]);
        let g = g.complete([p('a'), p('b')]).expect("nothing to read");
        // A node left out by the prefetch (unreadable then) is read now,
        // even below nodes the graph holds.
        let mut open = DrvGraph {
            open: true,
            ..Default::default()
        };
        open.inputs.insert(p('a'), vec![p('m')]);
        let err = open.complete([p('a')]).unwrap_err();
        assert!(format!("{err:#}").contains(p('m').as_str()), "{err:#}");
        let known: HashSet<_> = [p('a'), p('b')].into();
        assert_eq!(g.closest_known(&known)[&p('a')], vec![p('b')]);
    }

    #[test]
    fn quick_scan_agrees_with_the_full_parser() {
        let a = "/nix/store/0c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-a.drv";
        let b = "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-b.drv";
        let drv = format!(
            r#"Derive([("dev","/nix/store/1c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-x-dev","",""),("out","/nix/store/2c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-x","","")],[("{b}",["out"]),("{a}",["dev","out"])],["/nix/store/3c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-src"],"x86_64-linux","/bin/sh",["-c","echo \"q\\\\ \n\""],[("out","/nix/store/2c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-x")])"#
        );
        let quick = scan_input_drvs(drv.as_bytes()).expect("scans");
        let full = input_drvs(&Derivation::from_aterm_bytes(drv.as_bytes(), "x").unwrap());
        assert_eq!(quick, full);
        assert_eq!(quick, vec![a.parse().unwrap(), b.parse().unwrap()]);

        let none = r#"Derive([("out","/nix/store/2c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-x","","")],[],[],"x86_64-linux","/bin/sh",[],[])"#;
        assert_eq!(scan_input_drvs(none.as_bytes()), Some(vec![]));
        // Other formats and damaged files are left to the full parser.
        for bad in [
            "DrvWithVersion(\"xp-dyn-drv\",[],[],[],\"s\",\"b\",[],[])",
            "Derive([(\"out\",\"/nix/store/x",
            "Derive([],[(\"/tmp/not-a-store-path.drv\",[\"out\"])],",
            "",
        ] {
            assert_eq!(scan_input_drvs(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn output_scan_gives_each_output_path() {
        let drv = r#"Derive([("dev","/nix/store/1c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-x-dev","",""),("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[])"#;
        assert_eq!(
            scan_outputs(drv.as_bytes()).unwrap(),
            vec![
                (
                    "dev".to_owned(),
                    Some(
                        "/nix/store/1c8wvh3kw6ym5vzcq8jbkmd8w2w1b1bx-x-dev"
                            .parse()
                            .unwrap()
                    )
                ),
                ("out".to_owned(), None),
            ]
        );
        assert_eq!(scan_outputs(b"Derive([(\"out\",\"/nix"), None);
        assert_eq!(scan_outputs(b"DrvWithVersion("), None);
    }
}
