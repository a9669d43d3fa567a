"""A small OpenAI-compatible server on the transformers engine, as a Ray Serve app (``qpo-ray serve-target``).

Endpoints (greedy decoding only):

- ``POST /v1/completions``: ``prompt`` (text or list), ``max_tokens`` (0 allowed), ``echo``, ``logprobs``
  (legacy format: ``tokens``, ``token_logprobs``, ``text_offset``; the first prompt token's logprob is null;
  ``top_logprobs`` are not computed and come back null);
- ``POST /v1/chat/completions``: messages through the tokenizer's chat template (plain concatenation when it
  has none), ``logprobs: true`` gives the reply tokens' logprobs;
- ``GET /v1/models``.

Request bodies are bounded: a body over ``max_body_bytes`` or with more than ``max_prompts`` prompts is
413; a prompt whose tokens plus ``max_tokens`` exceed ``target.max_length`` is 422; a temperature above 0
is 422 (this server only decodes greedily); text with a lone surrogate is 422. Every error body is JSON
(``qpo_ray.http_api``). Concurrent requests are batched per prompt (``score.batcher``): one batcher for
log-probabilities, one for generation; a prompt that fails in the model fails alone.
"""

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from qpo_ray.config import RunConfig, TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.http_api import check_text, install_error_handlers, json_safe
from qpo_ray.score.batcher import EngineBatcher

APP_NAME = "qpo-target-server"
MAX_PROMPTS = 64
MAX_BODY_BYTES = 1 << 20

api = FastAPI(title="qpo-ray target server")
install_error_handlers(api)  # before @serve.ingress copies the app
Text = Annotated[str, AfterValidator(check_text)]


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: Text | list[Text]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    temperature: float | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Text
    content: Text


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    temperature: float | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False


