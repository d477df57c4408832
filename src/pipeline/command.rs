//! Shell commands for generated steps. Every value drvkite puts into a
//! command is one bash word (see [`super::text::push_shell_word`]); the
//! command as a whole goes through [`super::text::exact`] on its way into
//! a step.

use super::text::push_shell_word as push_quoted;
use crate::types::{AttrPath, DrvPath};

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
/// The result is plain shell; pass it through [`super::text::exact`]
/// before it goes into a step.
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
    // Built with push_str, not format!: this runs once per step, and on
    // large depots formatting was a visible part of drvkite's own time.
    let first = outputs.first().map_or("out", String::as_str);
    let mut drv_q = String::with_capacity(drv.as_str().len() + 2);
    push_quoted(&mut drv_q, drv.as_str());
    let mut link_q = String::with_capacity(out_link.len() + 2);
    push_quoted(&mut link_q, out_link);
    let mut c = String::with_capacity(1024);
    c.push_str("set -o pipefail; (nix-store --realise ");
    c.push_str(&drv_q);
    c.push_str(" --add-root ");
    c.push_str(&link_q);
    if outputs.len() <= 1 {
        // One output: print it through the root, as TVL does.
        c.push_str(" --indirect | xargs -r realpath");
    } else {
        // Several outputs: build them all (rooted), print only the first.
        c.push_str(" --indirect >/dev/null && nix-store --realise ");
        push_quoted(&mut c, &format!("{}!{first}", drv.as_str()));
    }
    c.push_str(") || (test ! -f ");
    c.push_str(&drv_q);
    c.push_str(" && nix-build -E ");
    let json = |p: &AttrPath| serde_json::to_string(p.parts()).expect("strings serialise");
    match fallback {
        Fallback::Attr(path) => {
            push_quoted(&mut c, FALLBACK_EXPR);
            c.push_str(" --argstr attrPath ");
            push_quoted(&mut c, &json(path));
        }
        Fallback::ParentOverride { parent, step } => {
            push_quoted(&mut c, OVERRIDE_FALLBACK_EXPR);
            c.push_str(" --argstr attrPath ");
            push_quoted(&mut c, &json(parent));
            c.push_str(" --argstr step ");
            push_quoted(&mut c, step);
        }
    }
    c.push_str(" --argstr output ");
    push_quoted(&mut c, first);
    c.push_str(" --show-trace --out-link ");
    c.push_str(&link_q);
    c.push(')');
    c
}

#[cfg(test)]
mod tests {
    use super::*;

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
