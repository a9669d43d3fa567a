"""Shared plumbing of the benchmarks: CLI, thread pinning, result lines, an RSS sampler, Ray start-up.

Every benchmark module is runnable on its own (``python -m benchmarks.bench_train --help``) and is what the
runner starts in a fresh subprocess. A module defines ``NAME``, ``add_args(parser)``, ``quick(args)`` (shrink
sizes for ``--quick``) and ``run(args) -> dict``, and calls ``main(module)``; the dict it returns is made by
``result(...)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
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


# -- memory -------------------------------------------------------------------------------------------------
class RssSampler:
    """Samples the memory of this process and of all its descendants (the Ray session it started: GCS,
    raylet, workers, actors) every ``interval`` seconds in a background thread.

    Keeps the peak RSS of the driver, the peak RSS of any single other process, and the peaks of the sum over
    all processes at one sample: of RSS (an upper bound: pages shared between processes, such as the object
    store or libtorch, count once per process) and of PSS (shared pages split between their users: the
    memory the session really occupies). Peaks are also kept per phase (``mark``). ``watch`` (substring of a
    process name) records the OMP_NUM_THREADS of matching processes (e.g. ``RayTrainWorker``).

    With ``cpu``, it also keeps each process's CPU time (user + system) at its first and its last sample, so
    ``cpu_seconds`` can say which processes took the cores while the sampler ran (a process seen only after
    the first sample started after it: its whole CPU time counts).
    """

    def __init__(self, interval: float = 0.5, watch: str | None = None, pss: bool = True, cpu: bool = False):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval = interval
        self.watch = watch
        self.pss = pss
        self.watched: dict[int, dict[str, Any]] = {}
        self.driver_peak = 0
        self.driver_uss_peak = 0
        self.worker_uss_peak = 0
        self.worker_peak = 0
        self.worker_peak_name = ""
        self.rss_sum_peak = 0
        self.pss_sum_peak = 0
        self.max_procs = 0
        self.samples = 0
        self.at_peak: list[tuple[str, int]] = []  # (process, PSS) at the sample of the peak Σ PSS
        self.phase = "start"
        self.phases: dict[str, dict[str, int]] = {}
        self.cpu = cpu
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._cpu_names: dict[int, set[str]] = {}  # every title a process had: Ray workers rename themselves
        self._started = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.sample()
        self._started = True
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    @staticmethod
    def _name(p) -> str:
        # Not cached: a prestarted Ray worker ("ray::IDLE") renames itself when it becomes an actor.
        try:
            cmd = p.cmdline()
            return (cmd[0] if cmd else p.name())[:80]
        except Exception:
            return "?"

    def _mem(self, p) -> tuple[int, int, int]:
        """RSS, PSS and USS (private pages only) of one process; PSS = USS = RSS when ``pss`` is off."""
        if self.pss:
            m = p.memory_full_info()
            return m.rss, m.pss, m.uss
        rss = p.memory_info().rss
        return rss, rss, rss

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def _sample(self) -> None:
        ps = self.psutil
        try:
            procs = self.me.children(recursive=True)
        except ps.Error:
            procs = []
        driver, driver_pss, driver_uss = self._mem(self.me)
        self._cpu_time(self.me, "driver")
        rss_sum, pss_sum = driver, driver_pss
        each = [("driver", driver_pss)]
        self.driver_peak = max(self.driver_peak, driver)
        self.driver_uss_peak = max(self.driver_uss_peak, driver_uss)
        for p in procs:
            try:
                rss, pss, uss = self._mem(p)
            except ps.Error:
                continue
            self.worker_uss_peak = max(self.worker_uss_peak, uss)
            self._cpu_time(p, None)
            rss_sum += rss
            pss_sum += pss
            each.append((self._name(p), pss))
            if rss > self.worker_peak:
                self.worker_peak, self.worker_peak_name = rss, self._name(p)
            if self.watch and p.pid not in self.watched and self.watch in (name := self._name(p)):
                try:
                    self.watched[p.pid] = {"name": name, "omp_num_threads": p.environ().get("OMP_NUM_THREADS")}
                except ps.Error:
                    pass
        self.rss_sum_peak = max(self.rss_sum_peak, rss_sum)
        if pss_sum > self.pss_sum_peak:
            self.pss_sum_peak, self.at_peak = pss_sum, sorted(each, key=lambda x: -x[1])
        self.max_procs = max(self.max_procs, len(procs) + 1)
        self.samples += 1
        ph = self.phases.setdefault(self.phase, {"driver_rss": 0, "sum_pss": 0, "ray_pss": 0, "sum_rss": 0,
                                                 "processes": 0})
        ph["driver_rss"] = max(ph["driver_rss"], driver)
        ph["sum_pss"] = max(ph["sum_pss"], pss_sum)
        ph["ray_pss"] = max(ph["ray_pss"], pss_sum - driver_pss)  # every process but the driver
        ph["sum_rss"] = max(ph["sum_rss"], rss_sum)
        ph["processes"] = max(ph["processes"], len(procs) + 1)

    def _cpu_time(self, p, name: str | None) -> None:
        if not self.cpu:
            return
        try:
            t = p.cpu_times()
        except self.psutil.Error:
            return
        used = t.user + t.system
        self._cpu_first.setdefault(p.pid, used if not self._started else 0.0)
        self._cpu_last[p.pid] = used
        self._cpu_names.setdefault(p.pid, set()).add(name or self._name(p))

    def cpu_seconds(self, groups: dict[str, str]) -> dict[str, float]:
        """CPU seconds used while sampling, summed per group: ``groups`` maps a group to a substring of a
        process's name (any name it had); the driver is ``driver``, everything else ``other``."""
        out = {g: 0.0 for g in (*groups, "driver", "other")}
        with self._lock:
            for pid, last in self._cpu_last.items():
                names = self._cpu_names[pid]
                group = "driver" if "driver" in names else next(
                    (g for g, sub in groups.items() if any(sub in n for n in names)), "other")
                out[group] += max(0.0, last - self._cpu_first.get(pid, 0.0))
        return {g: round(v, 1) for g, v in out.items()}

    def mark(self, phase: str) -> None:
        """Attribute the following samples to ``phase`` (peaks are kept per phase too)."""
        with self._lock:
            self._sample()
            self.phase = phase
            self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:
                pass

    def summary(self) -> dict[str, Any]:
        import resource

        mib = 1 << 20

        def r(x: float) -> float:
            return round(x / mib, 1)

        # The kernel's own high-water mark of the driver (ru_maxrss is in KiB on Linux).
        driver_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"driver_peak_mib": r(max(self.driver_peak, driver_hwm)), "driver_uss_peak_mib": r(self.driver_uss_peak),
                "worker_peak_mib": r(self.worker_peak), "worker_peak_process": self.worker_peak_name,
                "worker_uss_peak_mib": r(self.worker_uss_peak), "sum_pss_peak_mib": r(self.pss_sum_peak),
                "sum_rss_peak_mib": r(self.rss_sum_peak), "max_processes": self.max_procs, "samples": self.samples,
                # Where the peak Σ PSS sits: the biggest processes at that sample (PSS, MiB).
                "pss_at_peak_mib": [[name, r(v)] for name, v in self.at_peak[:16]],
                "phases_mib": {k: {kk: (vv if kk == "processes" else r(vv)) for kk, vv in v.items()}
                               for k, v in self.phases.items()}}


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
    parser.add_argument("--threads", type=int, default=int(os.environ.get("QPO_BENCH_THREADS", 0)) or (os.cpu_count() or 1),
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


def task_pairs(task_name: str, n: int, seed: int = 0, fits: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
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
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        from importlib import metadata

        for pkg in ("ray", "torch", "deepspeed", "transformers"):
            info[pkg] = metadata.version(pkg)
    except Exception:
        pass
    return info
