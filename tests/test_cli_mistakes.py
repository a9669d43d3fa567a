"""Ordinary mistakes on the command line: each ends with exit code 2, exactly one ``qpo-ray: error:`` line on
stderr, no traceback, and no Ray started.

Every row goes through the real entry point (``qpo_ray.cli.main``) in this process; rows whose config could be
accepted by mistake use ``train --data NOT_A_VERSION``, which fails on its own before any work, so a row that
regresses fails on its message instead of starting a run.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qpo_ray.cli import main

# A billion laughs: 9 levels of 9 aliases, 1.6 KB of YAML that expands to 9^9 strings.
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@dataclass
class Ctx:
    """A test's folder plus the module's saved policy and dataset version."""

    tmp: Path
    policy: Path
    version: Path

    def file(self, name: str, data: bytes | str) -> str:
        p = self.tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p)

    def jsonl(self, *rows, name: str = "q.jsonl") -> str:
        return self.file(name, "".join(json.dumps(r) + "\n" for r in rows))

    def gen(self, *extra: str, queries: str | None = None) -> list[str]:
        return ["generate", "--policy", str(self.policy), "--in", queries or self.jsonl({"query": "hi"}), *extra]

    def train(self, *extra: str) -> list[str]:
        return ["train", "--data", str(self.version), "--out", str(self.tmp / "out"), *extra]

    def config(self, *extra: str) -> list[str]:
        """A command that loads the config, then stops on its own ``--data`` (not a dataset version)."""
        return ["train", "--data", str(self.tmp), "--out", str(self.tmp / "out"), *extra]

    def live(self, *extra: str, bootstrapped: bool = True) -> list[str]:
        """``eval --target live`` of a run directory holding a saved config (and a finished bootstrap)."""
        from qpo_ray.config import dump_config, load_config
        from qpo_ray.runs import RunDir

        run = RunDir(self.tmp / "live")
        dump_config(load_config("tiny", [f"run_dir={run.path}"]), run.path / "config.yaml")
        if bootstrapped:
            run.mark("bootstrap")
        return ["eval", "--target", "live", "--run-dir", str(run.path), *extra]

    def imp(self, *extra: str, run_dir: str | None = None) -> list[str]:
        rows = self.jsonl({"query": "q", "prompt": "p", "reward": 1.0, "label": "joy"}, name="rows.jsonl")
        return ["data", "import", "--format", "jsonl", "--input", rows, "--run-dir", run_dir or str(self.tmp / "run"),
                "--task", "t", "--target", "m", *extra]


ROWS = {
    # generate
    "generate: --in is not UTF-8": (lambda c: c.gen(queries=c.file("q.txt", b"fine\ncaf\xe9\n")),
                                    r"q\.txt line 2: not valid UTF-8"),
    "generate: a JSONL query is null": (lambda c: c.gen(queries=c.jsonl({"query": None})),
                                        r"q\.jsonl line 1: .*'query' is non-empty text, got None"),
    "generate: a JSONL line without a query": (lambda c: c.gen(queries=c.jsonl({"text": "hi"})), r"got no query"),
    "generate: a JSONL query that is a number": (lambda c: c.gen(queries=c.jsonl({"query": 7})), r"got 7"),
    "generate: --in is missing": (lambda c: c.gen(queries=str(c.tmp / "nope.txt")), r"--in .*nope\.txt: no such file"),
    "generate: --batch-size 0": (lambda c: c.gen("--batch-size", "0"),
                                 r"generate: argument --batch-size: 0 must be at least 1"),
    "generate: --batch-size is not a number": (lambda c: c.gen("--batch-size", "many"), r"'many' is not a whole"),
    "generate: --out in a missing folder": (lambda c: c.gen("--out", str(c.tmp / "no" / "such" / "p.jsonl")),
                                            r"--out .*: folder .*/no/such does not exist"),
    "generate: --out is a folder": (lambda c: c.gen("--out", str(c.tmp)), r"is a folder: give a file name"),
    "generate: NaN target reward": (lambda c: c.gen("--set", "eval.target_reward=nan"),
                                    r"'eval\.target_reward': Input should be a finite number"),
    "generate: --reward is not an option": (lambda c: c.gen("--reward", "nan"),
                                            r"unrecognized arguments: --reward nan"),
    "generate: --policy is a file": (lambda c: ["generate", "--policy", c.jsonl({"query": "a"}), "--in", c.jsonl()],
                                     r"not a saved QPO policy"),
    # train: every mistake found before Ray starts
    "train: finetune without --init": (lambda c: c.train("--schedule", "finetune"),
                                       r"--schedule finetune needs --init POLICY_DIR"),
    "train: finetune from a missing --init": (lambda c: c.train("--schedule", "finetune", "--init", str(c.tmp / "x")),
                                              r"/x: not a saved QPO policy"),
    "train: finetune from a folder that is no policy": (
        lambda c: c.train("--schedule", "finetune", "--init", str(c.tmp)), r"not a saved QPO policy"),
    "train: --init with --schedule scratch": (lambda c: c.train("--init", str(c.policy)),
                                              r"--init is for --schedule finetune"),
    "train: --data is not a dataset version": (lambda c: c.config(), r"expected RUN_DIR/data/vNNN"),
    "train: --out is a file": (lambda c: c.train("--out", c.file("f", "x")), r"--out .*/f is a file"),
    "train: unknown --schedule": (lambda c: c.train("--schedule", "warm"), r"train: argument --schedule: invalid"),
    "train: --out left out": (lambda c: ["train", "--data", str(c.version)], r"required: --out"),
    # data import
    "import: --run-dir under a file": (lambda c: c.imp(run_dir=c.file("f", "x") + "/run"),
                                       r"cannot create .*/f/run/data: .*/f is not a folder"),
    "import: --format parquet given JSONL": (lambda c: c.imp("--format", "parquet"), r"not a readable parquet"),
    "import: --input is missing": (lambda c: ["data", "import", "--format", "csv", "--input", str(c.tmp / "x.csv"),
                                              "--run-dir", str(c.tmp / "run")], r"CSV input not found"),
    "import: --map without '='": (lambda c: c.imp("--map", "query"), r"--map: 'query' is not FIELD=COLUMN"),
    "import: --test-fraction 2": (lambda c: c.imp("--test-fraction", "2"), r"test_fraction: 2\.0 is not within"),
    "import: extreme reward": (lambda c: c.imp("--strict", "--input", c.jsonl(
        {"query": "q", "prompt": "p", "reward": -1e308, "label": "joy"}, name="x.jsonl")),
        r"x\.jsonl: row 1, column 'reward': -1e\+308 is outside"),
    # configuration
    "config: --config names no profile or file": (lambda c: c.config("--config", "tiniest"),
                                                  r"config 'tiniest' is neither a profile"),
    "config: a YAML alias bomb": (lambda c: c.config("--config", c.file("bomb.yaml", ALIAS_BOMB)),
                                  r"bomb\.yaml: not valid YAML: YAML aliases \(\*a\) are not allowed"),
    "config: not UTF-8": (lambda c: c.config("--config", c.file("c.yaml", b"seed: 1 # \xff\n")), r"cannot be read"),
    "config: not YAML": (lambda c: c.config("--config", c.file("c.yaml", "train: {lr: [")),
                         r"c\.yaml: not valid YAML: .*\(line \d+, column \d+\)$"),
    "config: a key given twice": (lambda c: c.config("--config", c.file("c.yaml", "seed: 1\nloops: 1\nseed: 2\n")),
                                  r"key 'seed' appears twice in one mapping \(line 3, column 1\)"),
    "config: a list, not sections": (lambda c: c.config("--config", c.file("c.yaml", "- 1\n")), r"top level must be"),
    "config: target_reward: true": (lambda c: c.config("--config", c.file("c.yaml", "eval: {target_reward: true}")),
                                    r"'eval\.target_reward': Input should be a valid number"),
    "config: target_reward: \"50\"": (lambda c: c.config("--set", 'eval.target_reward="50"'),
                                      r"'eval\.target_reward': Input should be a valid number"),
    "config: a key whose knob is another key": (lambda c: c.config("--config", c.file("c.yaml", "train: {seed: 3}")),
                                                r"c\.yaml: unknown key 'train\.seed' \(the knob is 'seed'\)$"),
    "config: a switch given as text": (lambda c: c.config("--set", "train.use_gpu=maybe"),
                                       r"'train\.use_gpu': Input should be a valid boolean"),
    "config: a count given as a fraction": (lambda c: c.config("--set", "train.batch_size=1.5"),
                                            r"'train\.batch_size': Input should be a valid integer"),
    "config: --set without '='": (lambda c: c.config("--set", "seed"), r"must look like section\.key=value"),
    "config: --set of an unknown key": (lambda c: c.config("--set", "train.lr=1"),
                                        r"unknown key 'train\.lr'"),
    # other commands
    "unknown command": (lambda c: ["fly"], r"argument cmd: invalid choice: 'fly'"),
    "eval replay without --data": (lambda c: ["eval", "--target", "replay"], r"--target replay needs --data"),
    # eval --target live: every mistake found before Ray starts
    "eval live: --loops is not numbers": (lambda c: c.live("--loops", "0,x"),
                                          r"--loops 0,x: expected comma-separated integers"),
    "eval live: --loops names a loop without a policy": (
        lambda c: c.live("--loops", "0,2"), r"--loops: no trained policy for loop\(s\) \[2\] in .* \(have \[0\]\)"),
    "eval live: a run without a dataset": (lambda c: c.live(bootstrapped=False),
                                           r"live: the run has no dataset yet \(bootstrap not done\)"),
    "eval live: --set of an unknown key": (lambda c: c.live("--set", "eval.nope=1"), r"unknown key 'eval\.nope'"),
    "eval live: --run-dir holds no run": (lambda c: ["eval", "--target", "live", "--run-dir", str(c.tmp)],
                                          r"--run-dir .*: no config\.yaml there"),
    "score: --in is missing": (lambda c: ["score", "--in", str(c.tmp / "p.jsonl"), "--out", str(c.tmp / "o.jsonl")],
                               r"pairs file not found"),
    "score: --in is not parquet": (lambda c: ["score", "--in", c.file("p.parquet", "x"), "--out",
                                              str(c.tmp / "o.jsonl")], r"p\.parquet: not a readable parquet"),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One saved tiny policy and one valid dataset version for every row."""
    from qpo_ray.config import load_config
    from qpo_ray.data.schema import rows_to_table
    from qpo_ray.data.store import DatasetStore
    from qpo_ray.policy.model import QPOPolicy

    root = tmp_path_factory.mktemp("shared")
    QPOPolicy.from_config(load_config("tiny").policy).save(root / "policy")
    store = DatasetStore(root / "run")
    store.commit([rows_to_table([{"task": "emotion", "setting": "zero_shot", "target": "m", "query": f"q {i}",
                                  "label": "joy", "prompt": "p", "reward": float(i), "source": "offline:x"}
                                 for i in range(4)])])
    return root / "policy", store.path(0)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


@pytest.mark.parametrize("row", list(ROWS))
def test_an_ordinary_mistake_is_one_line_and_exit_2(row, shared, tmp_path, capsys):
    make, message = ROWS[row]
    argv = make(Ctx(tmp_path, *shared))
    ray_before = _ray_running()
    t0 = time.perf_counter()
    rc = _run(argv)
    took = time.perf_counter() - t0
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("qpo-ray: error:")]
    assert rc == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    assert re.search(message, errors[0]), err
    assert _ray_running() == ray_before, "Ray was started before the mistake was found"
    assert took < 10, f"{row}: {took:.1f} s"
