"""Building and serving the policy application (the deployment itself: ``qpo_ray.serve.deployment``).

Deploy with ``serve run qpo_ray.serve.app:build_app policy_dir=DIR``, a KubeRay RayService
(``import_path: qpo_ray.serve.app:build_app``), or ``qpo-ray serve --policy DIR``. Each resolves what to serve
with ``qpo_ray.policy.served.load_served``: the run's config, then the folder's ``inference.json`` (how the
policy was evaluated), then ``--set`` / ``overrides``. The policy folder is loaded once before anything is
deployed, so a damaged or incomplete one is one clear error (as ``qpo-ray generate`` says it), not a replica
that fails inside Serve.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
import socket
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from qpo_ray.errors import ConfigError, QPOError
from qpo_ray.policy.served import Served, describe_settings, load_served
from qpo_ray.serve.deployment import PolicyService, api_key, policy_name

log = logging.getLogger("qpo_ray.serve")

APP_NAME = "qpo-policy"


def make_app(policy_dir: str | Path, served: Served, *, ray_actor_options: dict[str, Any] | None = None
             ) -> Application:
    """The bound application: replicas/autoscaling from ``served.cfg.serve``; ``ray_actor_options`` for extras
    such as a runtime_env (the API key variable must exist in the replica's environment).

    Loads the policy here first: a folder it cannot rebuild is a ModelSourceError naming the cause."""
    from qpo_ray.policy.model import QPOPolicy

    path = Path(policy_dir).expanduser().resolve()
    if not (path / "policy_config.json").is_file():
        raise QPOError(f"policy {policy_dir}: not a saved QPO policy folder (no policy_config.json)")
    QPOPolicy.load(path)
    s = served.cfg.serve
    # Room for batches to fill while one runs, for answers waiting on the target, and for health checks
    # beside both (the deployment lets /v1/answer hold at most half).
    opts: dict[str, Any] = {"max_ongoing_requests": s.max_ongoing_requests}
    if s.autoscaling:
        opts["autoscaling_config"] = s.autoscaling
    else:
        opts["num_replicas"] = s.num_replicas
    if ray_actor_options:
        opts["ray_actor_options"] = ray_actor_options
    return PolicyService.options(**opts).bind(str(path), served.to_dict())


def _overrides(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # `serve run ... overrides="a.b=1 c.d=2"`
        return shlex.split(value)
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    raise ConfigError(f"overrides must be a list of KEY=VALUE strings, not {type(value).__name__}")


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args = {policy_dir, config?, overrides?}``.

    ``serve run qpo_ray.serve.app:build_app policy_dir=DIR [config=demo] [overrides="serve.num_replicas=2"]``
    or, in a KubeRay ``serveConfigV2``, ``import_path: qpo_ray.serve.app:build_app`` with ``args``. Paths must
    be readable where the replicas run (a shared volume on a multi-node cluster)."""
    unknown = set(args) - {"policy_dir", "config", "overrides"}
    if unknown:
        raise ConfigError(f"build_app: unknown argument(s) {sorted(unknown)} (policy_dir, config, overrides)")
    if not args.get("policy_dir"):
        raise ConfigError("build_app: 'policy_dir' is required (a folder written by QPOPolicy.save)")
    served = load_served(args["policy_dir"], args.get("config"), _overrides(args.get("overrides")))
    return make_app(args["policy_dir"], served)


def http_address() -> tuple[str, int] | None:
    """Host and port of the running Serve HTTP proxy, or None when Serve is not running."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    except Exception:  # private API: tolerate its changes, the caller falls back to the config
        return None
    if client is None:
        return None
    return client.http_config.host, client.http_config.port


def check_port_free(host: str, port: int) -> None:
    """A QPOError when ``host:port`` cannot be bound here (in use, or an address this machine lacks)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Serve's proxy binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror or e})"
            raise QPOError(f"serve.port: {host}:{port} {why}: pick another with --port (or --set serve.port=...)"
                           ) from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_policy(policy_dir: str | Path, served: Served, host: str | None = None, port: int | None = None,
                 blocking: bool = True) -> str:
    """Start Serve (Ray embedded, or RAY_ADDRESS's cluster) and deploy the policy; returns the base URL.

    Checked before Ray starts: the API key (``serve.api_key_env`` naming an unset or empty variable is a
    ConfigError), the policy folder, and, with Ray on this machine, that the port is free. With ``blocking`` it
    serves until interrupted."""
    import ray

    from qpo_ray.ray_init import init_ray

    host = host or served.cfg.serve.host
    port = port or served.cfg.serve.port
    api_key(served.cfg.serve)
    app = make_app(policy_dir, served)
    # Ray on this machine (not RAY_ADDRESS) and no Serve proxy yet: the proxy will bind here, and a port it
    # cannot bind fails inside Ray, with a traceback.
    if not os.environ.get("RAY_ADDRESS") and (not ray.is_initialized() or http_address() is None):
        check_port_free(host, port)
    init_ray()
    running = http_address()
    if running is not None and running[1] != port:
        log.warning("Serve already runs on %s:%d: the policy is served there, not on port %d", *running, port)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    h, p = http_address() or (host, port)
    url = f"http://{'127.0.0.1' if h in ('0.0.0.0', '::') else h}:{p}"
    print(f"policy {policy_name(policy_dir)} served at {url}/v1/prompts (docs: {url}/docs); "
          f"{describe_settings(served)}", flush=True)
    if blocking:
        # SIGTERM (Kubernetes, systemd, `kill`) ends the service as cleanly as Ctrl-C does.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping the policy service", flush=True)
            serve.delete(APP_NAME)
    return url


__all__ = ["APP_NAME", "build_app", "check_port_free", "http_address", "make_app", "serve_policy"]