async def read_body(request: Request, model: type[BaseModel], max_bytes: int) -> Any:
    """Parse a JSON body without ever holding more than ``max_bytes`` of it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request body over {max_bytes} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise HTTPException(413, f"request body over {max_bytes} bytes")
    try:
        return model.model_validate(json.loads(raw or b"null"))
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"body is not JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise HTTPException(400, f"body is not UTF-8 text: byte {e.start}") from None
    except ValidationError as e:
        # Not e.json(): it raises on an echoed lone surrogate, which made this 422 a 500.
        errors = [{k: v for k, v in err.items() if k != "url"} for err in e.errors()]
        raise HTTPException(422, json_safe(errors)) from None


@serve.deployment(name="TargetServer")
@serve.ingress(api)
class TargetServer:
    def __init__(self, cfg: dict[str, Any], max_prompts: int = MAX_PROMPTS, max_body_bytes: int = MAX_BODY_BYTES):
        from qpo_ray.score.engines.transformers_engine import TransformersEngine

        self.cfg = TargetConfig.model_validate(cfg)
        self.engine = TransformersEngine(self.cfg)
        self.tok = self.engine.tok
        self.max_prompts, self.max_body = max_prompts, max_body_bytes
        size, wait = self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s
        self.logprobs_batcher = EngineBatcher(self._logprobs, size, wait)
        self.generate_batcher = EngineBatcher(self._generate, size, wait)

    # -- batched model work -------------------------------------------------------------------------
    def _logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        return self.engine.token_logprobs(seqs, [len(s) - 1 for s in seqs])

    def _generate(self, items: list[tuple[list[int], int]]) -> list[tuple[list[int], bool]]:
        # Greedy continuations are prefixes of longer ones, so one run to the longest budget serves all.
        gens, stopped = self.engine.generate([s for s, _ in items], max(n for _, n in items))
        return [(g[:n], stop and len(g) < n) for (_, n), g, stop in zip(items, gens, stopped, strict=True)]

    # -- helpers ------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model:
            raise HTTPException(404, f"model '{model}' is not served here (serving '{self.cfg.model}')")

    def _check_len(self, ids: list[int], new: int, i: int = 0) -> None:
        if not ids:
            raise HTTPException(422, f"prompt {i} is empty (no tokens to condition on)")
        if len(ids) + new > self.cfg.max_length:
            raise HTTPException(422, f"prompt {i}: {len(ids)} tokens + max_tokens {new} exceed the server's "
                                     f"max_length {self.cfg.max_length}")

    def _prompt_pieces(self, text: str) -> tuple[list[int], list[str], list[int]]:
        """Token ids of a prompt and, per token, its text and character offset (pieces tile the text)."""
        enc = self.tok(text, add_special_tokens=True, return_offsets_mapping=True)
        pieces, offsets, end = [], [], 0
        for _, stop in enc["offset_mapping"]:
            stop = max(stop, end)  # special tokens map to (0, 0): an empty piece where we are
            pieces.append(text[end:stop])
            offsets.append(end)
            end = stop
        return enc["input_ids"], pieces, offsets

    def _gen_pieces(self, gen: list[int]) -> list[str]:
        pieces, prev = [], ""
        for j in range(len(gen)):
            cur = self.tok.decode(gen[: j + 1], skip_special_tokens=True)
            pieces.append(cur[len(prev):])
            prev = cur
        return pieces

    async def _complete_one(self, text: str, body: CompletionBody, i: int) -> dict[str, Any]:
        ids, pieces, offsets = self._prompt_pieces(text)
        self._check_len(ids, body.max_tokens, i)
        gen, stopped = (([], False) if body.max_tokens <= 0
                        else await self.generate_batcher.submit((ids, body.max_tokens)))
        gen_pieces = self._gen_pieces(gen)
        completion = "".join(gen_pieces)
        choice: dict[str, Any] = {"index": i, "text": (text if body.echo else "") + completion, "logprobs": None,
                                  "finish_reason": "stop" if stopped or body.max_tokens == 0 else "length"}
        if body.logprobs is not None:
            lps = await self.logprobs_batcher.submit(ids + gen) if len(ids) + len(gen) > 1 else []
            gen_offsets, pos = [], len(text)
            for p in gen_pieces:
                gen_offsets.append(pos)
                pos += len(p)
            toks, vals, offs = gen_pieces, lps[len(ids) - 1:], gen_offsets
            if body.echo:
                toks, vals, offs = pieces + toks, [None, *lps[: len(ids) - 1]] + vals, offsets + offs
            choice["logprobs"] = {"tokens": toks, "token_logprobs": vals, "text_offset": offs,
                                  "top_logprobs": None}
        return {"choice": choice, "prompt_tokens": len(ids), "completion_tokens": len(gen)}

    # -- endpoints ----------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.cfg.model, "object": "model", "owned_by": "qpo-ray"}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> dict[str, Any]:
        body: CompletionBody = await read_body(request, CompletionBody, self.max_body)
        self._check_model(body.model)
        if body.temperature:
            raise HTTPException(422, "this server decodes greedily only: use temperature 0")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise HTTPException(422, "'prompt' is an empty list")
        if len(prompts) > self.max_prompts:
            raise HTTPException(413, f"{len(prompts)} prompts in one request; at most {self.max_prompts}")
        parts = await asyncio.gather(*(self._complete_one(p, body, i) for i, p in enumerate(prompts)))
        pt, ct = sum(p["prompt_tokens"] for p in parts), sum(p["completion_tokens"] for p in parts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.cfg.model, "choices": [p["choice"] for p in parts],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> dict[str, Any]:
        body: ChatBody = await read_body(request, ChatBody, self.max_body)
        self._check_model(body.model)
        if body.temperature:
            raise HTTPException(422, "this server decodes greedily only: use temperature 0")
        messages = [m.model_dump() for m in body.messages]
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.engine.encode(text, special=False)
        else:  # a base model: the turns as plain text, as the transformers engine does
            ids = self.engine.encode("\n".join(m["content"] for m in messages))
        new = body.max_completion_tokens or body.max_tokens or self.cfg.max_new_tokens
        self._check_len(ids, new)
        gen, stopped = await self.generate_batcher.submit((ids, new))
        pieces = self._gen_pieces(gen)
        logprobs = None
        if body.logprobs and gen:
            lps = (await self.logprobs_batcher.submit(ids + gen))[len(ids) - 1:]
            logprobs = {"content": [{"token": p, "logprob": lp, "bytes": list(p.encode()), "top_logprobs": []}
                                    for p, lp in zip(pieces, lps, strict=True)]}
        elif body.logprobs:
            logprobs = {"content": []}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.cfg.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "logprobs": logprobs, "finish_reason": "stop" if stopped else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(gen),
                          "total_tokens": len(ids) + len(gen)}}


def _target_cfg(cfg: RunConfig | TargetConfig) -> TargetConfig:
    return cfg.target if isinstance(cfg, RunConfig) else cfg


def serve_target(cfg: RunConfig | TargetConfig, host: str = "127.0.0.1", port: int = 8000, *,
                 blocking: bool = False, name: str = APP_NAME, max_prompts: int = MAX_PROMPTS,
                 max_body_bytes: int = MAX_BODY_BYTES) -> str:
    """Deploy the server (``target.model`` on the transformers engine); returns its base URL (``.../v1``).

    With ``blocking`` it serves until interrupted, then deletes the app.
    """
    import httpx

    from qpo_ray.ray_init import init_ray
    from qpo_ray.resources import autoscaler_adds_nodes, check_cluster, target_need

    target = _target_cfg(cfg)
    init_ray()
    check_cluster([[target_need(target)]], can_grow=autoscaler_adds_nodes(),
                  wait_s=cfg.resource_wait_s if isinstance(cfg, RunConfig) else 0.0)
    serve.start(http_options={"host": host, "port": port})
    app = TargetServer.options(
        num_replicas=target.num_replicas,
        ray_actor_options={"num_cpus": target.num_cpus_per_replica, "num_gpus": target.num_gpus_per_replica},
        max_ongoing_requests=4 * target.max_batch_size,
    ).bind(target.model_dump(mode="json"), max_prompts, max_body_bytes)
    serve.run(app, name=name, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/v1"
    for _ in range(50):  # Serve may already be running on this cluster with other HTTP options
        try:
            if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        serve.delete(name)
        raise TargetError(f"the target server does not answer on {url}: Serve may already be running on this "
                          f"Ray cluster without HTTP or on another port (serve.shutdown() first)")
    if blocking:
        print(f"[qpo-ray] serving {target.model} at {url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.delete(name)
    return url


def serve_target_main(cfg: RunConfig | TargetConfig, host: str, port: int) -> None:
    """``qpo-ray serve-target``: serve until Ctrl-C."""
    serve_target(cfg, host, port, blocking=True)
