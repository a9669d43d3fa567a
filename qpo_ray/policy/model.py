"""The reward-conditioned prompt policy (docs/design.md §2) around any Hugging Face causal LM.

Sequence layout, per row (``nq`` real query tokens, ``Lq`` query slots, ``Lp+1`` prompt slots)::

    [ pad × (Lq-nq) | r | q_1 … q_nq | p_0 … p_Lp ]        length Lq + 1 + Lp + 1

The query arrives LEFT-padded, so putting the pads in front of the reward slot keeps the three segments
contiguous and puts the slot that predicts ``p_0`` at the fixed index ``Lq`` (the last query token, or
``r`` itself for an empty query). Pads are masked out and ``position_ids = cumsum(mask) - 1``, so every
real token sees the same context at the same positions whatever the padding: batched == unbatched.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from qpo_ray.config import PolicyConfig
from qpo_ray.errors import ConfigError, ModelSourceError
from qpo_ray.pretrained import load_causal_lm, load_tokenizer

WEIGHTS = "model.safetensors"
POLICY_CONFIG = "policy_config.json"
CANDIDATES = "prompts.json"  # written beside a trained policy: the prompts it was trained on, most rows first
FORMAT_VERSION = 1
SEG_REWARD, SEG_QUERY, SEG_PROMPT = 0, 1, 2


def _layer_list(body: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The body's stack of transformer blocks (``h`` in GPT-2, ``layers`` in Llama, …), found by shape."""
    for name, child in body.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n_layers:
            return name, child
    raise ModelSourceError(f"cannot find the {n_layers} transformer layers in {type(body).__name__}")


def _cache_kwarg(body: nn.Module) -> str:
    # transformers 5.2x renamed the body's `past_key_values` argument to `cache` (old name deprecated);
    # the vllm extra pins an older 5.x, so accept both.
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / POLICY_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{path}: not a saved QPO policy ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("policy"), dict):
        raise ModelSourceError(f"{path / POLICY_CONFIG}: no 'policy' section (not a saved QPO policy)")
    return meta


def check_saved_policy(path: Path) -> tuple[PolicyConfig, list[int] | None]:
    """The config and prompt vocabulary ``policy_config.json`` records, checked without loading weights; a
    ModelSourceError naming the folder when it is not a saved QPO policy."""
    meta = _read_meta(path)
    # save() writes every key: one missing means a damaged or hand-made file, and a default filled in for
    # it (another base model, the full vocabulary) would generate from a policy that was never trained.
    missing = [k for k in PolicyConfig.model_fields if k not in meta["policy"]]
    if missing:
        raise ModelSourceError(f"{path / POLICY_CONFIG}: 'policy' lacks {', '.join(missing)} "
                               "(written by QPOPolicy.save: the folder is damaged or incomplete)")
    if "vocab_ids" not in meta:
        raise ModelSourceError(f"{path / POLICY_CONFIG}: no 'vocab_ids' (null for the full vocabulary; written by "
                               "QPOPolicy.save: the folder is damaged or incomplete)")
    try:
        pcfg = PolicyConfig.model_validate(meta["policy"])
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ModelSourceError(f"{path / POLICY_CONFIG}: policy.{key}: {err['msg']}") from None
    vocab = meta["vocab_ids"]
    if vocab is not None and (not isinstance(vocab, list) or not all(type(i) is int for i in vocab)):
        raise ModelSourceError(f"{path / POLICY_CONFIG}: 'vocab_ids' must be a list of token ids")
    return pcfg, vocab


