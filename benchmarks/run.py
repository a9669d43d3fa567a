"""Run the benchmarks, each in a fresh subprocess, and write ``benchmarks/results/latest.json``.

    python -m benchmarks.run                          # everything, default sizes (what `make bench` runs)
    python -m benchmarks.run --only train,score --quick
    python -m benchmarks.run --only stream --stream-args="--rows 300000"

Each benchmark prints ``NAME: ratio=X.XX (goal ≥ G) | ours=… baseline=… units``, its ratio to the machine's
limit where it has one, one line on what limits it, and its raw figures; the runner ends with a table. A
benchmark's full log (Ray, Serve, DeepSpeed chatter) goes to ``benchmarks/results/<name>.log``. Exit status:
0 when every benchmark ran (goals met or not; the table says), 1 when one crashed or timed out, or with
``--strict`` when a goal was missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import host_info, line, raw_lines

BENCHMARKS = ("train", "score", "collect", "stream", "dedupe", "serve")
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smallest sizes (smoke test, seconds per benchmark)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads on both sides of every comparison (default: all cores)")
    p.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="results JSON")
    p.add_argument("--logs", type=Path, default=None, help="folder of per-benchmark logs (default: next to --out)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark before it is killed")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every benchmark process and the Ray sessions they start, "
                        "e.g. RAY_DATA_USE_DATASOURCE_V2=0 to try a setting (repeatable)")
    for name in BENCHMARKS:
        p.add_argument(f"--{name}-args", default="", metavar="ARGS",
                       help=f"extra arguments for benchmarks.bench_{name} (see its --help); write "
                            f"--{name}-args=\"--opt value\" (with '=') since they start with '--'")
    args = p.parse_args(argv)
    args.selected = [b.strip() for b in args.only.split(",") if b.strip()]
    bad = [e for e in args.env if "=" not in e]
    if bad:
        p.error(f"--env takes KEY=VALUE, got {bad}")
    unknown = [b for b in args.selected if b not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    return args


def run_one(name: str, args: argparse.Namespace, logs: Path) -> dict:
    out = logs / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--json", str(out), "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    cmd += shlex.split(getattr(args, f"{name}_args"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", **dict(e.split("=", 1) for e in args.env))
    log_path = logs / f"{name}.log"
    t0 = time.time()
    print(f"[bench] {name}: running ({' '.join(cmd[1:])}), log: {log_path}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout,
                                  cwd=Path(__file__).resolve().parent.parent)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    elapsed = round(time.time() - t0, 1)
    if out.exists():
        res = json.loads(out.read_text(encoding="utf-8"))
        out.unlink()
    elif rc is None:
        res = {"name": name, "error": f"timed out after {args.timeout}s", "ok": False}
    else:
        res = {"name": name, "error": f"exited {rc} without a result (see {log_path})", "ok": False}
    res["wall_s"] = elapsed
    res["log"] = str(log_path)
    return res


def table(results: dict[str, dict]) -> str:
    from benchmarks._common import num

    head = ("benchmark", "ratio", "goal", "ours", "baseline", "vs limit", "status", "time")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "-", "-", "-", "-", "-", "ERROR", f"{r['wall_s']:.0f}s"))
            continue
        vs_limit = f"{r['limit_ratio']:.2f} ({r['limit_goal_text']})" if "limit_ratio" in r else "-"
        rows.append((name, f"{r['ratio']:.2f}", r["goal_text"], num(r["ours"]), num(r["baseline"]), vs_limit,
                     "ok" if r["ok"] else "MISS", f"{r['wall_s']:.0f}s"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    for n, r in results.items():
        if "units" in r:
            limit = f"; limit = {r['limit_what']}" if "limit_what" in r else ""
            out.append(f"  {n}: {r['units']}{limit}")
    out += [f"  {n} limited by: {r['limited_by']}" for n, r in results.items() if r.get("limited_by")]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs = args.logs or args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.time()
    results: dict[str, dict] = {}
    for name in args.selected:
        res = run_one(name, args, logs)
        results[name] = res
        if "error" in res:
            print(f"{name}: ERROR {res['error']}", flush=True)
        else:
            print(line(res), flush=True)
            print("\n".join(raw_lines(res)), flush=True)
    doc = {"started": started, "wall_s": round(time.time() - t0, 1), "quick": args.quick, "threads": args.threads,
           "env": args.env, "host": host_info(), "argv": sys.argv[1:], "results": results}
    args.out.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    print()
    print(table(results))
    print(f"\nresults: {args.out} ({doc['wall_s']:.0f}s)")
    crashed = any("error" in r for r in results.values())
    missed = any(not r.get("ok") for r in results.values())
    return 1 if crashed or (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
