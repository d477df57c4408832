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

  imported = import depotPath;
  depot = if isFunction imported then imported { } else imported;

  isDerivation = v: isAttrs v && (v.type or null) == "derivation";

  eligible = t: isDerivation t && !(t.meta.ci.skip or false) && !(t.meta.broken or false);

  hasCiTargets = isAttrs depot && depot ? ci && isAttrs depot.ci && depot.ci ? targets;

  allTargets = if hasCiTargets then depot.ci.targets else readTree.gather eligible depot;

  total = length allTargets;

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

  settingsPath = foldl' (acc: n: if acc != null && isAttrs acc && hasAttr n acc then getAttr n acc else null) depot settingsAttr;
in
{
  inherit total hasCiTargets;
  targets =
    if progress then
      builtins.trace "drvkite:total ${toString total}" records
    else
      records;
  # A settings file in the depot gets readTree's markers: not settings.
  # Labels mode has them too: a shard that fails is listed in that mode,
  # and broken settings must then fail the run rather than the targets.
  settings =
    if shardIndex == 0 && settingsPath != null then
      plain (
        if isAttrs settingsPath then
          removeAttrs settingsPath [
            "__readTree"
            "__readTreeChildren"
          ]
        else
          settingsPath
      )
    else
      null;
}