def trim_padding(query_ids: torch.Tensor, query_mask: torch.Tensor, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the pad columns no row of the batch uses: the leading ones of the (left-padded) queries and the
    trailing ones of the (right-padded) prompts. Positions come from the mask, so every real token sees the
    same context at the same position: only padding is skipped. Batches are padded to the configured
    maxima, and short queries and prompts left most of a CPU step's tokens as padding."""
    lq = max(1, int(query_mask.sum(1).max()))
    lp = max(1, int(prompt_mask.sum(1).max()))
    return query_ids[:, -lq:], query_mask[:, -lq:], prompt_ids[:, :lp], prompt_mask[:, :lp]


class QPOPolicy(nn.Module):
    """``(q, p, r) → (logits of p, r̂)``: a Decision-Transformer-style wrapper around a causal LM."""

    def __init__(self, base: PreTrainedModel, pcfg: PolicyConfig,
                 tokenizer: PreTrainedTokenizerBase | None = None, vocab_ids: list[int] | None = None):
        super().__init__()
        self.pcfg = pcfg
        self.tokenizer = tokenizer  # not a Module, so not a submodule
        self.base = base
        d = base.config.hidden_size
        self.d_model = d
        self.reward_in = nn.Linear(1, d)
        self.segment = nn.Embedding(3, d)  # C: reward / query / prompt
        self.embed_norm = nn.LayerNorm(d)
        self.prompt_proj = nn.Linear(d, d)
        self.reward_out = nn.Linear(d, 1)
        self._init_at_token_scale()
        self._apply_layer_limits()
        self._cache_kwarg = _cache_kwarg(self.body)
        self.vocab_ids: torch.Tensor | None = None
        self.set_vocab(vocab_ids)

    def _init_at_token_scale(self) -> None:
        """Start the new input modules at the scale of the base LM's token embeddings.

        ``nn.Embedding``'s default N(0, 1) segment vectors have norm √d (24 for d = 576) against ~3 for a
        SmolLM2 token (0.16 for a tiny random GPT-2): added to every query token, they left the token's identity
        a few percent of the vector, and the LayerNorm then fed the LM a near-constant input for every query.
        So the segments start as perturbations of a token's size and the LayerNorm's gain at the tokens'
        per-dimension scale, so the pretrained layers first see inputs like their own."""
        std = float(self.base.get_input_embeddings().weight.detach().float().std())
        with torch.no_grad():
            nn.init.normal_(self.segment.weight, std=std)
            self.embed_norm.weight.fill_(std)

    # -- the prompt vocabulary ---------------------------------------------------------------------
    def set_vocab(self, vocab_ids: list[int] | None) -> None:
        """Restrict the prompt head to these token ids (None = the whole vocabulary).

        The head's rows are those of the base LM's own output embedding, so a vocabulary is only an index:
        it adds no parameter, and a later loop can widen it. With GPT-2's or SmolLM2's ~50k-token
        vocabulary the full head is most of a CPU training step; the prompts of a dataset use a few
        hundred tokens.
        """
        if vocab_ids is None:
            self.vocab_ids = self._vocab_index = None
            return
        ids = sorted({int(i) for i in vocab_ids})
        n = self.base.get_output_embeddings().weight.shape[0]
        if not ids or ids[0] < 0 or ids[-1] >= n:
            raise ModelSourceError(f"prompt vocabulary ids must lie in [0, {n}); got {len(ids)} ids "
                                   f"from {ids[0] if ids else None} to {ids[-1] if ids else None}")
        dev = self.segment.weight.device
        self.vocab_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        index = torch.full((n,), -1, dtype=torch.long, device=dev)
        index[self.vocab_ids] = torch.arange(len(ids), device=dev)
        self._vocab_index = index

    def _apply(self, fn, *args, **kwargs):  # keep the vocabulary index on the module's device
        out = super()._apply(fn, *args, **kwargs)
        if self.vocab_ids is not None:
            self.vocab_ids, self._vocab_index = fn(self.vocab_ids), fn(self._vocab_index)
        return out

    def head_targets(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids → positions in the prompt head's output (identity for the whole vocabulary). Masked
        positions map to 0; a real token outside the vocabulary is an error, never a silent target."""
        if self.vocab_ids is None:
            return token_ids
        # The index lives with the module (on its accelerator); indexing it with ids on another device fails.
        dev = self._vocab_index.device
        token_ids, mask = token_ids.to(dev), mask.to(dev)
        idx = self._vocab_index[token_ids]
        idx = torch.where(mask.bool(), idx, torch.zeros_like(idx))
        if bool((idx < 0).any()):
            bad = token_ids[idx < 0].unique()[:5].tolist()
            raise ValueError(f"prompt tokens {bad} are not in the policy's prompt vocabulary "
                             f"({len(self.vocab_ids)} ids)")
        return idx

    def head_token_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions in the prompt head's output → token ids (the inverse of ``head_targets``)."""
        return positions if self.vocab_ids is None else self.vocab_ids[positions]

    # -- structure -----------------------------------------------------------------------------------
    @property
    def body(self) -> nn.Module:
        """The base LM without its head (GPT2Model, LlamaModel, …)."""
        return self.base.base_model

    @property
    def layers(self) -> nn.ModuleList:
        return _layer_list(self.body, self.base.config.num_hidden_layers)[1]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _apply_layer_limits(self) -> None:
        cfg = self.base.config
        name, layers = _layer_list(self.body, cfg.num_hidden_layers)
        keep = self.pcfg.keep_layers
        if keep is not None and keep < len(layers):  # idempotent: a loaded model is already cut
            setattr(self.body, name, nn.ModuleList(list(layers)[:keep]))
            cfg.num_hidden_layers = keep  # GPT-2 maps this onto n_layer; caches size themselves from it
            if isinstance(getattr(cfg, "layer_types", None), list):
                cfg.layer_types = cfg.layer_types[:keep]
            layers = getattr(self.body, name)
        if self.pcfg.freeze_layers > len(layers):
            raise ConfigError(f"policy.freeze_layers ({self.pcfg.freeze_layers}) exceeds the model's "
                              f"{len(layers)} transformer layers")
        for layer in list(layers)[: self.pcfg.freeze_layers]:
            layer.requires_grad_(False)
        if self.pcfg.freeze_embeddings:
            self.base.get_input_embeddings().requires_grad_(False)
            self.base.get_output_embeddings().requires_grad_(False)

    # -- building blocks -----------------------------------------------------------------------------
    def _embed(self, query_ids: torch.Tensor, query_mask: torch.Tensor,
               reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Un-normalised embeddings and mask of ``[pads | r | q]`` (``Lq+1`` slots) and the r-slot index."""
        wte = self.base.get_input_embeddings()
        B, Lq = query_ids.shape
        seg = self._segments(query_ids.device)
        q_emb = wte(query_ids) + seg[SEG_QUERY]
        r_emb = self.reward_in(reward.reshape(B, 1).to(q_emb.dtype) / self.pcfg.reward_scale) + seg[SEG_REWARD]
        r_pos = Lq - query_mask.sum(1)  # left padding: real tokens are the last nq slots
        slots = torch.arange(Lq + 1, device=query_ids.device)
        # Slot 0 is a placeholder: it is either r (a full-length query) or a masked pad.
        head = torch.cat([torch.zeros_like(q_emb[:, :1]), q_emb], dim=1)
        is_r = (slots[None, :] == r_pos[:, None])
        head = torch.where(is_r[..., None], r_emb[:, None, :], head)
        head_mask = (slots[None, :] >= r_pos[:, None]).to(query_mask.dtype)
        return head, head_mask, r_pos

    def _segments(self, device: torch.device) -> torch.Tensor:
        # Through the module call, not `.weight`: ZeRO-3 only gathers a partitioned parameter in forward hooks.
        return self.segment(torch.arange(3, device=device))

    def _embed_prompt(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return self.base.get_input_embeddings()(prompt_ids) + self._segments(prompt_ids.device)[SEG_PROMPT]

    def _run(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any = None,
             use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        out = self.body(inputs_embeds=self.embed_norm(x), attention_mask=mask, position_ids=pos,
                        use_cache=use_cache, **{self._cache_kwarg: cache})
        # Outputs name the cache like the argument does (reading the other name triggers a deprecation warning).
        return out.last_hidden_state, (getattr(out, self._cache_kwarg) if use_cache else None)

    def prompt_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Prompt head: ``lm_head(ReLU(W h))`` with the base LM's own output embedding, over the prompt
        vocabulary when one is set (``head_token_ids`` maps an output position back to a token id)."""
        z = torch.relu(self.prompt_proj(hidden))
        head = self.base.get_output_embeddings()
        if self.vocab_ids is None:
            return head(z)
        bias = head.bias.index_select(0, self.vocab_ids) if getattr(head, "bias", None) is not None else None
        return F.linear(z, head.weight.index_select(0, self.vocab_ids), bias)

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(1) - 1).clamp_min(0)

    # -- training forward ----------------------------------------------------------------------------
    def forward(self, query_ids: torch.Tensor, query_mask: torch.Tensor, prompt_ids: torch.Tensor,
                prompt_mask: torch.Tensor, reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, V]`` for the prompt tokens (position i predicts ``prompt_ids[:, i]``; ``T`` ≤ Lp+1 is
        the batch's longest prompt with its EOS, see ``trim_padding``) and the reward prediction ``[B]``."""
        query_ids, query_mask, prompt_ids, prompt_mask = trim_padding(query_ids, query_mask, prompt_ids, prompt_mask)
        head, head_mask, r_pos = self._embed(query_ids, query_mask, reward)
        x = torch.cat([head, self._embed_prompt(prompt_ids)], dim=1)
        mask = torch.cat([head_mask, prompt_mask.to(head_mask.dtype)], dim=1)
        pos = self._positions(mask)
        h, _ = self._run(x, mask, pos)
        Lq, Lp1 = query_ids.shape[1], prompt_ids.shape[1]
        # Slot Lq holds the last query token, which predicts p_0; slot Lq+1+i holds p_i, predicting p_{i+1}.
        logits = self.prompt_logits(h[:, Lq:Lq + Lp1])
        rows = torch.arange(h.shape[0], device=h.device)
        if self.pcfg.reward_head == "reward_slot":
            # The reference's head: position r sees only r itself (docs/design.md §2 quirk), kept for fidelity.
            reward_pred = self.reward_out(h[rows, r_pos]).squeeze(-1)
        else:
            reward_pred = self._blind_reward(x, mask, pos, Lq + prompt_mask.sum(1))
        return logits, reward_pred

    def _blind_reward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                      last: torch.Tensor) -> torch.Tensor:
        # Under the conditioning pass every prompt position can read r from the reward slot, so a head there
        # learns to copy its input. A second pass with the r slot masked out makes r̂ a function of (q, p)
        # alone: an estimate usable to rank prompts (best-of-N). Positions stay those of the first pass.
        r_slot = (pos == 0) & (mask > 0)  # the first real slot of every row is r
        h, _ = self._run(x, mask * (~r_slot).to(mask.dtype), pos)
        rows = torch.arange(h.shape[0], device=h.device)
        return self.reward_out(h[rows, last]).squeeze(-1)

    def predict_reward(self, query_ids: torch.Tensor, query_mask: torch.Tensor, prompt_ids: torch.Tensor,
                       prompt_mask: torch.Tensor) -> torch.Tensor:
        """``r̂(q, p)`` from the "last_prompt" head (no reward input needed), ``[B]``."""
        if self.pcfg.reward_head != "last_prompt":
            raise ConfigError("reward ranking needs policy.reward_head = 'last_prompt' (the 'reward_slot' "
                              "head only sees its own input)")
        query_ids, query_mask, prompt_ids, prompt_mask = trim_padding(query_ids, query_mask, prompt_ids, prompt_mask)
        dummy = torch.zeros(query_ids.shape[0], device=query_ids.device)
        head, head_mask, _ = self._embed(query_ids, query_mask, dummy)
        x = torch.cat([head, self._embed_prompt(prompt_ids)], dim=1)
        mask = torch.cat([head_mask, prompt_mask.to(head_mask.dtype)], dim=1)
        return self._blind_reward(x, mask, self._positions(mask), query_ids.shape[1] + prompt_mask.sum(1))

    # -- incremental decoding (used by qpo_ray.policy.generate) --------------------------------------
    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor,
              reward: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
        """Run ``[pads | r | q]`` once. Returns the hidden state predicting ``p_0`` ``[B, d]``, the KV cache,
        the attention mask so far and the position of the next token ``[B]``."""
        head, mask, _ = self._embed(query_ids, query_mask, reward)
        pos = self._positions(mask)
        h, cache = self._run(head, mask, pos, use_cache=True)
        return h[:, -1], cache, mask, pos[:, -1] + 1

    def step(self, token_ids: torch.Tensor, cache: Any, mask: torch.Tensor,
             pos: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Feed one prompt token per row. ``mask`` must already include the new token's column."""
        x = self._embed_prompt(token_ids.reshape(-1, 1))
        h, cache = self._run(x, mask, pos.reshape(-1, 1), cache=cache, use_cache=True)
        return h[:, -1], cache

    # -- construction and persistence ----------------------------------------------------------------
    @classmethod
    def from_config(cls, pcfg: PolicyConfig, seed: int = 0) -> QPOPolicy:
        """A fresh policy on a pretrained (or tiny random) base LM; the new heads are seeded."""
        tiny = {"layers": pcfg.tiny_layers, "hidden": pcfg.tiny_hidden, "heads": pcfg.tiny_heads, "seed": seed}
        base = load_causal_lm(pcfg.model, tiny=tiny)
        tok = load_tokenizer(pcfg.tokenizer, pcfg.model)
        if len(tok) > base.config.vocab_size:
            raise ModelSourceError(f"tokenizer '{pcfg.tokenizer or pcfg.model}' has {len(tok)} tokens but model "
                                   f"'{pcfg.model}' only {base.config.vocab_size} embeddings")
        torch.manual_seed(seed)
        return cls(base, pcfg, tok)

    def save(self, path: str | Path) -> None:
        """Write weights, the base LM's config, the policy config and the tokenizer into a folder."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / WEIGHTS))  # drops the tied lm_head/wte duplicate
        self.base.config.save_pretrained(path)
        meta = {"format": FORMAT_VERSION, "policy": self.pcfg.model_dump(mode="json"), "d_model": self.d_model,
                "base_class": type(self.base).__name__,
                "vocab_ids": None if self.vocab_ids is None else self.vocab_ids.tolist()}
        (path / POLICY_CONFIG).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    @staticmethod
    def candidates(path: str | Path) -> list[str]:
        """The prompts a saved policy was trained on (``prompts.json``; empty when the folder has none)."""
        f = Path(path) / CANDIDATES
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else []

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> QPOPolicy:
        """Rebuild a saved policy from its folder alone (no hub). Returned in eval mode.

        Every way a folder can be malformed (a missing or mistyped ``policy_config.json`` field, a value out of
        the config's bounds, weights of another shape) is a ModelSourceError naming the folder."""
        path = Path(path)
        pcfg, vocab = check_saved_policy(path)
        try:
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
            tok = load_tokenizer(str(path), str(path)) if (path / "tokenizer_config.json").exists() else None
            policy = cls(base, pcfg, tok, vocab_ids=vocab)
            load_model(policy, str(path / WEIGHTS), strict=True, device=str(device))
        except (ModelSourceError, ConfigError):
            raise
        except Exception as e:  # transformers / safetensors: missing files, shapes that do not fit
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelSourceError(f"{path}: cannot rebuild the saved policy ({first[:300]})") from None
        return policy.to(device).eval()
