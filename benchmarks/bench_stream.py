"""stream — a large synthetic dataset through DatasetStore.commit and Ray Data tokenisation, in bounded memory.

Each size runs in its own fresh process (its own Ray session, nothing left over from the other size):

1. ``DatasetStore.commit`` of N synthetic rows, generated chunk by chunk (emotion-like text: 10–30-word
   queries, prompts of 5 words up to the policy's prompt budget, random rewards), validated and de-duplicated
   by the store. Words are those of the emotion task that the policy tokenizer keeps whole (one token, with or
   without a leading space), so every prompt fits ``max_prompt_tokens`` and no row is dropped in training;
2. ``qpo_ray.train.loader.training_dataset`` on that version (its files read fused with ``tokenize_batch`` tasks)
   iterated into training micro-batches exactly as a Train worker does (``loader.train_batches``: drop_last,
   local shuffle buffer, model dtypes); rows are counted, nothing is trained.

A background thread samples the memory of the driver and of every process of its Ray session (GCS,
raylet, workers, actors) with psutil every ``--interval`` s. Reported: rows/s of each phase and end to end,
and the peaks: RSS of the driver, RSS of the largest single Ray process, and the sum over all processes at
one instant, both as PSS (shared pages split between the processes that map them: what the session
really occupies) and as RSS (an upper bound that counts shared pages once per process).

ratio = peak Σ PSS at N rows / the same at the small size (goal ≤ 1.2), and that peak must stay under
2 GiB. Default sizes: 1,000,000 and 100,000 rows (``--rows``, ``--rows-small``): four parquet files
(DatasetStore writes 250,000 rows per file) against one.

Ray's own share is measured apart: after Ray starts and before any work, the session idles for ``--idle-s``
seconds; the Σ PSS of its processes other than the driver then (GCS, raylet, dashboard agent, prestarted
workers) is Ray's idle baseline, and the peak minus it is the project's share (the driver with its imports,
and whatever the workers Ray starts for the tokenise tasks hold), reported for both sizes with its own ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._common import main, pin_threads, quiet, result, start_ray, stop_ray, workdir
from benchmarks.memory import MemorySampler

NAME = "stream"
GOAL = 1.2
LIMIT_MIB = 2048


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the big run")
    p.add_argument("--rows-small", type=int, default=100_000, help="rows of the reference run")
    p.add_argument("--chunk", type=int, default=50_000, help="rows per chunk handed to DatasetStore.commit")
    p.add_argument("--micro-batch", type=int, default=128,
                   help="training micro-batch size (the paper profile's, the one with datasets this big)")
    p.add_argument("--tokenize-tasks", type=int, default=1,
                   help="concurrent tokenise tasks (train_policy uses train.num_workers, 1 by default)")
    p.add_argument("--tokenizer", default="auto", help="'auto' (the demo policy's: smollm2 when installed, else gpt2)")
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling period, seconds")
    p.add_argument("--idle-s", type=float, default=3.0,
                   help="seconds the fresh Ray session idles before the work, to measure Ray's own baseline")
    p.add_argument("--child-timeout", type=int, default=900)


def quick(args: argparse.Namespace) -> None:
    args.rows, args.rows_small, args.chunk = 4000, 2000, 1000


# -- synthetic data -----------------------------------------------------------------------------------------
def vocabulary(tokenizer) -> list[str]:
    """Real English words: those of the emotion task's queries and prompts that ``tokenizer`` encodes as one
    token both alone and after a space, so a text of k words is k tokens."""
    import re

    from qpo_ray.tasks import load_task

    task = load_task("emotion")
    text = " ".join([q for q, _ in task.queries()] + [t for _, t in task.prompts])
    words = sorted(set(re.findall(r"[A-Za-z']+", text)))
    alone = tokenizer(words, add_special_tokens=False)["input_ids"]
    spaced = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return [w for w, a, b in zip(words, alone, spaced, strict=True) if len(a) == 1 and len(b) == 1]


def chunks(n: int, chunk: int, seed: int, clock: list[float], words: list[str], prompt_words: int):
    """pyarrow tables of ``chunk`` rows, prompts of 5 to ``prompt_words`` words; the time spent generating is
    added to ``clock[0]``."""
    import numpy as np
    import pyarrow as pa

    words = np.array(words, dtype=object)
    rng = np.random.default_rng(seed)
    labels = np.array(["joy", "sadness", "anger", "fear"], dtype=object)

    def texts(k: int, lo: int, hi: int) -> list[str]:
        lens = rng.integers(lo, hi + 1, size=k)
        idx = rng.integers(0, len(words), size=int(lens.sum()))
        ends = np.cumsum(lens)
        flat = words[idx]
        return [" ".join(flat[e - ln:e]) for e, ln in zip(ends.tolist(), lens.tolist(), strict=True)]

    done = 0
    while done < n:
        t0 = time.perf_counter()
        k = min(chunk, n - done)
        table = pa.table({
            "task": pa.array(["emotion"] * k), "setting": pa.array(["zero_shot"] * k),
            "target": pa.array(["smollm2"] * k), "query": pa.array(texts(k, 10, 30)),
            "label": pa.array(labels[rng.integers(0, 4, size=k)].tolist()),
            "prompt": pa.array(texts(k, 5, prompt_words)),
            "reward": pa.array(rng.uniform(-10.0, 10.0, size=k)), "source": pa.array(["offline:bench"] * k),
            "loop": pa.array(np.zeros(k, dtype=np.int32)),
        })
        done += k
        clock[0] += time.perf_counter() - t0
        yield table


# -- one size, in a fresh process ---------------------------------------------------------------------------
def run_one(args: argparse.Namespace, n: int, root: Path) -> dict:
    from qpo_ray.config import load_config
    from qpo_ray.data.store import DatasetStore
    from qpo_ray.pretrained import load_tokenizer

    pcfg = load_config("demo" if args.tokenizer in ("auto", "smollm2") else "tiny").policy
    if args.tokenizer == "auto":
        from benchmarks._common import smollm2_available

        if not smollm2_available():
            pcfg = load_config("tiny").policy
    elif args.tokenizer not in ("smollm2",):
        pcfg = pcfg.model_copy(update={"tokenizer": args.tokenizer})
    mb = args.micro_batch
    with MemorySampler(interval=args.interval) as mon:
        start_ray()
        try:
            import ray  # noqa: F401  (started above)

            from qpo_ray.train.loader import train_batches, training_dataset

            words = vocabulary(load_tokenizer(pcfg.tokenizer, pcfg.model))
            mon.mark("idle")
            time.sleep(args.idle_s)
            mon.mark("commit")
            store = DatasetStore(root / "run")
            gen = [0.0]
            t0 = time.perf_counter()
            tables = chunks(n, args.chunk, 0, gen, words, min(40, pcfg.max_prompt_tokens))
            m = store.commit(tables, source="synthetic", note="bench stream")
            t_commit = time.perf_counter() - t0 - gen[0]
            mon.mark("tokenise+iterate")
            ds = training_dataset(store, m.version, pcfg, seed=0, tokenize_tasks=args.tokenize_tasks)
            rows = batches = 0
            t1 = time.perf_counter()
            first = None
            for b in train_batches(ds, mb, shuffle_seed=0):
                if first is None:
                    first = time.perf_counter() - t1
                rows += int(b["reward"].shape[0])
                batches += 1
            t_iter = time.perf_counter() - t1
            mon.mark("end")
        finally:
            stop_ray()
    files = store.files(m.version)
    return {"rows": n, "committed_rows": m.rows, "duplicates_dropped": m.duplicates_dropped,
            "iterated_rows": rows, "expected_rows": (m.rows // mb) * mb, "batches": batches,
            "parquet_files": len(files), "parquet_mib": round(sum(os.path.getsize(f) for f in files) / (1 << 20), 1),
            "generate_s": round(gen[0], 2), "commit_s": round(t_commit, 2), "first_batch_s": round(first or 0.0, 2),
            "tokenise_iterate_s": round(t_iter, 2), "commit_rows_per_s": round(n / t_commit),
            "iterate_rows_per_s": round(rows / t_iter), "end_to_end_rows_per_s": round(n / (t_commit + t_iter)),
            "tokenizer": pcfg.tokenizer or pcfg.model, **mon.summary()}


def child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--single", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", type=Path, default=None)
    add_args(p)
    args = p.parse_args(argv)
    quiet()
    pin_threads(args.threads)
    with workdir(args, f"stream-{args.single}") as root:
        res = run_one(args, args.single, Path(root))
    args.out.write_text(json.dumps(res, indent=1), encoding="utf-8")
    return 0


# -- both sizes ---------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory(prefix="qpo-bench-stream-") as tmp:
        for n in (args.rows_small, args.rows):
            path = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_stream", "--single", str(n), "--out", str(path),
                   "--threads", str(args.threads), "--chunk", str(args.chunk), "--micro-batch", str(args.micro_batch),
                   "--tokenize-tasks", str(args.tokenize_tasks), "--tokenizer", args.tokenizer,
                   "--interval", str(args.interval), "--idle-s", str(args.idle_s)]
            if args.workdir is not None:
                cmd += ["--workdir", str(args.workdir)]
            print(f"[bench stream] {n} rows ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, timeout=args.child_timeout)
            if proc.returncode != 0 or not path.exists():
                raise RuntimeError(f"the {n}-row run failed (exit {proc.returncode})")
            out[n] = json.loads(path.read_text(encoding="utf-8"))
    small, big = out[args.rows_small], out[args.rows]
    ratio = big["sum_pss_peak_mib"] / small["sum_pss_peak_mib"]
    notes = []
    for r in (small, big):
        if r["iterated_rows"] != r["expected_rows"]:
            notes.append(f"{r['rows']} rows: iterated {r['iterated_rows']} rows, expected {r['expected_rows']}")
    driver_ratio = big["driver_peak_mib"] / small["driver_peak_mib"]
    if driver_ratio > GOAL:
        notes.append(f"the driver alone grows {driver_ratio:.2f}× ({small['driver_peak_mib']} → "
                     f"{big['driver_peak_mib']} MiB); see phases_mib for where")
    split = {name: shares(r) for name, r in (("big", big), ("small", small))}
    ok = ratio <= GOAL and big["sum_pss_peak_mib"] < LIMIT_MIB and not any("iterated" in x for x in notes)
    raw = {"big": big, "small": small, "driver_peak_ratio": round(driver_ratio, 3),
           "worker_peak_ratio": round(big["worker_peak_mib"] / small["worker_peak_mib"], 3),
           "ray_idle_mib": {k: v["ray_idle_mib"] for k, v in split.items()},
           "project_share_mib": {k: v["project_mib"] for k, v in split.items()},
           "project_share_ratio": round(split["big"]["project_mib"] / split["small"]["project_mib"], 3),
           "end_to_end_rows_per_s": big["end_to_end_rows_per_s"]}
    return result(NAME, ratio=ratio, goal=GOAL, op="<=", ours=big["sum_pss_peak_mib"],
                  baseline=small["sum_pss_peak_mib"],
                  units=f"MiB peak Σ PSS, driver + Ray ({big['rows']:,} vs {small['rows']:,} rows; "
                        f"{big['end_to_end_rows_per_s']:,} rows/s)",
                  raw=raw, notes=notes, ok=ok, goal_text=f"≤ {GOAL:.2f}, peak < 2 GiB",
                  limited_by=limited_by(big, small, split["big"], raw["project_share_ratio"]))


def shares(r: dict) -> dict:
    """The peak split into Ray's idle session (its processes but the driver, before any work) and the rest."""
    idle = r["phases_mib"].get("idle", {}).get("ray_pss", 0.0)
    return {"ray_idle_mib": idle, "project_mib": round(r["sum_pss_peak_mib"] - idle, 1)}


