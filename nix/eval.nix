# The expression drvkite evaluates with
#   nix-instantiate --eval --strict --json --read-write-mode
#
# It imports a depot, finds its CI targets and returns one JSON record per
# target. Forcing `drvPath` writes each .drv to the store; nothing is built,
# because every store path leaves this file with its string context removed.
{
  # Absolute path of the depot's root folder (holding its default.nix).
  depotPathStr,
  # Evaluate only slice `shardIndex` of `shardCount` equal slices of the
  # target list. drvkite's workers and its error narrowing use this.
  shardIndex ? 0,
  shardCount ? 1,
  # When non-null: a JSON list; evaluate only the targets with these labels.
  onlyLabelsJSON ? null,
  # "full": everything later stages need; "labels": labels and attribute
  # paths only, which is cheap and forces no derivation.
  mode ? "full",
  # Catch what builtins.tryEval can catch per target, so one broken target
  # does not take the others down.
  catchErrors ? true,
  # JSON list of names: the attribute path of the depot's pipeline settings.
  settingsAttrJSON ? ''["ci","drvkite"]'',
  # Print `trace: drvkite:total N` once and `trace: drvkite:done` after
  # each target, which drvkite reads live from stderr to show progress.
  progress ? false,
  # When non-null (full mode only): print each record on stderr as soon as
  # it is evaluated, as `trace: drvkite:<tag>:ok <index> <JSON>` (or
  # `:failed` with its label and attribute path), and leave `null` in its
  # place in `targets`. drvkite parses records and reads their .drv files
  # while Nix goes on with the next targets. The tag, random per run,
  # keeps a depot's own traces from passing for records.
  streamTag ? null,
  # When non-null: a JSON list of names, the depot attribute that lists
  # the targets (--targets-attr). Else the depot's `targetsAttr` setting,
  # else `ci.targets`; a missing `ci.targets` means drvkite's own gather.
  targetsAttrJSON ? null,
  # When non-null: a JSON object mapping folders to names that readDir
  # must not show, so the depot is evaluated as if those files (broken
  # readTree nodes) were deleted. See `masked` below.
  maskJSON ? null,
  # When non-null: a JSON object; walk the readTree nodes instead of
  # listing targets (see `walk` below). `resume`: the node after which to
  # start (null: from the root); `only`: probe just this node.
  walkJSON ? null,
}:

