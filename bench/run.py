#!/usr/bin/env python3
"""Benchmark driver: `scripts/bench.sh` runs it; see there for usage.

    bench/run.py --drvkite BIN [--runs N] SIZE...

For each size: generate a fresh synthetic depot (new salt, so no .drv of it
is in the store yet), then measure the floor (bench/floor.nix) and
`drvkite pipeline` on it, alternating, and print one Markdown table.

With `--skip-cached` (bench.sh's default), a third command runs `drvkite
pipeline --skip-cached` against a loopback HTTP binary cache that has every
other target's outputs, with narinfos signed by Nix
(bench/binary_cache.py); a line below the table gives the check's time
beside the evaluation's, from drvkite's own stage times.

Every command runs once as a warm-up (which also writes the depot's .drv
files to the store, so each measured run sees the same warm store) and then
N times measured (default 3); the table shows
the best measured wall time and, from that same run, the CPU time (user +
system, whole process tree) and the peak RSS.
"""

import argparse
import contextlib
import json
import os
import re
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import binary_cache  # noqa: E402

SKIPPED = re.compile(r"(\d+) cached, ")
STAGES = re.compile(
    r"evaluation ([0-9.]+)s, .*binary cache check ([0-9.]+)s \(([0-9.]+)s after evaluation\)"
)


def measure(cmd, env=None):
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        res = subprocess.run(
            [sys.executable, os.path.join(HERE, "measure.py"), "--out", f.name, "--"] + cmd,
            env=env,
        )
        if res.returncode != 0:
            sys.exit(f"bench: failed: {' '.join(cmd)}")
        return json.load(f)


def has_workers_flag(drvkite):
    out = subprocess.run([drvkite, "pipeline", "--help"], capture_output=True, text=True)
    return "--workers" in out.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--drvkite", required=True)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated depots")
    ap.add_argument(
        "--skip-cached",
        action="store_true",
        help="also measure --skip-cached against a loopback binary cache",
    )
    ap.add_argument("sizes", type=int, nargs="+")
    args = ap.parse_args()

    workers = has_workers_flag(args.drvkite)
    work = tempfile.mkdtemp(prefix="drvkite-bench-")
    rows = []
    checks = []
    try:
        for size in args.sizes:
            depot = os.path.join(work, f"depot-{size}")
            salt = f"{time.time_ns()}-{os.getpid()}-{size}"
            gen = subprocess.run(
                [sys.executable, os.path.join(HERE, "gen-depot.py"), depot, str(size), "--salt", salt],
                capture_output=True,
                text=True,
                check=True,
            )
            stats = json.loads(gen.stdout)
            out = os.path.join(work, f"pipeline-{size}")
            tools = {
                "floor": [
                    "nix-instantiate",
                    "--eval",
                    "--strict",
                    "--json",
                    "--read-write-mode",
                    os.path.join(HERE, "floor.nix"),
                    "--argstr",
                    "depotPathStr",
                    depot,
                ],
                "drvkite": [args.drvkite, "pipeline", "--depot", depot, "--out", out],
            }
            if workers:
                tools["drvkite --workers 2"] = tools["drvkite"] + ["--workers", "2"]
            envs = {}
            runs = args.runs or 3
            best = {}
            for name, cmd in tools.items():
                measure(cmd)  # warm-up
            with contextlib.ExitStack() as stack:
                if args.skip_cached:
                    # The warm-up wrote drvmap.json: the cache holds every
                    # other target's outputs.
                    cache, key, cached, total = binary_cache.make(
                        os.path.join(work, f"cache-{size}"), os.path.join(out, "drvmap.json")
                    )
                    server = stack.enter_context(binary_cache.Server(cache))
                    name = "drvkite --skip-cached"
                    tools[name] = tools["drvkite"] + ["--skip-cached"]
                    envs[name] = dict(
                        os.environ,
                        NIX_CONFIG=f"substituters = {server.url}\ntrusted-public-keys = {key}",
                    )
                    measure(tools[name], envs[name])  # warm-up
                # Alternate the tools so drift on a shared machine hits all alike.
                for _ in range(runs):
                    for name, cmd in tools.items():
                        r = measure(cmd, envs.get(name))
                        if name not in best or r["wall"] < best[name]["wall"]:
                            best[name] = r
            if args.skip_cached:
                tail = best["drvkite --skip-cached"]["stderr_tail"]
                m, skipped = STAGES.search(tail), SKIPPED.search(tail)
                if m and skipped:
                    evaluation, check, after = (float(x) for x in m.groups())
                    checks.append(
                        (size, int(skipped.group(1)), cached, total, evaluation, check, after)
                    )
            floor = best["floor"]
            for name in tools:
                r = best[name]
                rows.append(
                    (
                        size,
                        stats["extraSteps"],
                        name,
                        r["wall"],
                        r["cpu"],
                        r["rss_kb"] / 1024,
                        r["wall"] / floor["wall"],
                        r["rss_kb"] / floor["rss_kb"],
                    )
                )
            shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(depot, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)

    print("| targets | extra steps | command | wall s | CPU s | peak RSS MB | wall ÷ floor | RSS ÷ floor |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for size, extra, name, wall, cpu, mb, wr, rr in rows:
        print(f"| {size} | {extra} | {name} | {wall:.2f} | {cpu:.2f} | {mb:.0f} | {wr:.2f} | {rr:.2f} |")
    if not workers:
        print("(drvkite has no --workers flag yet: that row is left out)")
    for size, skipped, cached, total, evaluation, check, after in checks:
        print(
            f"--skip-cached at {size} targets: {skipped} skipped as cached "
            f"({cached} of {total} derivations' outputs in the cache); "
            f"check {check:.2f} s while evaluation took {evaluation:.2f} s; "
            f"{after:.3f} s after it = {100 * after / evaluation:.1f}% of evaluation"
        )
    print(f"machine: {machine()}")


def machine():
    cpu = "unknown CPU"
    mem = "? GB"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GB RAM"
                    break
    except OSError:
        pass
    nix = subprocess.run(["nix-instantiate", "--version"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} cores, {cpu}, {mem}, {platform.system()} {platform.release()}, {nix}"


if __name__ == "__main__":
    main()
