#!/usr/bin/env python3
"""Run one command; print its wall time and the peak RSS of its process tree.

    bench/measure.py [--out FILE] -- COMMAND ARGS...

Prints (or writes to FILE) one JSON object: {"wall": seconds, "cpu": user +
system seconds of the tree, "rss_kb": kB, "status": exit status,
"stderr_tail": the last 2,000 bytes of stderr}. The command's stdout goes to
/dev/null; its stderr is kept and printed when it fails.

Peak RSS of the *tree*, sampled: every ~20 ms the helper walks the command's
descendants through /proc/<pid>/task/<tid>/children and sums their VmRSS.
getrusage(RUSAGE_CHILDREN).ru_maxrss alone would be wrong here: it is the
largest RSS of any *single* finished descendant, so drvkite running two
nix-instantiate workers at once would report one worker's memory, not both.
Sampling can miss a peak shorter than the interval; nix-instantiate's RSS
only grows (its garbage collector keeps the heap it took), so its peak is
its last sample. The result is the larger of the sampled sum and
ru_maxrss, which is a lower bound of the true peak either way.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

INTERVAL = 0.02


def children(pid):
    """Direct children of pid (every thread's list)."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_rss(root):
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += rss_kb(pid)
        todo.extend(children(pid))
    return total


def main():
    args = sys.argv[1:]
    out_file = None
    if args[:1] == ["--out"]:
        out_file, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: measure.py [--out FILE] -- COMMAND ARGS...")
    started = time.monotonic()
    # stderr goes to a file: a pipe nobody reads could fill and stall the command.
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(INTERVAL)
    wall = time.monotonic() - started
    err.seek(0)
    stderr = err.read()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = max(peak, usage.ru_maxrss)
    # CPU time (user + system) of the whole tree: steadier than wall time
    # on a machine shared with other work.
    cpu = usage.ru_utime + usage.ru_stime
    result = {
        "wall": round(wall, 3),
        "cpu": round(cpu, 3),
        "rss_kb": peak,
        "status": proc.returncode,
        # The end of stderr, where drvkite prints its stage times.
        "stderr_tail": stderr[-2000:].decode(errors="replace"),
    }
    if proc.returncode != 0:
        sys.stderr.write(stderr.decode(errors="replace"))
    text = json.dumps(result)
    if out_file:
        with open(out_file, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    sys.exit(0 if proc.returncode == 0 else 1)


if __name__ == "__main__":
    main()
