"""Bad input gets one clear error naming the file/row/column or config key, and a non-zero exit.

Every case goes through the real CLI entry point, as a user would hit it.
"""

from __future__ import annotations

import json
import re
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qpo_ray.cli import main
from qpo_ray.data.integrity import sha256_file
from qpo_ray.data.schema import SCHEMA, rows_to_table
from qpo_ray.data.store import DatasetStore

MAP = "query=question,prompt=instruction,reward=score,label=gold"


def _jsonl(path, *rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def _import(tmp_path, name, *rows):
    f = _jsonl(tmp_path / name, *rows)
    return ["data", "import", "--format", "jsonl", "--input", str(f), "--run-dir", str(tmp_path / "run"),
            "--task", "t", "--target", "m", "--map", MAP, "--strict"]


OK = {"question": "how are you", "instruction": "Be nice.", "score": 1.5, "gold": "joy"}


def _rows(n: int) -> pa.Table:
    return rows_to_table([{"task": "emotion", "setting": "zero_shot", "target": "m", "query": f"query {i}",
                           "label": "joy", "prompt": f"prompt {i % 3}", "reward": float(i % 5),
                           "source": "offline:x", "loop": 0} for i in range(n)])


def _version(tmp_path, rows: int = 20, **damage) -> str:
    """``RUN/data/v000`` of ``rows`` valid rows, then damaged the way ``damage`` says, with the manifest's
    checksum and row count updated to match (so only reading the data can tell)."""
    store = DatasetStore(tmp_path / "run")
    store.commit([_rows(rows)])
    mpath = store.path(0) / "manifest.json"
    m = json.loads(mpath.read_text())
    part = store.path(0) / m["files"][0]["name"]
    if "table" in damage:
        pq.write_table(damage["table"], part)
    if "truncate" in damage:
        part.write_bytes(part.read_bytes()[: damage["truncate"]])
    if "name" in damage:  # the same bytes, listed under a name that leads out of the folder
        target = store.path(0) / damage["name"]
        target.write_bytes(part.read_bytes())
        m["files"][0]["name"] = damage["name"]
        part = target
    if damage.get("no_files"):
        m["files"], m["rows"] = [], 0
    else:
        m["files"][0]["sha256"] = sha256_file(part)
    mpath.write_text(json.dumps(m))
    return str(store.path(0))


def _nan_rewards() -> pa.Table:
    t = _rows(20)
    return t.set_column(SCHEMA.get_field_index("reward"), "reward", pa.array([float("nan")] + [1.0] * 19))


def _train(t, data: str) -> list[str]:
    return ["train", "--data", data, "--out", str(t / "p")]

CASES = {
    "missing column": (lambda t: _import(t, "a.jsonl", {k: v for k, v in OK.items() if k != "score"}),
                       r"a\.jsonl line 1: column 'score' \(mapped to reward\) is missing"),
    "mistyped column": (lambda t: _import(t, "a.jsonl", {**OK, "score": "high"}),
                        r"a\.jsonl line 1: column 'score': 'high' is not a number"),
    "NaN reward": (lambda t: _import(t, "a.jsonl", OK, b'{"question": "q2", "instruction": "p", "score": NaN, '
                                     b'"gold": "joy"}'), r"a\.jsonl: row 2, column 'reward': nan is not a finite"),
    "inf reward": (lambda t: _import(t, "a.jsonl", {**OK, "score": float("inf")}), r"column 'reward': inf"),
    "empty query": (lambda t: _import(t, "a.jsonl", {**OK, "question": ""}), r"row 1, column 'query': empty"),
    "empty prompt column": (lambda t: _import(t, "a.jsonl", {**OK, "instruction": None}), r"'prompt'"),
    "non-UTF-8 text": (lambda t: _import(t, "a.jsonl", b'{"question": "caf\xe9 \xff", "instruction": "p", '
                                         b'"score": 1, "gold": "joy"}'), r"a\.jsonl line 1: not valid UTF-8"),
    "empty dataset": (lambda t: _import(t, "a.jsonl"), r"no rows to import"),
    "unknown config key": (lambda t: ["run", "--set", "train.micro_batch_sze=4"],
                           r"unknown key 'train\.micro_batch_sze' \(did you mean 'train\.micro_batch_size'\?\)"),
    "unknown section": (lambda t: ["run", "--set", "trian.lr=1"], r"unknown key 'trian' \(did you mean 'train'\?\)"),
    "bad config value": (lambda t: ["run", "--set", "train.zero_stage=7"], r"'train\.zero_stage'"),
    "policy model path missing": (lambda t: ["run", "--set", f"run_dir={t}/r", "--set", "policy.model=/no/such/lm"],
                                  r"policy\.model '/no/such/lm': no such folder"),
    "saved policy missing": (lambda t: ["generate", "--policy", str(t / "nope"), "--in", str(_jsonl(t / "q.jsonl",
                                        {"query": "hi"}))], r"not a saved QPO policy"),
    "dataset version missing": (lambda t: ["train", "--data", str(t / "run" / "data" / "v000"), "--out", str(t / "p")],
                                r"dataset version v000 does not exist"),
    "resume of a non-run": (lambda t: ["run", "--resume", str(t)], r"not a qpo-ray run directory"),
    # Datasets that are valid on the surface, and configs that are out of bounds.
    "train on fewer rows than one batch": (lambda t: _train(t, _version(t, rows=2)),
                                           r"v000 .* has 2 rows: too few for one optimizer step "
                                           r"\(train\.batch_size=16"),
    "train on a manifest with no files": (lambda t: _train(t, _version(t, no_files=True)), r"has 0 rows: too few"),
    "manifest file outside the version": (lambda t: _train(t, _version(t, name="../../../outside.parquet")),
                                          r"file name '\.\./\.\./\.\./outside\.parquet' is not a file of the version"),
    "truncated parquet, checksum updated": (lambda t: _train(t, _version(t, truncate=300)),
                                            r"part-00000\.parquet: not a readable parquet file"),
    "NaN rewards, checksum updated": (lambda t: _train(t, _version(t, table=_nan_rewards())),
                                      r"part-00000\.parquet: row 0, column 'reward': nan is not a finite number"),
    "--config is a directory": (lambda t: ["run", "--config", str(t)], r"is a directory, not a YAML file"),
    "infinite learning rate": (lambda t: ["run", "--set", "train.scratch.lr=inf"],
                               r"'train\.scratch\.lr': Input should be a finite number"),
    "NaN temperature": (lambda t: ["run", "--set", "collect.temperature=.nan"], r"'collect\.temperature': .*finite"),
    "token budget that would never end": (lambda t: ["run", "--set", "target.max_new_tokens=1000000000"],
                                          r"'target\.max_new_tokens': Input should be less than or equal to 65536"),
    "batch size that would never fill": (lambda t: ["run", "--set", "serve.max_batch_size=100000000"],
                                         r"'serve\.max_batch_size': Input should be less than or equal to 4096"),
    "target reward off the scale": (lambda t: ["run", "--set", "eval.target_reward=-1e6"],
                                    r"'eval\.target_reward': Input should be greater than or equal to 0"),
    # A saved policy folder that was tampered with.
    "policy folder without its policy section": (lambda t: _generate(t, lambda m: m.pop("policy")),
                                                 r"policy_config\.json: no 'policy' section"),
    "policy folder with a mistyped field": (lambda t: _generate(t, lambda m: m["policy"].update(max_query_tokens="x")),
                                            r"policy_config\.json: policy\.max_query_tokens: Input should be a valid"),
    "policy folder with a huge prompt budget": (
        lambda t: _generate(t, lambda m: m["policy"].update(max_prompt_tokens=1_000_000_000)),
        r"policy\.max_prompt_tokens: Input should be less than or equal to 4096"),
    "policy folder with bad vocabulary ids": (lambda t: _generate(t, lambda m: m.update(vocab_ids=["a"])),
                                              r"'vocab_ids' must be a list of token ids"),
    "policy folder whose weights do not fit": (lambda t: _generate(t, lambda m: m["policy"].update(tiny_hidden=32),
                                                                  config={"n_embd": 32}),
                                               r"cannot rebuild the saved policy"),
}


def _generate(t, edit, config: dict | None = None) -> list[str]:
    """``qpo-ray generate`` on a freshly saved tiny policy whose policy_config.json (and config.json) ``edit``
    tampered with."""
    from qpo_ray.config import load_config
    from qpo_ray.policy.model import POLICY_CONFIG, QPOPolicy

    folder = t / "policy"
    QPOPolicy.from_config(load_config("tiny").policy).save(folder)
    meta = json.loads((folder / POLICY_CONFIG).read_text())
    edit(meta)
    (folder / POLICY_CONFIG).write_text(json.dumps(meta))
    if config:
        base = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**base, **config}))
    return ["generate", "--policy", str(folder), "--in", str(_jsonl(t / "q.jsonl", {"query": "hi"}))]


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(case, tmp_path, capsys):
    make_args, message = CASES[case]
    ray_before = _ray_running()
    rc = main(make_args(tmp_path))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("qpo-ray: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert _ray_running() == ray_before, "the error came after Ray was started"


def test_duplicate_rows_in_d0_are_dropped_with_a_warning(tmp_path, capsys, caplog):
    rc = main(_import(tmp_path, "d.jsonl", OK, OK, {**OK, "question": "another"}))
    assert rc == 0
    from qpo_ray.data.store import DatasetStore

    m = DatasetStore(tmp_path / "run").manifest(0)
    assert (m.rows, m.duplicates_dropped) == (2, 1)
    assert "duplicate" in (capsys.readouterr().out + caplog.text)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["oversized query", "unreachable target"])
