"""Building and serving the policy application (the deployment itself: ``qpo_ray.serve.deployment``).

Deploy with ``serve run qpo_ray.serve.app:build_app policy_dir=DIR``, a KubeRay RayService
(``import_path: qpo_ray.serve.app:build_app``), or ``qpo-ray serve --policy DIR``. Each resolves what to serve
with ``qpo_ray.policy.served.load_served``: the run's config, then the folder's ``inference.json`` (how the
policy was evaluated), then ``--set`` / ``overrides``.
"""

from __future__ import annotations

import logging
import shlex
import signal
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from qpo_ray.errors import ConfigError, QPOError
from qpo_ray.policy.served import Served, describe_settings, load_served
from qpo_ray.serve.deployment import PolicyService, policy_name

log = logging.getLogger("qpo_ray.serve")

APP_NAME = "qpo-policy"


def make_app(policy_dir: str | Path, served: Served, *, ray_actor_options: dict[str, Any] | None = None
             ) -> Application:
    """The bound application: replicas/autoscaling from ``served.cfg.serve``; ``ray_actor_options`` for extras
    such as a runtime_env (the API key variable must exist in the replica's environment)."""
    path = Path(policy_dir).expanduser().resolve()
    if not (path / "policy_config.json").is_file():
        raise QPOError(f"policy {policy_dir}: not a saved QPO policy folder (no policy_config.json)")
    s = served.cfg.serve
    opts: dict[str, Any] = {
        # Enough requests in flight on one replica to fill a batch while the previous one runs.
        "max_ongoing_requests": max(2 * s.max_batch_size, 8),
    }
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


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_policy(policy_dir: str | Path, served: Served, host: str | None = None, port: int | None = None,
                 blocking: bool = True) -> str:
    """Start Serve (Ray embedded, or RAY_ADDRESS's cluster) and deploy the policy; returns the base URL.

    With ``blocking`` it serves until interrupted."""
    from qpo_ray.ray_init import init_ray

    host = host or served.cfg.serve.host
    port = port or served.cfg.serve.port
    app = make_app(policy_dir, served)
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


__all__ = ["APP_NAME", "build_app", "http_address", "make_app", "serve_policy"]