def process_name(title: str) -> str:
    """A Ray process's name without the method it was running (an actor's title is ``ray::Actor.method``
    while it runs one), so one actor caught idle in one run and busy in the other counts as one process."""
    if title.startswith("ray::") and "(" not in title:
        return title.split(".", 1)[0]
    return title


def growth(big: dict, small: dict) -> list[tuple[str, float]]:
    """Where the big run's peak exceeds the small one's: PSS at each peak summed per process name (Ray names a
    worker by what it runs), biggest increase first; a name only one run has counts in full."""
    def by_name(r: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, mib in r["pss_at_peak_mib"]:
            name = process_name(name)
            out[name] = out.get(name, 0.0) + mib
        return out

    b, s = by_name(big), by_name(small)
    diff = {n: b.get(n, 0.0) - s.get(n, 0.0) for n in set(b) | set(s)}
    return sorted(((n, d) for n, d in diff.items() if d > 0), key=lambda x: -x[1])


def limited_by(big: dict, small: dict, split: dict, project_ratio: float) -> str:
    grew = ", ".join(f"{n.split('/')[-1][:40]} +{d:.0f}" for n, d in growth(big, small)[:3]) or "nothing"
    return (f"memory: peak {big['sum_pss_peak_mib']:.0f} MiB = Ray's idle session {split['ray_idle_mib']:.0f} + "
            f"the project's {split['project_mib']:.0f} (×{project_ratio:.2f} vs the small run); grown from the small "
            f"run's peak, MiB: {grew}; speed: one tokenise task, {big['iterate_rows_per_s']:,} rows/s")


if __name__ == "__main__":
    if "--single" in sys.argv[1:]:
        raise SystemExit(child_main(sys.argv[1:]))
    raise SystemExit(main(NAME, add_args, quick, run))