let
  inherit (builtins)
    attrNames
    concatMap
    filter
    foldl'
    genList
    getAttr
    hasAttr
    isAttrs
    isFunction
    isList
    length
    listToAttrs
    mapAttrs
    tryEval
    typeOf
    unsafeDiscardStringContext
    ;

  readTree = import ./readTree { };

  depotPath = /. + depotPathStr;
  onlyLabels = if onlyLabelsJSON == null then null else builtins.fromJSON onlyLabelsJSON;
  settingsAttr = builtins.fromJSON settingsAttrJSON;

  # Masking: the depot as if some files were deleted. readTree lists a
  # folder with readDir; every file the depot imports (through `import`,
  # `scopedImport` or `builtins`) is given a readDir that leaves the masked
  # names out, so its readTree, wherever it comes from, never sees them.
  # Only runs after a broken node was found do this: it bypasses Nix's
  # import cache. Files imported with scopedArgs keep them, and the files
  # those import get the normal builtins, as without masking.
  mask = if maskJSON == null then null else builtins.fromJSON maskJSON;
  realBuiltins = builtins;
  maskedReadDir =
    p:
    let
      entries = realBuiltins.readDir p;
      hidden = mask.${toString p} or null;
    in
    if hidden == null then entries else removeAttrs entries hidden;
  scopeOver =
    base:
    let
      over = base // {
        import = maskedImport;
        scopedImport = maskedScopedImport;
        readDir = maskedReadDir;
        builtins = over;
      };
    in
    {
      import = maskedImport;
      scopedImport = maskedScopedImport;
      __readDir = maskedReadDir;
      builtins = over;
    };
  plainScope = scopeOver realBuiltins;
  maskedImport = realBuiltins.scopedImport plainScope;
  maskedScopedImport =
    args: realBuiltins.scopedImport (args // scopeOver (args.builtins or realBuiltins));

  imported = if mask == null then import depotPath else maskedImport depotPath;
  depot = if isFunction imported then imported { } else imported;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  # TVL's rule (the depot's `eligible` in its root default.nix): anything
  # with an outPath, unless skipped, or marked broken and not un-skipped.
  eligible = t: (t ? outPath) && !(t.meta.ci.skip or (t.meta.broken or false));

  settingsPath = foldl' (acc: n: if acc != null && isAttrs acc && hasAttr n acc then getAttr n acc else null) depot settingsAttr;

  # The attribute that lists the targets: --targets-attr, else the depot's
  # `targetsAttr` setting, else ci.targets. Only a chosen one must exist.
  chosenAttr =
    if targetsAttrJSON != null then
      {
        path = builtins.fromJSON targetsAttrJSON;
        how = "--targets-attr";
      }
    else if isAttrs settingsPath && settingsPath ? targetsAttr then
      {
        path = builtins.filter builtins.isString (builtins.split "\\." settingsPath.targetsAttr);
        how = "the targetsAttr setting";
      }
    else
      null;
  targetsAttr = if chosenAttr == null then [ "ci" "targets" ] else chosenAttr.path;
  targetsAttrName = builtins.concatStringsSep "." targetsAttr;
  lastName = builtins.elemAt targetsAttr (length targetsAttr - 1);
  listHolder = foldl' (acc: n: if acc != null && isAttrs acc && hasAttr n acc then getAttr n acc else null) depot (
    genList (builtins.elemAt targetsAttr) (length targetsAttr - 1)
  );
  hasCiTargets =
    isAttrs depot && listHolder != null && isAttrs listHolder && hasAttr lastName listHolder;
  # Checked before anything is gathered: naming a list that is not there is
  # the caller's mistake, not a broken node.
  listAttrChecked =
    if chosenAttr != null && !hasCiTargets then
      throw "the depot has no attribute ${targetsAttrName} (named by ${chosenAttr.how}): check the name, or define it in the depot's default.nix"
    else
      true;
  depotList =
    let
      l = getAttr lastName listHolder;
    in
    if isList l then
      l
    else
      throw "the depot's ${targetsAttrName} is a ${typeOf l}, not a list of targets: make it a list (e.g. readTree.gather eligible depot)";

  allTargets =
    assert listAttrChecked;
    if hasCiTargets then depotList else readTree.gather eligible depot;

  # Streaming runs say when the list is whole: a run that dies before is
  # the list's failure, not a target's.
  total =
    let
      n = length allTargets;
    in
    if stream then builtins.seq n (builtins.trace "drvkite:${streamTag}:listed" n) else n;

  # Slice boundaries: shard i of n covers [total*i/n, total*(i+1)/n), so
  # splitting shard (i, n) into (2i, 2n) and (2i+1, 2n) halves it exactly.
  from = total * shardIndex / shardCount;
  to = total * (shardIndex + 1) / shardCount;
  sliced = genList (i: builtins.elemAt allTargets (from + i)) (to - from);

  labelOf = t: readTree.mkLabel t;
  attrPathOf = t: t.__readTree ++ (if t ? __subtarget then [ t.__subtarget ] else [ ]);

  selected =
    if onlyLabels == null then
      sliced
    else
      let
        wanted = listToAttrs (
          map (l: {
            name = l;
            value = true;
          }) onlyLabels
        );
      in
      filter (t: hasAttr (labelOf t) wanted) sliced;

  # JSON-safe copy of user data: derivations become their path, functions
  # are dropped (JSON has no place for them), context is removed.
  #
  # A set with an `outPath` becomes that, as JSON printing would show it:
  # deepSeq (in `record`) then forces no more than printing does.
  plain =
    v:
    if isDerivation v then
      unsafeDiscardStringContext v.outPath
    else if isAttrs v then
      let
        kept = filterFunctions v;
      in
      if kept ? outPath then plain kept.outPath else mapAttrs (_: plain) kept
    else if isList v then
      map plain v
    else if typeOf v == "string" then
      unsafeDiscardStringContext v
    else
      v;
  filterFunctions =
    a:
    listToAttrs (
      concatMap (
        n:
        if isFunction a.${n} then
          [ ]
        else
          [
            {
              name = n;
              value = a.${n};
            }
          ]
      ) (attrNames a)
    );

  drvPathOf = d: unsafeDiscardStringContext d.drvPath;

  commandRecord =
    c:
    if isDerivation c then
      {
        drvPath = drvPathOf c;
        outputs = c.outputs or [ "out" ];
      }
    else
      { notADerivation = typeOf c; };

  extraStepRecord =
    parent: name: s:
    if !isAttrs s then
      {
        inherit name;
        notAnAttrset = typeOf s;
      }
    else
      {
        inherit name;
        options = attrNames s;
        command = if s ? command then commandRecord s.command else null;
        # The parent as parentOverride changes it (checked here: calling a
        # non-function would abort the whole evaluation).
        parentOverride =
          if !(s ? parentOverride) then
            null
          else if !isFunction s.parentOverride then
            { notAFunction = typeOf s.parentOverride; }
          else
            commandRecord (s.parentOverride parent);
        # A function where data belongs becomes a marker drvkite reports
        # by name: JSON cannot hold it, and toJSON's error cannot be caught.
        values = mapAttrs (_: v: if isFunction v then { __drvkiteFunction = true; } else plain v) (
          removeAttrs s [
            "command"
            "parentOverride"
          ]
        );
      };

  stream = streamTag != null && mode != "labels";

  record =
    i: t:
    let
      meta = t.meta or { };
      ci = meta.ci or { };
      base = {
        label = labelOf t;
        attrPath = attrPathOf t;
      };
      # One set, not `base // {…}`: no second set per target.
      full = {
        inherit (base) label attrPath;
        drvPath = drvPathOf t;
        outputs = t.outputs or [ "out" ];
        timeout = meta.timeout or null;
        extraDeps = if ci ? buildkiteExtraDeps then plain ci.buildkiteExtraDeps else [ ];
        extraStepArgs = if ci ? buildkiteExtraStepArgs then plain ci.buildkiteExtraStepArgs else null;
        extraSteps = if ci ? extraSteps then mapAttrs (extraStepRecord t) ci.extraSteps else { };
      };
      # What printing the record will force, forced here so tryEval sees
      # its errors. When streaming, the JSON text is what is printed; else
      # deepSeq: the same values (see `plain`) without building a string
      # per target that is thrown away.
      forced = if stream then builtins.toJSON full else builtins.deepSeq full full;
      caught = tryEval forced;
      ok = !catchErrors || caught.success;
      result =
        if mode == "labels" then
          base
        else if ok then
          forced
        else
          base // { failed = true; };
    in
    if stream then
      builtins.trace (
        if ok then
          "drvkite:${streamTag}:ok ${toString i} ${forced}"
        else
          "drvkite:${streamTag}:failed ${toString i} ${builtins.toJSON base}"
      ) null
    # Forcing `result` evaluates the target first, so the trace follows it.
    else if progress && mode != "labels" then
      builtins.trace "drvkite:done" result
    else
      result;

  records = genList (i: record i (builtins.elemAt selected i)) (length selected);

  # A settings file in the depot gets readTree's markers: not settings.
  settingsValue =
    if settingsPath == null then
      null
    else
      plain (
        if isAttrs settingsPath then
          removeAttrs settingsPath [
            "__readTree"
            "__readTreeChildren"
          ]
        else
          settingsPath
      );

  # The node walk, run when the target list fails to evaluate: visit
  # every readTree node as `gather` does (the node, then its children in
  # name order) and force what gather forces (TVL's eligibility, the
  # children's names, the subtargets), tracing `node <path>` before each.
  # A run that dies names its broken node by its last trace; drvkite hides
  # that node's file and resumes after it. No tryEval: it would say only
  # that a node failed, and getting Nix's message takes a run anyway.
  walkSpec = builtins.fromJSON walkJSON;
  # `node`: probed here; `pass`: only passed through on the way.
  walkTrace =
    kind: parts: builtins.trace "drvkite:${streamTag}:${kind} ${builtins.toJSON parts}";
  probe =
    n:
    let
      names = (n.meta.targets or [ ]) ++ (n.meta.ci.targets or [ ]);
      subtargets = map (k: eligible ((n.${k} or { }) // { })) names;
    in
    builtins.deepSeq [
      (eligible n)
      n.__readTreeChildren
      subtargets
    ] true;
  isNode = v: isAttrs v && v ? __readTree;
  # Nodes after `resume` in that order get probed; those before it are
  # only passed through on the way (parts is always a prefix of resume),
  # traced too: hiding a file may break a node that was fine before.
  walkFrom =
    parts: value: resume:
    let
      fresh = resume == null;
      node = walkTrace (if fresh then "node" else "pass") parts value;
      next = if fresh || resume == parts then null else builtins.elemAt resume (length parts);
      later = c: next == null || !(builtins.lessThan c next);
      childResume = c: if c == next then resume else null;
    in
    if !(isNode node) then
      true
    else
      builtins.seq (if fresh then probe node else true) (
        foldl' (acc: c: builtins.seq acc (walkFrom (parts ++ [ c ]) node.${c} (childResume c))) true (
          filter later node.__readTreeChildren
        )
      );
  # Probe one node only (it may have vanished: then nothing is wrong).
  walkTo =
    parts: value: target:
    let
      here = length parts == length target;
      node = walkTrace (if here then "node" else "pass") parts value;
      c = builtins.elemAt target (length parts);
    in
    if !(isNode node) then
      true
    else if here then
      probe node
    else if builtins.elem c node.__readTreeChildren then
      walkTo (parts ++ [ c ]) node.${c} target
    else
      true;
  # Errors before `begin` are outside every node: the depot's root, its
  # readTree, the settings, the named target list.
  walked = builtins.seq depot (
    builtins.deepSeq settingsValue (
      builtins.seq listAttrChecked (
        builtins.trace "drvkite:${streamTag}:begin" (
          if walkSpec.only or null != null then
            walkTo [ ] depot walkSpec.only
          else
            walkFrom [ ] depot (walkSpec.resume or null)
        )
      )
    )
  );
in
if walkJSON != null then
  { inherit walked; }
else
  {
    inherit total hasCiTargets;
    targets =
      if progress then
        builtins.trace "drvkite:total ${toString total}" records
      else
        records;
    # Labels mode has them too: a shard that fails is listed in that mode,
    # and broken settings must then fail the run rather than the targets.
    settings = if shardIndex == 0 then settingsValue else null;
  }
