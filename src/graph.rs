//! Analysis of the `.drv` graph: which targets a target depends on, through
//! any number of derivations that are not targets themselves.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use nix_derivation::Derivation;

use crate::types::DrvPath;

/// Read and parse one `.drv` file from the store.
pub fn read_drv(path: &DrvPath) -> Result<Derivation> {
    let bytes = std::fs::read(path.as_str()).with_context(|| {
        format!("cannot read {path}: it is not in the Nix store (garbage-collected, or instantiated on another machine?)")
    })?;
    Derivation::from_aterm_bytes(&bytes, path.name())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot parse {path}"))
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
}

impl DrvGraph {
    /// Read the closure of `roots`. Cost: one read and parse per `.drv`.
    pub fn load(roots: impl IntoIterator<Item = DrvPath>) -> Result<Self> {
        let mut graph = DrvGraph::default();
        let mut todo: Vec<DrvPath> = roots.into_iter().collect();
        while let Some(path) = todo.pop() {
            if graph.inputs.contains_key(&path) {
                continue;
            }
            let inputs = input_drvs(&read_drv(&path)?);
            todo.extend(
                inputs
                    .iter()
                    .filter(|p| !graph.inputs.contains_key(*p))
                    .cloned(),
            );
            graph.inputs.insert(path, inputs);
        }
        Ok(graph)
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
    pub fn closest_known(&self, known: &HashSet<DrvPath>) -> HashMap<DrvPath, Vec<DrvPath>> {
        // Memo of "known nodes reachable through unknown nodes" per node.
        let mut below: HashMap<&DrvPath, Vec<&DrvPath>> = HashMap::new();
        let mut result = HashMap::new();
        for root in known {
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
                let found: Vec<&DrvPath> = if known.contains(i) {
                    vec![i]
                } else {
                    below.get(i).cloned().unwrap_or_default()
                };
                for d in found {
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
}