def test_target_errors_are_clear(case, tmp_path, capsys, serve_as_found):
    pairs = _jsonl(tmp_path / "pairs.jsonl", {"query": "word " * 2000 if case == "oversized query" else "hello",
                                              "prompt": "Be nice.", "label": "joy"})
    sets = ["--set", "target.model=tiny-llama"]
    if case == "unreachable target":
        sets += ["--set", "target.engine=openai", "--set", "target.base_url=http://127.0.0.1:9/v1",
                 "--set", "target.retries=1", "--set", "target.timeout_s=2"]
    rc = main(["score", "--config", "tiny", *sets, "--in", str(pairs), "--out", str(tmp_path / "o.parquet")])
    # Ray's own logs share stderr here; what the user is told is the last line.
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("qpo-ray: error: "), last
    expected = r"max_length" if case == "oversized query" else r"127\.0\.0\.1:9"
    assert re.search(expected, last), last


# -- HTTP bodies: the request models and error handlers of the policy service and the target server,
# on a plain FastAPI app (no Ray); tests/test_policy_service.py sends the same bodies to the deployed service.
def _http_app():
    from fastapi import FastAPI, Request

    from qpo_ray.http_api import install_error_handlers
    from qpo_ray.score.server import CompletionBody, read_body
    from qpo_ray.serve.messages import PromptRequest

    app = FastAPI()
    install_error_handlers(app)

    def prompts(req):
        return {"queries": req.query_list(), "target_reward": req.target_reward}

    async def completions(request):
        body = await read_body(request, CompletionBody, 1 << 16)
        return {"prompt": body.prompt}

    # Real classes, not this module's postponed (string) annotations: FastAPI reads them to parse the body.
    prompts.__annotations__ = {"req": PromptRequest, "return": dict}
    completions.__annotations__ = {"request": Request, "return": dict}
    app.post("/prompts")(prompts)
    app.post("/completions")(completions)
    return app


