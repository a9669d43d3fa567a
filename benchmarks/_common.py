"""Shared plumbing of the benchmarks: CLI, thread pinning, result lines, Ray start-up (the memory and CPU
sampler is ``benchmarks.memory``).

Every benchmark module is runnable on its own (``python -m benchmarks.bench_train --help``) and is what the
runner starts in a fresh subprocess. A module defines ``NAME``, ``add_args(parser)``, ``quick(args)`` (shrink
sizes for ``--quick``) and ``run(args) -> dict``, and calls ``main(module)``; the dict it returns is made by
``result(...)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

GOAL_SYMBOL = {">=": "≥", "<=": "≤", "==": "=", "<": "<"}


# -- threads ------------------------------------------------------------------------------------------------
def pin_threads(threads: int) -> None:
    """Same intra-op thread count everywhere: this process (torch) and every Ray worker it starts.

    Ray sets OMP_NUM_THREADS = the CPUs a worker was granted (1 for a Train worker or a Serve replica) only when
    the variable is unset; exporting it before Ray starts makes every Ray process inherit this value instead,
    so the Ray side and the plain-PyTorch baseline run with the same number of threads.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("ray", "ray.data", "ray.train", "ray.serve", "deepspeed", "DeepSpeed", "transformers", "qpo_ray",
                 "filelock", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def start_ray() -> None:
    """Ray exactly as the driver starts it (qpo_ray.ray_init.init_ray), progress bars off."""
    import ray

    from qpo_ray.ray_init import init_ray

    for attempt in range(3):  # on a busy machine the local node can time out while starting
        try:
            init_ray()
            break
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"[bench] Ray did not start ({e}); retrying", file=sys.stderr, flush=True)
            ray.shutdown()
            time.sleep(5)
    ray.data.DataContext.get_current().enable_progress_bars = False


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
    _wait_for_children(timeout=15.0)


def _wait_for_children(timeout: float) -> None:
    """Until the processes this one started (Ray's, once it is shut down) have exited: a measurement right
    after ``stop_ray`` would otherwise share the cores with a session winding down."""
    import psutil

    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=timeout)


def ray_worker_threads() -> dict[str, Any]:
    """What a 1-CPU Ray actor (like a Train worker or a Serve replica) gets: OMP_NUM_THREADS and torch threads."""
    import ray

    @ray.remote(num_cpus=1)
    class _Probe:
        def threads(self):
            import os

            import torch

            return {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}

    probe = _Probe.remote()
    try:
        return ray.get(probe.threads.remote(), timeout=120)
    finally:
        ray.kill(probe)


# -- results ------------------------------------------------------------------------------------------------
def passes(ratio: float, goal: float, op: str) -> bool:
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return False
    return {">=": ratio >= goal, "<=": ratio <= goal, "==": ratio == goal, "<": ratio < goal}[op]


def result(name: str, *, ratio: float, goal: float, op: str, ours: float, baseline: float, units: str,
           raw: dict[str, Any], limited_by: str, notes: list[str] | None = None, ok: bool | None = None,
           goal_text: str | None = None, limit: float | None = None, limit_goal: float | None = None,
           limit_what: str = "") -> dict[str, Any]:
    """One benchmark's result. ``limited_by``: one line on what bounds ours (measured, not guessed).

    ``limit`` is the second baseline of a throughput benchmark: the same work done the plainest fast way
    (no Ray, no Serve), i.e. how far ours is from what the machine can do; ``limit_ratio = ours / limit``
    must reach ``limit_goal`` as well for ``ok``."""
    res = {"name": name, "ratio": ratio, "goal": goal, "goal_op": op,
           "goal_text": goal_text or f"{GOAL_SYMBOL[op]} {_goal(goal)}",
           "ok": passes(ratio, goal, op) if ok is None else bool(ok), "ours": ours, "baseline": baseline,
           "units": units, "limited_by": limited_by, "raw": raw, "notes": notes or []}
    if limit is not None and limit_goal is not None:
        limit_ratio = ours / limit if limit else float("nan")
        res.update(limit=limit, limit_what=limit_what, limit_ratio=limit_ratio, limit_goal=limit_goal,
                   limit_goal_op=">=", limit_goal_text=f"≥ {_goal(limit_goal)}")
        res["ok"] = res["ok"] and passes(limit_ratio, limit_goal, ">=")
    return res


def _goal(g: float) -> str:
    return f"{g:g}" if g == int(g) else f"{g:.2f}"


