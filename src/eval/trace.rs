//! Where a missing path was imported from. Nix reports a missing file
//! (`import ./gone.nix`, a readTree copied away from what it imports) by
//! the path it looked for only, which is not what the user must edit.
//! Two ways to find the importer, both only on this error:
//!
//! - the depot's `.nix` files are searched for a path literal that
//!   resolves to the missing path (most imports are written that way);
//! - failing that, Nix's `--show-trace` report names the innermost file
//!   or expression the error went through.

use camino::{Utf8Path, Utf8PathBuf};

/// The missing path of a one-line Nix error about one, e.g.
/// `getting status of '/x/y.nix': No such file or directory`.
pub fn missing_path(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("getting status of '")
        .or_else(|| message.strip_prefix("opening file '"))?;
    rest.split_once('\'').map(|(path, _)| path)
}

/// A `.nix` file below `depot` with a path literal that resolves to
/// `missing` (or to the folder whose `default.nix` is missing):
/// " (imported by FILE:LINE)".
pub fn search_importer(depot: &Utf8Path, missing: &str) -> Option<String> {
    let missing = normalise(Utf8Path::new(missing));
    let folder = missing
        .file_name()
        .filter(|n| *n == "default.nix")
        .and(missing.parent());
    let files = walkdir::WalkDir::new(depot)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.file_name().to_string_lossy().ends_with(".nix"));
    for entry in files {
        let Some(file) = Utf8Path::from_path(entry.path()) else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let dir = file.parent().unwrap_or(depot);
        for (n, line) in text.lines().enumerate() {
            let hit = path_literals(line).any(|lit| {
                let p = normalise(&dir.join(lit));
                p == missing || Some(p.as_path()) == folder
            });
            if hit {
                return Some(format!(" (imported by {file}:{})", n + 1));
            }
        }
    }
    None
}

/// The path literals of a line of Nix: `./x`, `../x`, `/x` and the like
/// (comments and strings are not told apart: a false match needs the
/// exact missing path).
fn path_literals(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || "._-+/".contains(c)))
        .filter(|w| w.starts_with("./") || w.starts_with("../") || w.starts_with('/'))
        .map(|w| w.trim_end_matches('/'))
}

/// `.` and `..` resolved without asking the file system (the path does
/// not exist), as Nix resolves path literals.
fn normalise(path: &Utf8Path) -> Utf8PathBuf {
    let mut out = Utf8PathBuf::new();
    for c in path.components() {
        match c {
            camino::Utf8Component::CurDir => {}
            camino::Utf8Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// From a `--show-trace` report, the innermost place in the user's files
/// (not under `internal`, drvkite's own expression) that the error went
/// through: " (imported by FILE)" or " (at FILE:LINE:COLUMN)".
pub fn traced_importer(stderr: &str, internal: &str) -> Option<String> {
    let start = stderr
        .lines()
        .position(|l| l.trim_start().starts_with("error:"))?;
    stderr.lines().skip(start + 1).find_map(|l| {
        let l = l.trim();
        if let Some(file) = l
            .strip_prefix("… while evaluating the file '")
            .and_then(|r| r.strip_suffix("':"))
        {
            return (!file.starts_with(internal)).then(|| format!(" (imported by {file})"));
        }
        let at = l.strip_prefix("at ")?.strip_suffix(':')?;
        (at.starts_with('/') && !at.starts_with(internal)).then(|| format!(" (at {at})"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Nix 2.8's reports, shortened.
    const FILE: &str = "error: getting status of '/tmp/nix/readTree': No such file or directory

       … while evaluating the file '/tmp/d/nix/readTree/default.nix':

       … while evaluating anonymous lambda

       at /tmp/d/default.nix:4:1:

            4| { ... }@args:
";
    const ATTR: &str = "error: getting status of '/tmp/d/missing.nix': No such file or directory

       … while evaluating the attribute 'x'

       at /internal/eval.nix:1:3:

       … while evaluating the attribute 'y'

       at /tmp/d/a.nix:1:3:
";

    #[test]
    fn reads_the_missing_path() {
        let m = FILE
            .lines()
            .next()
            .unwrap()
            .strip_prefix("error: ")
            .unwrap();
        assert_eq!(missing_path(m), Some("/tmp/nix/readTree"));
        assert_eq!(
            missing_path("opening file '/a/b/default.nix': No such file or directory"),
            Some("/a/b/default.nix")
        );
        assert_eq!(missing_path("attribute 'x' missing"), None);
    }

    #[test]
    fn the_trace_names_the_innermost_user_file() {
        assert_eq!(
            traced_importer(FILE, "/internal").as_deref(),
            Some(" (imported by /tmp/d/nix/readTree/default.nix)")
        );
        assert_eq!(
            traced_importer(ATTR, "/internal").as_deref(),
            Some(" (at /tmp/d/a.nix:1:3)")
        );
        assert_eq!(traced_importer("error: x\n", "/internal"), None);
    }

    #[test]
    fn path_literals_resolve_against_their_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Utf8Path::from_path(tmp.path()).unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(
            root.join("a/b/x.nix"),
            "{ ... }:\n# ./gone.nix\nimport ../../c/gone.nix\n",
        )
        .unwrap();
        std::fs::write(root.join("a/y.nix"), "{ d = ./dir/; }\n").unwrap();
        assert_eq!(
            search_importer(root, root.join("c/gone.nix").as_str()),
            Some(format!(" (imported by {root}/a/b/x.nix:3)"))
        );
        assert_eq!(
            search_importer(root, root.join("a/dir/default.nix").as_str()),
            Some(format!(" (imported by {root}/a/y.nix:1)"))
        );
        assert_eq!(
            search_importer(root, root.join("a/gone.nix").as_str()),
            None
        );
    }
}
