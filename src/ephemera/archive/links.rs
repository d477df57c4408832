//! The symbolic links of one persisted path, and which of them stay inside
//! it when followed through each other, as the kernel would follow them.
//!
//! Built for hostile input: the links are kept in a tree of their folders
//! (each name stored once), memory is charged against a budget, and each
//! link is resolved once and remembered, so the work is linear in the size
//! of the links whatever their depth or how they point at each other.

use std::collections::HashMap;

/// How many symbolic links one lookup may go through (as Linux allows).
const MAX_LINK_HOPS: u32 = 40;
/// Bytes charged per folder of the tree and per link, on top of names and
/// targets: roughly what the maps cost.
const NODE_COST: usize = 64;

#[derive(Debug, PartialEq, Eq)]
pub enum LinkError {
    /// A link lies below another link.
    BelowLink,
    /// A link is recorded twice, or other links lie below it.
    Clash,
    /// The links need more memory than the budget allows.
    Budget,
}

struct Link {
    node: u32,
    target: Box<[u8]>,
}

/// The links of an archive's persisted paths: node 0 is above them all,
/// its children are the persisted paths (by index), and `..` never leaves
/// one of those.
pub struct LinkTree {
    /// Parent and name of each node.
    parent: Vec<u32>,
    name: Vec<Box<[u8]>>,
    children: HashMap<(u32, Box<[u8]>), u32>,
    /// Which link a node is, if it is one.
    link_at: HashMap<u32, usize>,
    /// Whether a node has children.
    has_children: Vec<bool>,
    links: Vec<Link>,
    budget: usize,
}

/// A place reached while resolving: a node of the tree and how many plain
/// folders (that hold no links) below it.
#[derive(Clone, Copy)]
struct Pos {
    node: u32,
    below: u32,
}

#[derive(Clone, Copy)]
enum Memo {
    Unseen,
    Busy,
    Inside(Pos, u32),
    Outside,
}

enum Resolved {
    Inside(Pos, u32),
    Outside,
    /// Went through more links than the kernel would; says nothing about
    /// the links on the way, which may be fine on their own.
    TooDeep,
}

impl LinkTree {
    /// A tree that may use about `budget` bytes.
    pub fn new(budget: usize) -> LinkTree {
        LinkTree {
            parent: vec![0],
            name: vec![Box::from(&b""[..])],
            children: HashMap::new(),
            link_at: HashMap::new(),
            has_children: vec![false],
            links: Vec::new(),
            budget,
        }
    }

    pub fn count(&self) -> usize {
        self.links.len()
    }

    fn charge(&mut self, bytes: usize) -> Result<(), LinkError> {
        self.budget = self.budget.checked_sub(bytes).ok_or(LinkError::Budget)?;
        Ok(())
    }

    /// Record a link at `path` (its components below persisted path number
    /// `root`, at least one) pointing to `target`.
    pub fn add(&mut self, root: usize, path: &[&[u8]], target: &[u8]) -> Result<(), LinkError> {
        let root = root.to_string();
        let mut node = 0u32;
        for (i, comp) in std::iter::once(root.as_bytes())
            .chain(path.iter().copied())
            .enumerate()
        {
            if self.link_at.contains_key(&node) {
                return Err(LinkError::BelowLink);
            }
            node = match self.children.get(&(node, Box::from(comp))) {
                Some(&child) => child,
                None => {
                    self.charge(2 * comp.len() + NODE_COST)?;
                    let child = self.parent.len() as u32;
                    self.parent.push(node);
                    self.name.push(Box::from(comp));
                    self.has_children.push(false);
                    self.has_children[node as usize] = true;
                    self.children.insert((node, Box::from(comp)), child);
                    child
                }
            };
            if i == path.len()
                && (self.link_at.contains_key(&node) || self.has_children[node as usize])
            {
                return Err(LinkError::Clash);
            }
        }
        self.charge(target.len() + NODE_COST)?;
        self.link_at.insert(node, self.links.len());
        self.links.push(Link {
            node,
            target: Box::from(target),
        });
        Ok(())
    }

    /// The persisted path link `i` lies in and its path below it,
    /// components joined with `/`.
    pub fn path(&self, i: usize) -> (usize, Vec<u8>) {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut node = self.links[i].node;
        while self.parent[node as usize] != 0 {
            parts.push(&self.name[node as usize]);
            node = self.parent[node as usize];
        }
        parts.reverse();
        let root = std::str::from_utf8(&self.name[node as usize])
            .ok()
            .and_then(|r| r.parse().ok())
            .expect("roots are named by their index");
        (root, parts.join(&b'/'))
    }

    pub fn target(&self, i: usize) -> &[u8] {
        &self.links[i].target
    }

    /// The links (by index) that, followed through the others, do not stay
    /// inside the persisted path: absolute or empty targets, `..` past the
    /// top, loops and chains longer than the kernel follows.
    pub fn escaping(&self) -> Vec<usize> {
        let mut memo = vec![Memo::Unseen; self.links.len()];
        (0..self.links.len())
            .filter(|&i| !matches!(self.resolve(i, 0, &mut memo), Resolved::Inside(..)))
            .collect()
    }