HTTP = {
    "lone surrogate query": ("/prompts", b'{"query": "bad \\ud800"}', 422,
                             r"lone surrogate '\\\\ud800' at character 4"),
    "lone surrogate in a list": ("/prompts", b'{"queries": ["ok", "x\\udfff"]}', 422, r'"queries",1'),
    "NaN reward": ("/prompts", b'{"query": "a", "target_reward": NaN}', 422, r'"input":"nan"'),
    "1e400 reward": ("/prompts", b'{"query": "a", "target_reward": 1e400}', 422, r'"input":"inf"'),
    "1e308 reward": ("/prompts", b'{"query": "a", "target_reward": 1e308}', 422, r"less than or equal to 100"),
    "-1e6 reward": ("/prompts", b'{"query": "a", "target_reward": -1e6}', 422, r"greater than or equal to 0"),
    "empty query": ("/prompts", b'{"query": ""}', 422, r"empty or whitespace-only query"),
    "whitespace query": ("/prompts", b'{"queries": ["a", " \\t\\n"]}', 422, r"empty or whitespace-only query"),
    "surrogate in an unknown key": ("/prompts", b'{"query": "a", "k\\ud800": 1}', 422, r'"k\\\\ud800"'),
    "valid, reward 0": ("/prompts", b'{"query": "a", "target_reward": 0}', 200, r'"target_reward":0\.0'),
    "target: surrogate prompt": ("/completions", b'{"prompt": "x\\ud800"}', 422, r"lone surrogate"),
    "target: NaN temperature": ("/completions", b'{"prompt": "x", "temperature": NaN}', 422, r'"input":"nan"'),
    "target: not UTF-8": ("/completions", b'{"prompt": "\xff"}', 400, r"not UTF-8"),
    "target: valid": ("/completions", b'{"prompt": "x"}', 200, r'"prompt":"x"'),
}


