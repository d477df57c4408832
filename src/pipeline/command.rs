//! Shell commands for generated steps. Everything drvkite puts into a
//! command is quoted for bash and escaped for `buildkite-agent pipeline
//! upload`, which would otherwise interpolate `$VAR` at upload time.

use crate::types::{AttrPath, DrvPath};

/// Quote a string as one bash word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Escape text for Buildkite's upload-time interpolation: `$$` is a
/// literal `$`.
pub fn escape_interpolation(s: &str) -> String {
    s.replace('$', "$$")
}

/// The expression the fallback builds: the attribute path arrives as JSON
/// through --argstr, so no attribute name is ever spliced into Nix or shell
/// syntax.
const FALLBACK_EXPR: &str = "{ attrPath, output }: builtins.getAttr output (builtins.foldl' (v: n: builtins.getAttr n v) (import ./. { }) (builtins.fromJSON attrPath))";

/// The same for a parent as an extra step's `parentOverride` changes it:
/// the override is applied again to the parent found at `attrPath`.
const OVERRIDE_FALLBACK_EXPR: &str = "{ attrPath, step, output }: let parent = builtins.foldl' (v: n: builtins.getAttr n v) (import ./. { }) (builtins.fromJSON attrPath); in builtins.getAttr output ((builtins.getAttr step parent.meta.ci.extraSteps).parentOverride parent)";

/// What the fallback builds when the `.drv` file is gone.
#[derive(Debug, Clone, Copy)]
pub enum Fallback<'a> {
    /// The derivation at this attribute path of the depot.
    Attr(&'a AttrPath),
    /// `parentOverride` of extra step `step` applied to the target at
    /// `parent`.
    ParentOverride { parent: &'a AttrPath, step: &'a str },
}

/// The command that builds a derivation and prints exactly one store path
/// (its first output), leaving an indirect GC root at `out_link`.
///
/// It realises the `.drv` written during evaluation, so the depot is not
/// evaluated again; only when that file is gone (garbage-collected, or this
/// agent did not run the evaluation) does it fall back to `nix-build` of
/// the attribute path from the checkout.
///
/// The result is plain shell; pass it through [`escape_interpolation`]
/// before it goes into a pipeline.
pub fn build_command(
    drv: &DrvPath,
    outputs: &[String],
    attr_path: &AttrPath,
    out_link: &str,
) -> String {
    build_command_with(drv, outputs, Fallback::Attr(attr_path), out_link)
}

/// [`build_command`] with a choice of fallback.
pub fn build_command_with(
    drv: &DrvPath,
    outputs: &[String],
    fallback: Fallback,
    out_link: &str,
) -> String {
    let first = outputs.first().map_or("out", String::as_str);
    let drv_q = sh_quote(drv.as_str());
    let link_q = sh_quote(out_link);
    let realise = if outputs.len() <= 1 {
        // One output: print it through the root, as TVL does.
        format!("nix-store --realise {drv_q} --add-root {link_q} --indirect | xargs -r realpath")
    } else {
        // Several outputs: build them all (rooted), print only the first.
        format!(
            "nix-store --realise {drv_q} --add-root {link_q} --indirect >/dev/null && nix-store --realise {}",
            sh_quote(&format!("{}!{first}", drv.as_str()))
        )
    };
    let json = |p: &AttrPath| serde_json::to_string(p.parts()).expect("strings serialise");
    let (expr, args) = match fallback {
        Fallback::Attr(path) => (
            FALLBACK_EXPR,
            format!("--argstr attrPath {}", sh_quote(&json(path))),
        ),
        Fallback::ParentOverride { parent, step } => (
            OVERRIDE_FALLBACK_EXPR,
            format!(
                "--argstr attrPath {} --argstr step {}",
                sh_quote(&json(parent)),
                sh_quote(step)
            ),
        ),
    };
    format!(
        "set -o pipefail; ({realise}) || (test ! -f {drv_q} && nix-build -E {} {args} --argstr output {} --show-trace --out-link {link_q})",
        sh_quote(expr),
        sh_quote(first),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_single_quotes() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(escape_interpolation("a$b$$"), "a$$b$$$$");
    }

    #[test]
    fn single_output_command_matches_tvl_shape() {
        let drv: DrvPath = "/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-a.drv"
            .parse()
            .unwrap();
        let cmd = build_command(
            &drv,
            &["out".into()],
            &AttrPath::new(vec!["a".into()]),
            "result",
        );
        assert!(cmd.starts_with(
            "set -o pipefail; (nix-store --realise '/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-a.drv' --add-root 'result' --indirect | xargs -r realpath) || (test ! -f '/nix/store/9knhsmy055kqkfcl5k0scg07ckny2maw-a.drv' && nix-build -E "
        ), "{cmd}");
        assert!(
            cmd.contains("--argstr attrPath '[\"a\"]' --argstr output 'out'"),
            "{cmd}"
        );
    }
}
