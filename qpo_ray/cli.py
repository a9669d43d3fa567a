"""The ``qpo-ray`` command line. Every subcommand takes ``--config`` (a profile or YAML) and ``--set k=v``."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from qpo_ray.config import PROFILES, load_config
from qpo_ray.errors import DataError, QPOError, os_reason
from qpo_ray.jsonl import read_jsonl, text_lines, write_jsonl
from qpo_ray.stopping import Stopped

log = logging.getLogger("qpo_ray")

# OS errors that are the machine's or the user's doing, not a bug: one line, not a traceback.
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE,
    errno.ENFILE, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP,
})


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes end like every other error of the CLI: usage, then one ``qpo-ray: error:``
    line naming the subcommand."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        sub = self.prog.partition(" ")[2]
        self.exit(2, f"qpo-ray: error: {sub + ': ' if sub else ''}{message}\n")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def _config_args(p: argparse.ArgumentParser, default: str = "tiny") -> None:
    p.add_argument("--config", default=default, help=f"profile ({', '.join(PROFILES)}) or YAML file [{default}]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.scratch.lr=1e-4 (repeatable)")


def _served_config_args(p: argparse.ArgumentParser, example: str) -> None:
    """``--config``/``--set`` of the commands that use a trained policy (``qpo_ray.policy.served``)."""
    p.add_argument("--config", default=None,
                   help="profile or YAML under the policy's inference.json [the config of the evaluation or run "
                        "the policy comes from, else tiny]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dotted override, wins over inference.json; {example} (repeatable)")


def _cfg(args):
    return load_config(args.config, args.overrides)


def _version_dir(path: str) -> tuple[Path, int]:
    from qpo_ray.data.store import parse_version_path

    found = parse_version_path(path)
    if found is None:
        raise QPOError(f"--data {path}: expected RUN_DIR/data/vNNN")
    return found


def cmd_run(args) -> int:
    if args.resume and args.config is not None:
        raise QPOError(f"--config cannot be used with --resume: a resumed run goes on with its own config "
                       f"({Path(args.resume) / 'config.yaml'}); to run more loops: --resume {args.resume} "
                       "--set loops=N")
    cfg = None if args.resume else _cfg(args)  # before the driver's imports (torch, Ray): a mistake is quick
    from qpo_ray.driver.run import run_qpo

    run_qpo(cfg, resume=args.resume, overrides=args.overrides if args.resume else None)
    return 0


def cmd_demo(args) -> int:
    from qpo_ray.driver.run import run_qpo

    cfg = load_config("demo", args.overrides)
    done = Path(cfg.run_dir, "config.yaml").exists()
    if done:
        print(f"[qpo-ray] {cfg.run_dir} exists: resuming it (delete it for a fresh demo)", flush=True)
    if done:
        run_qpo(None, resume=cfg.run_dir, overrides=args.overrides)
    else:
        run_qpo(cfg)
    return 0


def cmd_bootstrap(args) -> int:
    from qpo_ray.driver import steps
    from qpo_ray.driver.run import open_run
    from qpo_ray.driver.session import Session
    from qpo_ray.ray_init import init_ray

    cfg = _cfg(args)
    started = Path(cfg.run_dir, "config.yaml").exists()
    with open_run(None if started else cfg, cfg.run_dir if started else None) as (cfg, rd):
        init_ray()
        s = Session(cfg, rd)
        try:
            if s.store.latest() is None:  # a dataset to build: the target scores it
                s.pool.start()
            print(json.dumps(steps.bootstrap(cfg, s.task, s.store, s.scores)))
        finally:
            s.close()
    return 0


def cmd_train(args) -> int:
    cfg = _cfg(args)  # the arguments first, before the imports of torch and Ray: a mistake is quick
    run_dir, version = _version_dir(args.data)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise QPOError(f"--out {args.out} is a file: give a folder for the policy")
    _check_init(args.schedule, args.init)
    from qpo_ray.data.store import DatasetStore
    from qpo_ray.locks import writer_lock
    from qpo_ray.resources import ensure_cluster, train_need
    from qpo_ray.runs import run_dir_of
    from qpo_ray.train import train_policy
    from qpo_ray.train.trainer import check_trainable

    store = DatasetStore(run_dir)
    out = Path(args.out).resolve()
    # A policy written into a run directory (e.g. RUN_DIR/policy/...) makes this one more writer of that run.
    into = run_dir_of(out)
    with writer_lock(into) if into is not None else nullcontext():
        check_trainable(cfg, store, version)  # before Ray starts: bad or too little data is one line, not a traceback
        ensure_cluster(cfg, [[train_need(cfg.train)]])
        res = train_policy(cfg, store=store, version=version, out_dir=out, schedule=args.schedule,
                           init_policy=Path(args.init) if args.init else None,
                           run_name=args.name or f"qpo-train-{out.name}")
    for m in res.epoch_metrics:
        print(json.dumps(m), flush=True)
    print(f"policy saved to {res.policy_dir}", flush=True)
    return 0


def _check_init(schedule: str, init: str | None) -> None:
    """``--init`` goes with ``--schedule finetune`` and names a saved policy; checked before Ray starts."""
    if schedule == "scratch":
        if init:
            raise QPOError("--init is for --schedule finetune (scratch starts from policy.model)")
        return
    if not init:
        raise QPOError("--schedule finetune needs --init POLICY_DIR (the saved policy to fine-tune)")
    from qpo_ray.policy.model import check_saved_policy

    check_saved_policy(Path(init))


def _read_queries(path: str) -> list[str]:
    """The queries of ``--in``: a text file (one a line, blank lines skipped) or JSONL with a text 'query'."""
    p = Path(path)
    if not p.is_file():
        raise QPOError(f"--in {path}: no such file")
    out = []
    if p.suffix == ".jsonl":
        for n, rec in read_jsonl(p):
            q = rec.get("query")
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{path} line {n}: expected a JSON object whose 'query' is non-empty text, "
                                f"got {'no query' if 'query' not in rec else repr(q)[:80]}")
            out.append(q)
        return out
    for n, text, why in text_lines(p):
        if why is not None:
            raise DataError(f"{path} line {n}: {why}")
        if text.strip():
            out.append(text)
    return out


def _check_out_file(path: str) -> None:
    """An output file's folder must exist and be writable: found before the work, not after it."""
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise QPOError(f"--out {path} is a folder: give a file name")
    if not folder.is_dir():
        raise QPOError(f"--out {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QPOError(f"--out {path}: folder {folder} is not writable")


def cmd_generate(args) -> int:
    """The prompts the policy's evaluation measured: the settings its folder records (``inference.json``)."""
    from qpo_ray.policy.inference import policy_prompts
    from qpo_ray.policy.model import QPOPolicy
    from qpo_ray.policy.served import describe_settings, load_served

    if args.out:
        _check_out_file(args.out)
    served = load_served(args.policy, args.config, args.overrides)
    queries = _read_queries(args.inp)
    policy = QPOPolicy.load(args.policy)
    print(f"[qpo-ray] {describe_settings(served)}", file=sys.stderr, flush=True)
    prompts = policy_prompts(policy, queries, served.settings, batch_size=args.batch_size)
    rows = [{"query": q, "prompt": p} for q, p in zip(queries, prompts, strict=True)]
    if args.out:
        write_jsonl(args.out, rows)
        print(f"{len(prompts)} prompts written to {args.out}", file=sys.stderr)
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


def cmd_score(args) -> int:
    from qpo_ray.resources import ensure_cluster, target_need
    from qpo_ray.score.cli_score import read_pairs, score_file
    from qpo_ray.tasks import load_task

    cfg = _cfg(args)
    # Before Ray starts: a missing task, pairs file or output folder is one line, not a started pool.
    load_task(cfg.task.name)
    rows = read_pairs(args.inp)
    _check_out_file(args.out)
    ensure_cluster(cfg, [[target_need(cfg.target)]])
    score_file(cfg, args.inp, args.out, rows=rows)
    return 0


def cmd_serve_target(args) -> int:
    from qpo_ray.score.server import serve_target_main

    serve_target_main(_cfg(args), args.host, args.port)
    return 0


def cmd_serve(args) -> int:
    from qpo_ray.policy.served import load_served
    from qpo_ray.serve import serve_policy

    # --host/--port are serve.host/serve.port: validated with the config (a port outside 1-65535 is one line).
    flags = [f"serve.{k}={v}" for k, v in (("host", args.host), ("port", args.port)) if v is not None]
    serve_policy(args.policy, load_served(args.policy, args.config, [*args.overrides, *flags]))
    return 0


EVAL_TARGETS = ("live", "replay")


def cmd_eval(args) -> int:
    """One evaluation, two judges: the run's target LLM (live) or recorded logs (replay)."""
    if args.target == "live":
        from qpo_ray.driver.reevaluate import evaluate_run

        if not args.run_dir:
            raise QPOError("--target live needs --run-dir RUN_DIR (a qpo-ray run: its test queries, pool and target)")
        evaluate_run(args.run_dir, loops=args.loops, redo=args.redo, overrides=args.overrides)
        return 0
    from qpo_ray.evaluate.offline import evaluate_offline
    from qpo_ray.evaluate.report import methods_table

    if not args.data or not args.out:
        raise QPOError("--target replay needs --data (recorded logs) and --out (where the policy and report go)")
    from qpo_ray.locks import writer_lock

    cfg = load_config(args.config or "offline", args.overrides)
    with writer_lock(args.out):  # --out becomes a run directory: its dataset v000, the policy, the report
        res = evaluate_offline(cfg, args.data, args.out, version=args.version, test_fraction=args.test_fraction)
    s, tr = res["split"], res["training"]
    print(f"replay eval of {res['data']['run_dir']} v{res['data']['version']:03d}: train {s['train_queries']} "
          f"queries ({s['train_rows']} rows), test {s['evaluated_test_queries']} queries; "
          f"training {tr['wall_s']:.1f} s{' (reused)' if tr.get('reused') else ''}", flush=True)
    print(methods_table(res, res["names"]), flush=True)
    print(f"report: {Path(args.out) / 'offline_report.md'}", flush=True)
    return 0


def cmd_import(args) -> int:
    from qpo_ray.cli_import import run_import

    return run_import(args)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="qpo-ray", description="QPO prompt-policy training on Ray.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="the full multi-loop QPO pipeline (bootstrap → loops → report)")
    p.add_argument("--config", help=f"profile ({', '.join(PROFILES)}) or YAML file [tiny]; not with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.scratch.lr=1e-4 (repeatable); with --resume only "
                        "loops, raised to run more loops")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run; finished steps are skipped")
    p.set_defaults(fn=cmd_run)

    demo_help = ("the embedded demo (the demo profile: the mixed task, real SmolLM2 target): D0, 2 QPO loops, "
                 "report in runs/demo; ~11 min on 2 CPUs")
    p = sub.add_parser("demo", help=demo_help, description=demo_help + "; an existing runs/demo is resumed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the demo profile, e.g. --set loops=3 (repeatable)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("bootstrap", help="build D0 by scoring the task's prompt pool on its train queries")
    _config_args(p)
    p.set_defaults(fn=cmd_bootstrap)

    p = sub.add_parser("train", help="train a policy on one dataset version (Ray Train + DeepSpeed)")
    _config_args(p)
    p.add_argument("--data", required=True, help="RUN_DIR/data/vNNN")
    p.add_argument("--out", required=True, help="folder for the trained policy")
    p.add_argument("--schedule", choices=["scratch", "finetune"], default="scratch")
    p.add_argument("--init", help="policy folder to fine-tune (with --schedule finetune)")
    p.add_argument("--name", help="Ray Train run name (same name resumes from its latest checkpoint)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="write a prompt for each query with a trained policy, by the method and "
                                         "settings it was evaluated with (its inference.json)")
    p.add_argument("--policy", required=True, help="policy folder, e.g. RUN_DIR/policy/loop-2 or OUT/policy")
    p.add_argument("--in", dest="inp", required=True, help="text file (one query a line) or JSONL with 'query'")
    p.add_argument("--out", help="JSONL output (default: stdout)")
    _served_config_args(p, "e.g. --set eval.method=greedy --set eval.target_reward=80")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="rows per forward pass of generation [64]")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("score", help="score (query, prompt) pairs with the target pool")
    _config_args(p)
    p.add_argument("--in", dest="inp", required=True, help="parquet/jsonl with query, prompt [, label]")
    p.add_argument("--out", required=True, help="scored parquet (the dataset schema)")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("serve-target", help="an OpenAI-compatible completions server over the transformers engine")
    _config_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(fn=cmd_serve_target)

    p = sub.add_parser("serve", help="serve a trained policy over HTTP (Ray Serve): POST /v1/prompts, /docs")
    p.add_argument("--policy", required=True, help="policy folder, e.g. RUN_DIR/policy/loop-2 or OUT/policy")
    _served_config_args(p, "e.g. --set serve.num_replicas=2")
    p.add_argument("--host", help="bind address [serve.host]")
    p.add_argument("--port", type=int, help="HTTP port [serve.port]")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("eval", help="QPO against fixed-prompt baselines on held-out queries, with 95%% intervals: "
                                    "live (the run's target scores) or replay (recorded logs answer)")
    p.add_argument("--target", required=True, choices=EVAL_TARGETS,
                   help="live: evaluate the loops of --run-dir with its target; replay: split --data's logs by "
                        "query, train a policy in --out, answer its prompts from the logs")
    p.add_argument("--config", default=None, help="replay: profile or YAML [offline]; live: the run's config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override (repeatable); live: overrides the run's saved config, e.g. eval.best_of_n=8")
    p.add_argument("--run-dir", help="live: a qpo-ray run directory")
    p.add_argument("--loops", help="live: comma-separated loops to evaluate [every loop with a policy]")
    p.add_argument("--redo", action="store_true", help="live: re-evaluate loops that already have results")
    p.add_argument("--data", help="replay: run directory of an import made with --split all (or RUN_DIR/data/vNNN)")
    p.add_argument("--version", type=int, help="replay: dataset version [the latest that added rows]")
    p.add_argument("--out", help="replay: run directory for the train split, the policy and the report (a rerun "
                                 "reuses its policy)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="replay: share of unique queries held out [0.2]")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    pi = dsub.add_parser("import", help="import benchmark logs (jsonl/csv/parquet/Prompt-OIRL) as D0")
    from qpo_ray.cli_import import add_import_args

    add_import_args(pi)
    pi.set_defaults(fn=cmd_import)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # one INFO line per HTTP request (target health checks, the policy service's target)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except QPOError as e:
        print(f"qpo-ray: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        if args.verbose:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"qpo-ray: error: {where}{os_reason(e)}", file=sys.stderr)
        return 2
    except Stopped as e:
        resume = f"; resume with: qpo-ray run --resume {e.run_dir}" if e.run_dir is not None else ""
        print(f"qpo-ray: stopped by {e}{resume}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("qpo-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