    fn resolve(&self, i: usize, depth: u32, memo: &mut [Memo]) -> Resolved {
        match memo[i] {
            Memo::Inside(pos, hops) => return Resolved::Inside(pos, hops),
            Memo::Outside | Memo::Busy => return Resolved::Outside,
            Memo::Unseen => {}
        }
        if depth > MAX_LINK_HOPS {
            return Resolved::TooDeep;
        }
        memo[i] = Memo::Busy;
        let result = self.walk(i, depth, memo);
        memo[i] = match result {
            Resolved::Inside(pos, hops) => Memo::Inside(pos, hops),
            Resolved::Outside => Memo::Outside,
            // Only the link this lookup started from is known to be too deep.
            Resolved::TooDeep if depth == 0 => Memo::Outside,
            Resolved::TooDeep => Memo::Unseen,
        };
        match result {
            Resolved::TooDeep if depth == 0 => Resolved::Outside,
            other => other,
        }
    }

    fn walk(&self, i: usize, depth: u32, memo: &mut [Memo]) -> Resolved {
        let link = &self.links[i];
        if link.target.is_empty() || link.target.starts_with(b"/") {
            return Resolved::Outside;
        }
        let mut pos = Pos {
            node: self.parent[link.node as usize],
            below: 0,
        };
        let mut hops = 0u32;
        for part in link.target.split(|b| *b == b'/') {
            match part {
                b"" | b"." => {}
                b".." if pos.below > 0 => pos.below -= 1,
                b".." if self.parent[pos.node as usize] == 0 => return Resolved::Outside,
                b".." => pos.node = self.parent[pos.node as usize],
                _ if pos.below > 0 => pos.below += 1,
                name => match self.children.get(&(pos.node, Box::from(name))) {
                    None => pos.below = 1,
                    Some(&child) => match self.link_at.get(&child) {
                        None => pos.node = child,
                        Some(&j) => match self.resolve(j, depth + 1, memo) {
                            Resolved::Inside(to, h) => {
                                hops += 1 + h;
                                if hops > MAX_LINK_HOPS {
                                    return Resolved::TooDeep;
                                }
                                pos = to;
                            }
                            other => return other,
                        },
                    },
                },
            }
        }
        Resolved::Inside(pos, hops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(pairs: &[(&str, &str)]) -> LinkTree {
        let mut t = LinkTree::new(1 << 20);
        for (p, target) in pairs {
            let parts: Vec<&[u8]> = p.split('/').map(str::as_bytes).collect();
            t.add(0, &parts, target.as_bytes()).unwrap();
        }
        t
    }

    fn escaping(pairs: &[(&str, &str)]) -> Vec<String> {
        let t = tree(pairs);
        t.escaping()
            .into_iter()
            .map(|i| String::from_utf8(t.path(i).1).unwrap())
            .collect()
    }

    #[test]
    fn links_are_followed_through_other_links() {
        assert!(escaping(&[("a", "b/c"), ("d/e", "../a")]).is_empty());
        let mut out = escaping(&[("up", ".."), ("abs", "/etc"), ("empty", "")]);
        out.sort();
        assert_eq!(out, ["abs", "empty", "up"]);
        // Each link alone stays inside; together they escape.
        assert_eq!(
            escaping(&[("x/y/s", "../.."), ("x/y/l", "s/../z")]),
            ["x/y/l"]
        );
        let mut out = escaping(&[("a", "b"), ("b", "a")]);
        out.sort();
        assert_eq!(out, ["a", "b"]);
        // `..` after a link goes up from where the link leads.
        assert_eq!(
            escaping(&[("a/b/l", "../../c/d"), ("m", "a/b/l/../../..")]),
            ["m"]
        );
        assert!(escaping(&[("a/b/l", "../../c/d"), ("m", "a/b/l/../..")]).is_empty());
        // Plain folders that hold no links are walked without being stored.
        assert!(escaping(&[("l", "x/y/z/../../..")]).is_empty());
        assert_eq!(escaping(&[("l", "x/y/../../..")]), ["l"]);
    }

    #[test]
    fn long_chains_are_refused_like_the_kernel_does() {
        let names: Vec<String> = (0..60).map(|i| format!("l{i}")).collect();
        let pairs: Vec<(&str, &str)> = (0..60)
            .map(|i| {
                (
                    names[i].as_str(),
                    if i + 1 < 60 {
                        names[i + 1].as_str()
                    } else {
                        "."
                    },
                )
            })
            .collect();
        let t = tree(&pairs);
        let out = t.escaping();
        // l0 … l18 need more than 40 hops; l20 onwards need at most 40.
        assert!(out.contains(&0));
        assert!(!out.contains(&59));
        assert!(!out.contains(&20));
    }

    #[test]
    fn clashes_and_budgets_are_errors() {
        let mut t = LinkTree::new(1 << 20);
        t.add(0, &[b"a"], b"x").unwrap();
        assert_eq!(t.add(0, &[b"a", b"b"], b"x"), Err(LinkError::BelowLink));
        assert_eq!(t.add(0, &[b"a"], b"y"), Err(LinkError::Clash));
        t.add(0, &[b"c", b"d"], b"x").unwrap();
        assert_eq!(t.add(0, &[b"c"], b"x"), Err(LinkError::Clash));
        // Another persisted path is another tree: `..` does not reach it.
        t.add(1, &[b"a"], b"x").unwrap();
        t.add(1, &[b"up"], b"../0/a").unwrap();
        assert_eq!(t.path(3), (1, b"up".to_vec()));
        assert_eq!(t.escaping(), [3]);
        let mut small = LinkTree::new(300);
        small.add(0, &[b"a"], b"x").unwrap();
        assert_eq!(small.add(0, &[b"b"], &[b'y'; 300]), Err(LinkError::Budget));
    }
}