def num(x: Any) -> str:
    if not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int) or x == 0:
        return str(int(x))
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def line(res: dict[str, Any]) -> str:
    """``NAME: ratio=X.XX (goal ≥ G) | ours=… baseline=… units``"""
    return (f"{res['name']}: ratio={res['ratio']:.2f} (goal {res['goal_text']}) | ours={num(res['ours'])} "
            f"baseline={num(res['baseline'])} {res['units']}")


def limit_line(res: dict[str, Any]) -> str | None:
    """``vs limit: ours/limit=X.XX (goal ≥ G) | limit=… units (what)`` for a benchmark with a second baseline."""
    if "limit_ratio" not in res:
        return None
    return (f"vs limit: ours/limit={res['limit_ratio']:.2f} (goal {res['limit_goal_text']}) | "
            f"limit={num(res['limit'])} {res['units']} ({res['limit_what']})")


def raw_lines(res: dict[str, Any]) -> list[str]:
    out = [f"    {x}" for x in (limit_line(res),) if x]
    if res.get("limited_by"):
        out.append(f"    limited by: {res['limited_by']}")
    for k, v in res["raw"].items():
        if isinstance(v, float):
            v = round(v, 4)
        out.append(f"    {k}: {json.dumps(v, default=str) if isinstance(v, dict | list) else v}")
    out += [f"    note: {n}" for n in res["notes"]]
    return out


# -- CLI ----------------------------------------------------------------------------------------------------
def main(name: str, add_args: Callable[[argparse.ArgumentParser], None], quick: Callable[[argparse.Namespace], None],
         run: Callable[[argparse.Namespace], dict[str, Any]], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.bench_{name}")
    parser.add_argument("--quick", action="store_true", help="smallest sizes (smoke test)")
    parser.add_argument("--threads", type=int,
                        default=int(os.environ.get("QPO_BENCH_THREADS", 0)) or (os.cpu_count() or 1),
                        help="torch intra-op threads on both sides (default: all cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the result dict here")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    add_args(parser)
    args = parser.parse_args(argv)
    if args.quick:  # --quick shrinks the defaults; sizes given explicitly still win
        small = parser.parse_args([])
        quick(small)
        parser.set_defaults(**{k: v for k, v in vars(small).items() if k != "quick"})
        args = parser.parse_args(argv)
    quiet()
    pin_threads(args.threads)
    t0 = time.time()
    try:
        res = run(args)
    except Exception as e:  # one line for the table; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        res = {"name": name, "error": f"{type(e).__name__}: {e}", "ok": False}
    res["seconds"] = round(time.time() - t0, 1)
    res.setdefault("raw", {})["threads"] = args.threads
    if "error" in res:
        print(f"{name}: ERROR {res['error']}", flush=True)
    else:
        print(line(res), flush=True)
        print("\n".join(raw_lines(res)), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    return 0 if "error" not in res else 1


def workdir(args: argparse.Namespace, tag: str):
    """A scratch folder: ``--workdir/tag`` (kept) or a temp dir removed at exit."""
    import tempfile
    from contextlib import nullcontext

    if args.workdir is not None:
        d = Path(args.workdir) / tag
        d.mkdir(parents=True, exist_ok=True)
        return nullcontext(str(d))
    return tempfile.TemporaryDirectory(prefix=f"qpo-bench-{tag}-")


def emotion_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` realistic (query, prompt, label) rows from the emotion task (its queries × its prompt pool)."""
    return task_pairs("emotion", n, seed)


def task_pairs(task_name: str, n: int, seed: int = 0,
               fits: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """``n`` distinct (query, prompt, label) rows of a task (its queries × its prompt pool), shuffled; only
    prompts for which ``fits`` holds (e.g. within the policy's prompt budget, so training drops no row)."""
    import random

    from qpo_ray.tasks import load_task

    task = load_task(task_name)
    ps = [t for _, t in task.prompts if fits is None or fits(t)]
    combos = [(q, lab, p) for q, lab in task.queries() for p in ps]
    random.Random(seed).shuffle(combos)
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} distinct {task_name} pairs, {n} asked")
    return [{"query": q, "label": lab, "prompt": p} for q, lab, p in combos[:n]]


def smollm2_available() -> bool:
    try:
        from qpo_ray.pretrained import smollm2_gguf

        smollm2_gguf()
        return True
    except Exception:
        return False


def host_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    try:
        from importlib import metadata

        for pkg in ("ray", "torch", "deepspeed", "transformers"):
            info[pkg] = metadata.version(pkg)
    except Exception:
        pass
    return info
