"""The trained policy behind HTTP (Ray Serve + FastAPI): ``qpo-ray serve``, ``serve run``, KubeRay RayService."""

from qpo_ray.serve.app import APP_NAME, build_app, make_app, serve_policy

__all__ = ["APP_NAME", "build_app", "make_app", "serve_policy"]
