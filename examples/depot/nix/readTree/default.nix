# readTree: turn a folder hierarchy into a nested attribute set.
#
# Compatible with TVL's //nix/readTree: a depot written for that library
# works unchanged with this one. Rules, in short:
#
#   - every folder and every `<name>.nix` file becomes the attribute `<name>`;
#   - a folder's `default.nix`, when present, is the folder's value; its
#     sibling `.nix` files are then not read, its subfolders still are;
#   - a value that is not an attribute set stops the traversal there;
#   - `.skip-tree` drops a folder, `.skip-subtree` keeps only its default.nix;
#   - hidden entries (leading `.`) are ignored;
#   - attribute sets get the markers `__readTree` (path components) and
#     `__readTreeChildren` (names of the attributes readTree added), which
#     `gather` and CI tooling use to find targets.
{ ... }:

let
  inherit (builtins)
    attrNames
    concatMap
    concatStringsSep
    elem
    elemAt
    filter
    hasAttr
    head
    isAttrs
    isFunction
    length
    listToAttrs
    match
    readDir
    substring
    trace
    typeOf
    ;

  isHidden = name: substring 0 1 name == ".";

  # `foo.nix` -> "foo", anything else -> null.
  nixAttrName =
    name:
    let
      m = match "(.+)\\.nix" name;
    in
    if m == null then null else head m;

  markers =
    addMarkers: parts: children:
    if addMarkers then
      {
        __readTree = parts;
        __readTreeChildren = children;
      }
    else
      { };

  # Attach children and markers to a value. Derivations built with
  # mkDerivation get them through passthru, so the derivation hash does not
  # change just because the value lives in a tree.
  attach =
    value: extra:
    if value ? overrideAttrs then
      value.overrideAttrs (old: {
        passthru = (old.passthru or { }) // extra;
      })
    else
      value // extra;

  # scopedImport that hands `scopedArgs` on to every file the imported
  # file imports in turn (through `import`, `builtins.import` or
  # `scopedImport`), so what a depot puts there cannot be escaped through a
  # helper file. TVL's readTree does the same.
  scopedImportDeep =
    scopedArgs:
    let
      deepArgs = scopedArgs // {
        import = scopedImportDeep scopedArgs;
        scopedImport = more: scopedImportDeep (scopedArgs // more);
        builtins = (scopedArgs.builtins or builtins) // {
          inherit (deepArgs) import scopedImport;
        };
      };
    in
    builtins.scopedImport deepArgs;

  importWith =
    scopedArgs: path:
    if scopedArgs != { } && builtins ? scopedImport then scopedImportDeep scopedArgs path else import path;

  importFile =
    ctx: parts: here: path:
    let
      f = importWith ctx.scopedArgs path;
      base = if isFunction ctx.args then ctx.args { locatedAt = parts; } else ctx.args;
      args = ctx.filter parts ({ locatedAt = parts; } // base // { inherit here; });
    in
    if isFunction f || (isAttrs f && f ? __functor) then
      f args
    else
      throw "readTree: ${toString path} evaluates to a ${typeOf f}; every file in the tree must be a function, e.g. { depot, pkgs, ... }: …";

  readNode =
    ctx: path: parts: isRoot:
    let
      entries = readDir path;
      names = attrNames entries;
      skipSubtree = hasAttr ".skip-subtree" entries;
      # A symlinked default.nix counts, as in TVL's readTree.
      hasDefault = elem (entries."default.nix" or null) [
        "regular"
        "symlink"
      ];
      visible = filter (n: !isHidden n) names;

      subdirs = if skipSubtree then [ ] else filter (n: entries.${n} == "directory") visible;

      nixFiles =
        if skipSubtree || hasDefault then
          [ ]
        else
          filter (
            n:
            n != "default.nix" && nixAttrName n != null && (entries.${n} == "regular" || entries.${n} == "symlink")
          ) visible;

      dirChildren = concatMap (
        n:
        let
          child = readNode ctx (path + "/${n}") (parts ++ [ n ]) false;
        in
        if child.skip then [ ] else [ { name = n; value = child.value; } ]
      ) subdirs;

      fileChildren = map (
        n:
        let
          name = nixAttrName n;
          childParts = parts ++ [ name ];
          imported = importFile ctx childParts node (path + "/${n}");
        in
        {
          inherit name;
          value = if isAttrs imported then attach imported (markers ctx.addMarkers childParts [ ]) else imported;
        }
      ) nixFiles;

      # listToAttrs keeps the first of equal names: `x.nix` wins over a
      # folder `x`, as in TVL's readTree.
      children = listToAttrs (fileChildren ++ dirChildren);

      # The root's own default.nix is the caller of readTree: importing it
      # again would recurse forever.
      own =
        if hasDefault && !(isRoot && ctx.rootDir) then importFile ctx parts node (path + "/default.nix") else { };

      node =
        if isAttrs own then
          attach own (children // markers ctx.addMarkers parts (attrNames children))
        else
          own;
    in
    {
      skip = hasAttr ".skip-tree" entries;
      value = node;
    };

  readTree =
    {
      path,
      args,
      filter ? (_parts: x: x),
      scopedArgs ? { },
      rootDir ? true,
      addMarkers ? true,
    }:
    let
      root = readNode {
        inherit
          args
          filter
          scopedArgs
          rootDir
          addMarkers
          ;
      } path [ ] true;
    in
    if root.skip then
      throw "readTree: the top-level folder ${toString path} has a .skip-tree marker, so there is nothing to read"
    else
      root.value;

  # "a/b" or "a/b:sub", the label CI tooling shows for a target.
  mkLabel =
    t: concatStringsSep "/" t.__readTree + (if t ? __subtarget then ":${t.__subtarget}" else "");

  # Nix strings have no escape for ESC; JSON does.
  esc = builtins.fromJSON ''"\u001b"'';

  subtargetNames =
    node:
    let
      names = (node.meta.targets or [ ]) ++ (node.meta.ci.targets or [ ]);
    in
    if node ? meta.targets then
      trace "${esc}[1;31mreadTree: ${mkLabel node} uses meta.targets, which is deprecated; use meta.ci.targets${esc}[0m" names
    else
      names;

  mkSubtarget =
    node: name:
    (node.${name} or { })
    // {
      __readTree = node.__readTree;
      __readTreeChildren = [ ];
      __subtarget = name;
    };
  # Collect every node that `eligible` accepts: the node itself, then its
  # readTree children (in name order), then its subtargets. Only readTree
  # children are followed, never arbitrary attributes.
  gather =
    eligible: node:
    if node ? __readTree then
      (if eligible node then [ node ] else [ ])
      ++ concatMap (gather eligible) (map (n: node.${n}) node.__readTreeChildren)
      ++ filter eligible (map (mkSubtarget node) (subtargetNames node))
    else
      [ ];

in
{
  __functor = _: readTree;

  inherit mkLabel gather;

  # Mark every derivation in an attribute set as a subtarget.
  drvTargets =
    attrs:
    attrs
    // {
      meta = (attrs.meta or { }) // {
        ci = (attrs.meta.ci or { }) // {
          targets = filter (n: (attrs.${n}.type or null) == "derivation") (attrNames attrs);
        };
      };
    };

  # An args filter that hides //<folder> from files outside it.
  restrictFolder =
    {
      folder,
      exceptions ? [ ],
      reason,
    }:
    parts: args:
    if (length parts > 0 && elemAt parts 0 == folder) || elem parts exceptions then
      args
    else
      args
      // {
        depot = args.depot // {
          ${folder} =
            throw "readTree: ${concatStringsSep "/" parts} may not use //${folder}: ${reason}";
        };
      };

  fix =
    f:
    let
      x = f x;
    in
    x;
}
