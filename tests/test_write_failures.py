"""Resources that run out: a write the OS refuses is one ``qpo-ray: error:`` line naming the file and the OS's
reason, and leaves no temporary file; a YAML alias bomb is refused at once."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qpo_ray.atomic as atomic
from qpo_ray.cli import main
from qpo_ray.config import load_config
from qpo_ray.errors import ConfigError, ResourceError
from qpo_ray.tasks import load_task
from tests.test_cli_mistakes import ALIAS_BOMB

REPO = Path(__file__).resolve().parents[1]


class _FullDisk:
    """A file on a full disk: writes fail with ENOSPC, and so does the flush that closing does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self):
        self.f.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fileno(self):
        return self.f.fileno()


def _full_disk_open(*args, **kwargs) -> _FullDisk:
    """``open`` for ``qpo_ray.atomic`` on a full disk."""
    return _FullDisk(open(*args, **kwargs))  # noqa: SIM115 - the caller closes it through the wrapper


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("qpo-ray: error:")]


def test_a_full_disk_is_one_error_and_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "open", _full_disk_open, raising=False)
    with pytest.raises(ResourceError, match=rf"cannot write {tmp_path}/out\.json: No space left on device"):
        atomic.atomic_write_json(tmp_path / "out.json", {"a": 1})
    assert os.listdir(tmp_path) == []


def test_a_failed_fsync_or_rename_leaves_no_temporary_file(tmp_path, monkeypatch):
    def fail(*_):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(ResourceError, match=r"out\.txt: Disk quota exceeded"):
        atomic.atomic_write_text(tmp_path / "out.txt", "x")
    assert os.listdir(tmp_path) == []


def _limited(code: str, limit: int) -> subprocess.CompletedProcess:
    """``code`` in a Python subprocess whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE: the kernel
    fails the write with EFBIG; Python ignores SIGXFSZ)."""
    code = f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n{code}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=REPO)


def _cli(argv: list[str]) -> str:
    return f"from qpo_ray.cli import main; sys.exit(main({argv!r}))"


def test_an_atomic_write_past_the_file_size_limit_leaves_no_temporary_file(tmp_path):
    """The kernel's own refusal: the write fails part-way, and so does the flush that closing does."""
    p = _limited(f"from qpo_ray.atomic import atomic_write_text\natomic_write_text({str(tmp_path / 'o.txt')!r}, "
                 "'x' * 100_000)", limit=64)
    assert p.returncode == 1 and p.stderr.strip().endswith(
        f"qpo_ray.errors.ResourceError: cannot write {tmp_path}/o.txt: File too large"), p.stderr
    assert os.listdir(tmp_path) == []


def test_generate_on_a_full_disk_is_one_line_and_cleans_its_temporary_file(tmp_path, monkeypatch, capsys):
    from qpo_ray.policy.model import QPOPolicy

    QPOPolicy.from_config(load_config("tiny").policy).save(tmp_path / "policy")
    (tmp_path / "q.txt").write_text("".join(f"query number {i}\n" for i in range(3)))
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(atomic, "open", _full_disk_open, raising=False)
    rc = main(["generate", "--policy", str(tmp_path / "policy"), "--in", str(tmp_path / "q.txt"),
               "--out", str(out / "prompts.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert _error_lines(err) == [f"qpo-ray: error: cannot write {out}/prompts.jsonl: No space left on device"], err
    assert "Traceback" not in err
    assert os.listdir(out) == []


def test_import_past_the_file_size_limit_is_one_line_and_commits_nothing(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query": f"query {i}", "prompt": "p", "reward": i, "label": "joy"}) + "\n"
                            for i in range(200)))
    run = tmp_path / "run"
    p = _limited(_cli(["data", "import", "--format", "jsonl", "--input", str(rows), "--run-dir", str(run),
                       "--task", "t", "--target", "m"]), limit=4096)
    assert p.returncode == 2, p.stderr
    assert _error_lines(p.stderr) == [f"qpo-ray: error: cannot write dataset v000 in {run}/data: "
                                      "Error writing bytes to file. Detail: [errno 27] File too large"], p.stderr
    assert "Traceback" not in p.stderr
    assert os.listdir(run / "data") == []


def _refused_quickly(fn, *args) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        fn(*args)
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert "\n" not in msg and "YAML aliases (*a) are not allowed" in msg
    return msg


def test_yaml_alias_bombs_are_refused_at_once(tmp_path):
    assert len(ALIAS_BOMB) < 1700
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    _refused_quickly(load_config, str(tmp_path / "bomb.yaml"))
    _refused_quickly(load_task, str(tmp_path / "bomb.yaml"))
    (tmp_path / "task.yaml").write_text("name: x\n" + ALIAS_BOMB)
    _refused_quickly(load_task, str(tmp_path / "task.yaml"))


def test_yaml_numbers_read_as_a_person_writes_them(tmp_path):
    cfg = load_config("tiny", ["train.scratch.lr=1e-4", "eval.target_reward=5E1"])
    assert cfg.train.scratch.lr == 1e-4 and cfg.eval.target_reward == 50.0
    (tmp_path / "c.yaml").write_text("profile: tiny\ntrain: {finetune: {lr: 2e-5}}\n")
    assert load_config(str(tmp_path / "c.yaml")).train.finetune.lr == 2e-5


def test_a_task_file_with_aliases_fails_before_ray_starts(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    # policy.model is missing too: were the task not checked first, that would be the error instead.
    rc = main(["run", "--set", f"task.name={tmp_path / 'bomb.yaml'}", "--set", "policy.model=/no/such/lm",
               "--set", f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(_error_lines(err)) == 1 and "YAML aliases (*a) are not allowed" in err, err
    assert not (tmp_path / "r").exists()


def test_an_import_into_a_folder_it_may_not_write_fails_before_reading(tmp_path, monkeypatch, capsys):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"query": "q", "prompt": "p", "reward": 1, "label": "joy"}))
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)  # as for a user without write permission
    rc = main(["data", "import", "--format", "jsonl", "--input", str(tmp_path / "rows.jsonl"), "--run-dir",
               str(tmp_path / "run"), "--task", "t", "--target", "m"])
    err = capsys.readouterr().err
    assert rc == 2 and _error_lines(err) == [
        f"qpo-ray: error: cannot write in {tmp_path}: permission denied or a read-only file system"], err
    assert not (tmp_path / "run").exists()