@pytest.mark.parametrize("case", list(HTTP))
def test_http_bodies_get_their_status_and_a_json_body(case):
    from fastapi.testclient import TestClient

    path, body, status, pattern = HTTP[case]
    r = TestClient(_http_app()).post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text

    def refuse(token):  # Python's json takes NaN and Infinity; JSON does not
        raise AssertionError(f"not JSON: {token}")

    json.loads(r.text, parse_constant=refuse)
    assert re.search(pattern, r.text), r.text


@pytest.mark.slow
@pytest.mark.parametrize("sets, message", [
    (["train.use_gpu=true"], r"no node can hold one train worker \(1 CPU, 1 GPU; .*train\.use_gpu=true\)"),
    (["target.num_gpus_per_replica=1", "target.device=cuda"],
     r"one target replica \(1 CPU, 1 GPU; .*target\.num_gpus_per_replica=1\)"),
    (["collect.num_gpus_per_actor=0.5"], r"one sampling actor \(1 CPU, 0\.5 GPU; .*collect\.num_gpus_per_actor"),
    (["target.num_cpus_per_replica=64"], r"one target replica \(64 CPU, 0 GPU; .*target\.num_cpus_per_replica=64"),
    (["train.num_workers=8", "train.micro_batch_size=2", "train.cpus_per_worker=2"],
     r"8 train worker\(s\) need 16 CPU and 0 GPU at once .*train\.num_workers=8"),
])
def test_a_config_the_cluster_cannot_host_fails_before_any_work(sets, message, tmp_path, capsys, ray_local):
    run_dir = tmp_path / "r"
    t0 = time.monotonic()
    rc = main(["run", "--set", f"run_dir={run_dir}", *[a for s in sets for a in ("--set", s)]])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("qpo-ray: error: the Ray cluster cannot host what the config asks for: "), last
    assert re.search(message, last) and "embedded Ray" in last, last
    assert time.monotonic() - t0 < 60  # not a wait for nodes that never come
    assert not run_dir.exists()  # nothing half-made: the corrected command can start the run afresh


@pytest.mark.slow
def test_resume_verifies_the_version_it_trains_on(tmp_path, capsys, ray_local):
    """A run stopped after bootstrap whose v000 got NaN rewards and a matching checksum: the resumed run's train
    step refuses it with one line instead of training on it."""
    from qpo_ray.config import dump_config, load_config
    from qpo_ray.runs import RunDir

    run_dir = tmp_path / "run"
    _version(tmp_path, table=_nan_rewards())  # tmp_path/run/data/v000
    dump_config(load_config("tiny", [f"run_dir={run_dir}"]), run_dir / "config.yaml")
    rd = RunDir(run_dir)
    rd.mark("bootstrap", {"rows": 20})
    rd.mark("eval-0", {})
    rc = main(["run", "--resume", str(run_dir)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2, last
    assert re.search(r"^qpo-ray: error: .*v000/part-00000\.parquet: row 0, column 'reward': nan is not a finite", last)
    assert rd.done("loop-1.train") is None and not (run_dir / "policy").exists()
