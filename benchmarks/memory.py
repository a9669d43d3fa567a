"""Memory (and CPU time) of a benchmark process and the Ray session it started, sampled in a background thread.

``MemorySampler`` is what ``bench_stream`` reads its memory goal from (Σ PSS over the session's processes at
one sample) and what ``bench_train`` reads where the CPU went from.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any


class MemorySampler:
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
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
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
                with contextlib.suppress(ps.Error):
                    self.watched[p.pid] = {"name": name, "omp_num_threads": p.environ().get("OMP_NUM_THREADS")}
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
            with contextlib.suppress(Exception):
                self.sample()

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
