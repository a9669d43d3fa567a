"""Stage 2 — policy training: Ray Data ingest (``loader``) and Ray Train V2 + DeepSpeed (``trainer``)."""

from qpo_ray.train.trainer import TrainResult, train_policy

__all__ = ["TrainResult", "train_policy"]
