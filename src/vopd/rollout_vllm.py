"""Rollouts from a vLLM server (`rollout.engine=vllm`), behind the same `RolloutEngine` interface.

Server mode: vopd talks to vLLM's OpenAI-compatible server over HTTP. Either vopd starts it
(``python -m vllm.entrypoints.openai.api_server`` from ``rollout.vllm_python``, the interpreter
of a separate environment made by ``scripts/setup_vllm.sh``) on a snapshot of the policy it
writes, or it connects to a server the user started (``rollout.vllm_url``) on the same weights.

What the trainer and the engine must agree on, and how it is enforced:

- **The prompt.** The trainer's prompt ids (chat template applied, image placeholder expanded)
  are decoded, the run of image-pad tokens collapsed back to one placeholder, and sent with a
  pass-through chat template, so vLLM expands the placeholder exactly once. vLLM returns the
  prompt ids it actually ran (``return_token_ids``); any difference from the trainer's ids, in
  particular another image-token count, raises `EngineMismatchError` — never a shifted loss.
- **The image.** The exact pixels the trainer's model sees are rebuilt from its ``pixel_values``
  (Qwen patch layout, un-normalised to 8-bit RGB at the processed size) and re-checked against
  the trainer's processor before sending, so the engine's processor has nothing left to resize.
- **The sampling distribution.** Vision tokens blocked (logit bias -100), temperature, top-p;
  the server runs with ``--logprobs-mode processed_logprobs`` so the returned per-token
  log-probs are those of the distribution sampled from, as `Rollouts.sampler_logp_B_T` requires
  (and as ``loss.rollout_correction`` uses). ``--generation-config vllm`` keeps the checkpoint's
  generation_config from changing the sampler.
- **The weights.** Before sampling, if the policy's parameters changed since the last push (an
  optimiser step bumps their in-place version counters), the engine writes them as a
  ``save_pretrained`` snapshot (the same tensor names the server loaded) and calls
  ``POST /collective_rpc`` ``reload_weights`` then resets the prefix and encoder caches (without
  the encoder-cache reset the next image request kills vLLM 0.32's engine). This needs
  ``VLLM_SERVER_DEV_MODE=1`` on the server. The cost is reported as ``time_weight_sync``.
  Under ``parallel.strategy=fsdp2`` the push is collective: each rank writes its own shards into
  the snapshot (`vopd.sharded_snapshot`), rank 0 starts or reloads the one server all ranks use.
  With a LoRA student (``adapters``) the server runs on the base and each push is the adapter
  alone, loaded under a new name that sampling requests then name (`vopd.vllm_lora`).

On GPU, vLLM's NCCL weight-transfer routes would replace the snapshot; colocated mode (vLLM in the
training process, sleep/wake between phases) is the documented next step (docs/vllm.md).
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel

from vopd.config import RolloutConfig
from vopd.models import vision_token_ids
from vopd.rollout import Rollouts, eos_token_ids, response_mask
from vopd.sharded_snapshot import is_sharded, write_sharded_snapshot
from vopd.stock_processor import make_processor_stock

__all__ = [
    "EngineMismatchError",
    "VLLMServerEngine",
    "check_engine_prompt",
    "qwen_images_from_pixels",
    "server_command",
    "server_env",
]

# Renders only the text part of the user turn: the text already is the full templated prompt.
PASSTHROUGH_TEMPLATE = (
    "{%- for m in messages -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endfor -%}"
)
SERVED_NAME = "vopd-policy"
# Logit bias vLLM accepts (it clamps to [-100, 100]): exp(-100) is 0 in float32 after the softmax.
_BLOCK_BIAS = -100


class EngineMismatchError(RuntimeError):
    """The engine would sample from other inputs than the trainer scores (prompt ids, image, weights)."""


class VLLMServerEngine:
    """Sample rollouts from a vLLM OpenAI-compatible server; see the module docstring.

    Args:
        processor: the trainer's processor (chat template, tokenizer, image processor).
        work_dir: where the policy snapshot (and the server log) live; created if missing.
        url: a running server (``http://host:port``); None starts one with ``python``.
        python: the vLLM environment's interpreter (default ``.venv-vllm/bin/python``).
        server_args: extra arguments for the server command line.
        startup_timeout: seconds to wait for a started server to become healthy
            (``rollout.vllm_start_timeout``).
        request_timeout: seconds one request may wait for its reply (``rollout.vllm_request_timeout``).
        request_threads: concurrent HTTP requests (vLLM batches concurrent requests).
        adapters: the peft model of a LoRA student (``lora.r > 0``): the server then serves the base
            with LoRA enabled and pushes send only the student adapter (`vopd.vllm_lora`).

    ``interruptible`` is True while the engine only waits (for the server to start, or for replies):
    the trainer's signal handler then stops the run at once instead of finishing the step.
    """

    def __init__(
        self,
        processor: Any,
        *,
        work_dir: str | Path,
        url: str | None = None,
        python: str = ".venv-vllm/bin/python",
        server_args: Sequence[str] = (),
        startup_timeout: float = 300.0,
        request_timeout: float = 120.0,
        request_threads: int = 64,
        adapters: Any = None,
    ) -> None:
        self.processor = processor
        self.work_dir = Path(work_dir)
        self.url = url.rstrip("/") if url else None
        self.python = python
        self.server_args = list(server_args)
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.interruptible = False
        self.request_threads = request_threads
        self.process: subprocess.Popen | None = None
        self._fingerprint: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.last_push_seconds = 0.0
        self.push_seconds_total = 0.0
        self.pushes = 0
        self._step_push_seconds = 0.0
        self.lora = None
        if adapters is not None:
            from vopd.vllm_lora import AdapterPush

            self.lora = AdapterPush(adapters, self.work_dir, SERVED_NAME)

    @property
    def served_model(self) -> str:
        """What sampling requests name: the current adapter (LoRA), else the served policy."""
        return self.lora.name if self.lora is not None and self.lora.name else SERVED_NAME

    # ------------------------------------------------------------------ server lifecycle

    @property
    def snapshot_dir(self) -> Path:
        return self.work_dir / "policy"

    def _write_snapshot(self, model: PreTrainedModel, *, with_processor: bool) -> None:
        out = self.snapshot_dir
        out.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:  # the server starts on the base; adapters are pushed separately
            from vopd.vllm_lora import write_base_snapshot

            write_base_snapshot(model, out)
        else:
            model.save_pretrained(out, safe_serialization=True)
        if with_processor:
            self.processor.save_pretrained(out)
            make_processor_stock(out)

    def start(self, model: PreTrainedModel) -> None:
        """Start a server on a snapshot of ``model``, or push ``model``'s weights to the user's server.

        A user's server (``url``) must see this machine's ``work_dir`` (weights go by a snapshot
        file) and run with VLLM_SERVER_DEV_MODE=1 and vopd's pass-through chat template.
        """
        if self.url is not None:
            self.push_weights(model)  # whatever it was started on, it now has the trainer's weights
            self._step_push_seconds = 0.0
        else:
            self._check_python()
            self._write_snapshot(model, with_processor=True)
            self._launch(str(next(model.parameters()).dtype).replace("torch.", ""))
            if self.lora is not None:  # the base is served; the adapter goes in as the first push
                self.push_weights(model)
                self._step_push_seconds = 0.0
            self._fingerprint = self._fingerprint_of(model)

    def _check_python(self) -> None:
        if not Path(self.python).exists():
            raise FileNotFoundError(
                f"rollout.engine=vllm: no vLLM interpreter at {self.python}. Run `bash scripts/setup_vllm.sh` "
                "(makes .venv-vllm), or set rollout.vllm_python, "
                "or start a server yourself and set rollout.vllm_url"
            )

    def _launch(self, dtype: str) -> None:
        """Start a server on the snapshot already written and wait until it is healthy."""
        port = _free_port()
        cmd = server_command(
            Path(self.python),
            self.snapshot_dir,
            port,
            self.work_dir / "passthrough_template.jinja",
            dtype=dtype,
            # rollout.vllm_args come last: a flag given there (e.g. --max-loras) wins over vopd's LoRA defaults
            extra=[*(self.lora.server_args() if self.lora is not None else []), *self.server_args],
        )
        env = server_env()
        if self.lora is not None:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the /v1/(un)load_lora_adapter routes
        log = (self.work_dir / "vllm_server.log").open("w")
        # Its own process group (close() stops the server and its workers together), and a death
        # signal from the kernel if this process dies without running close() (SIGKILL): no orphan.
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        atexit.register(self.close)
        self.url = f"http://127.0.0.1:{port}"
        try:
            self._wait_healthy()
        except BaseException:  # a timeout, a signal, Ctrl-C: the server must not outlive the wait
            self.close()
            self.url = None  # else the next sync takes the dead server for a user's and pushes to it
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        self.interruptible = True
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"the vLLM server exited with code {self.process.returncode}:\n{self._log_tail()}"
                    )
                try:
                    with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(1.0)
        finally:
            self.interruptible = False
        self.close()
        raise TimeoutError(
            f"the vLLM server was not healthy after {self.startup_timeout:.0f} s (rollout.vllm_start_timeout; "
            f"log: {self.work_dir / 'vllm_server.log'}):\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 40) -> str:
        log = self.work_dir / "vllm_server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"

    def close(self) -> None:
        """Stop a server this engine started (a user's server is left running)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # ------------------------------------------------------------------ weights

    def push_weights(self, model: PreTrainedModel) -> float:
        """Load ``model``'s current weights into the server; returns the seconds it took."""
        start = time.perf_counter()
        if self.lora is not None:  # the adapter alone, under a new name (vopd.vllm_lora)
            self.lora.push(lambda route, body: self._post(route, body, text=True))
        else:
            self._write_snapshot(model, with_processor=False)
            self._reload()
        self._fingerprint = self._fingerprint_of(model)
        seconds = time.perf_counter() - start
        self.last_push_seconds, self.pushes = seconds, self.pushes + 1
        self.push_seconds_total += seconds
        self._step_push_seconds += seconds
        return seconds

    def _reload(self) -> None:
        """Make the server load the snapshot's weights, and drop what it cached from the old ones."""
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(self.snapshot_dir)}})
        self._post("/reset_prefix_cache", None)
        self._post("/reset_encoder_cache", None)  # else the next image request fails (Encoder cache miss)

    def _sync(self, model: PreTrainedModel) -> None:
        """Start/connect on the first call, push changed weights later. With several training
        processes (same weights on each) only the main one pushes to the shared server; all wait."""
        from accelerate import PartialState

        if is_sharded(model):
            self._sync_sharded(model)
            return
        state = PartialState()
        if state.num_processes > 1 and self.url is None:
            raise ValueError(
                "rollout.engine=vllm with several training processes: start one vLLM server yourself "
                "(docs/vllm.md) and set rollout.vllm_url; vopd starts a server only for single-process "
                "and parallel.strategy=fsdp2 runs"
            )
        if self._fingerprint is not None and self._fingerprint_of(model) == self._fingerprint:
            return
        if state.is_main_process:
            if self._fingerprint is None:
                self.start(model)
            else:
                self.push_weights(model)
        else:
            self._fingerprint = self._fingerprint_of(model)
            if self.lora is not None:
                self.lora.advance()  # the main process pushed the next adapter: name it too
        state.wait_for_everyone()

    def _sync_sharded(self, model: PreTrainedModel) -> None:
        """FSDP2 (``model``'s parameters are shards): the push is collective. Every rank writes its own
        shards into the snapshot (`vopd.sharded_snapshot`: no rank holds a full copy); rank 0 then starts
        the server (first call, no ``url``) or reloads it, and sends the others its URL (or its error);
        they wait for that, so no rank samples before the server has the new weights.

        Changes are counted by optimiser steps: a DTensor's in-place updates do not bump its version
        counter. Every rank votes, and all push if any rank saw a change (all or none enter the collective).
        """
        import torch.distributed as dist

        if self.lora is not None:  # the same on every rank: all raise, none waits in a collective
            raise ValueError(
                "rollout.engine=vllm: a LoRA student (adapters) with an FSDP2-sharded model is not supported: "
                "the sharded push writes the full snapshot, not the adapter; LoRA runs with parallel.strategy=ddp"
            )
        fingerprint = (id(model), _optimizer_steps())
        changed = torch.tensor([int(fingerprint != self._fingerprint)], device=next(model.parameters()).device)
        dist.all_reduce(changed, op=dist.ReduceOp.MAX)
        if not changed.item():
            return
        begin = time.perf_counter()
        launch = self._fingerprint is None and self.url is None
        if launch:  # before the collective write: a missing environment fails fast, on every rank
            missing: list[str | None] = [None]
            if dist.get_rank() == 0:
                try:
                    self._check_python()
                except FileNotFoundError as err:
                    missing[0] = str(err)
            dist.broadcast_object_list(missing, src=0)
            if missing[0]:
                raise FileNotFoundError(missing[0])
        write_sharded_snapshot(model, self.snapshot_dir)  # collective; a rank's failure raises on every rank
        reply: list[Any] = [self.url, None]
        if dist.get_rank() == 0:
            try:
                if launch:
                    self.processor.save_pretrained(self.snapshot_dir)
                    make_processor_stock(self.snapshot_dir)
                    self._launch(str(next(model.parameters()).dtype).replace("torch.", ""))
                else:
                    self._reload()
            except Exception as err:  # sent to the other ranks, which raise it too
                reply[1] = f"{type(err).__name__}: {err}"
            reply[0] = self.url
        dist.broadcast_object_list(reply, src=0)  # the other ranks wait here for the server
        if reply[1]:
            raise RuntimeError(f"rank 0 could not {'start' if launch else 'update'} the vLLM server: {reply[1]}")
        self.url, first, self._fingerprint = reply[0], self._fingerprint is None, fingerprint
        seconds = time.perf_counter() - begin
        self.last_push_seconds, self.pushes = seconds, self.pushes + 1
        if not first:  # as in start(): the initial snapshot is not a step's weight sync
            self.push_seconds_total += seconds
            self._step_push_seconds += seconds

    def _fingerprint_of(self, model: PreTrainedModel) -> Any:
        return (id(model), self.lora.fingerprint()) if self.lora is not None else _fingerprint(model)

    def step_metrics(self) -> dict[str, float]:
        """Seconds spent pushing weights since the last call (the trainer logs it per step)."""
        seconds, self._step_push_seconds = self._step_push_seconds, 0.0
        return {"time_weight_sync": seconds}

    # ------------------------------------------------------------------ sampling

    def sample(
        self, model: PreTrainedModel, prompt_batch: Any, cfg: RolloutConfig, *, generator_seed: int | None = None
    ) -> Rollouts:
        """Sample ``cfg.n`` responses per prompt row (prompt-major), after syncing the weights."""
        with self._lock:
            self._sync(model)
        eos = eos_token_ids(self.processor, model)
        tok = getattr(self.processor, "tokenizer", self.processor)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        prompts = self._prompts(prompt_batch)
        if generator_seed is not None:
            seeds = [generator_seed + i for i in range(len(prompts))]
        else:  # follow the trainer's global RNG, so a seeded run is reproducible
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        blocked = vision_token_ids(self.processor, model)
        body = {
            "model": self.served_model,
            "n": cfg.n,
            "max_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_p": 1.0 if cfg.temperature == 0 else cfg.top_p,
            "logprobs": True,
            "top_logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "stop_token_ids": eos,
            "logit_bias": {str(i): _BLOCK_BIAS for i in blocked},
            "add_generation_prompt": False,
        }
        replies = self._map(lambda a: self._request(body, *a), list(zip(prompts, seeds)))
        rows: list[list[int]] = []
        logps: list[list[float]] = []
        for (ids, _, _), (prompt_ids, choices) in zip(prompts, replies):
            check_engine_prompt(ids, prompt_ids, _image_token_id(self.processor, model))
            if len(choices) != cfg.n:
                raise EngineMismatchError(f"asked the engine for {cfg.n} responses per prompt, got {len(choices)}")
            for token_ids, logp in choices:
                rows.append(token_ids)
                logps.append(logp)
        width = max(1, max(len(r) for r in rows))
        response = torch.full((len(rows), width), pad, dtype=torch.long)
        logp = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(rows, logps)):
            response[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            logp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        mask = response_mask(response, eos)
        lengths = torch.tensor([len(r) for r in rows])
        mask &= torch.arange(width)[None, :] < lengths[:, None]
        return Rollouts(
            response_ids_B_T=response.masked_fill(~mask, pad),
            mask_B_T=mask,
            sampler_logp_B_T=logp.masked_fill(~mask, 0.0),
            prompt_index_B=torch.arange(len(prompts)).repeat_interleave(cfg.n),
        )

    def _map(self, fn: Any, args: list[Any]) -> list[Any]:
        """``[fn(a) for a in args]`` on up to ``request_threads`` daemon threads; the first error is raised.

        Daemon threads, not a pool: a run stopped mid-request (a signal) must not wait at exit for
        replies that may never come. The wait is interruptible (``self.interruptible``).
        """
        results: list[Any] = [None] * len(args)
        errors: list[BaseException] = []
        todo = list(enumerate(args))
        lock, done = threading.Lock(), threading.Event()
        left = [len(args)]

        def worker() -> None:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    i, a = todo.pop(0)
                try:
                    results[i] = fn(a)
                except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
                    with lock:
                        errors.append(err)
                    done.set()
                    return
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        if not args:
            return []
        self.interruptible = True  # before the first request leaves
        try:
            for _ in range(max(1, min(self.request_threads, len(args)))):
                threading.Thread(target=worker, daemon=True).start()
            while not done.wait(0.5):  # short waits: a signal handler runs between them
                pass
        finally:
            self.interruptible = False
        if errors:
            raise errors[0]
        return results

    def _prompts(self, prompt_batch: Any) -> list[tuple[list[int], str, str]]:
        """(trainer prompt ids, text with one image placeholder, image data URI) per prompt row."""
        ids_P_L, mask_P_L = prompt_batch["input_ids"], prompt_batch["attention_mask"]
        image_id = _image_token_id(self.processor, None)
        images = qwen_images_from_pixels(prompt_batch, self.processor)
        tok = getattr(self.processor, "tokenizer", self.processor)
        out = []
        for row in range(ids_P_L.shape[0]):
            ids = ids_P_L[row][mask_P_L[row].bool()].tolist()
            collapsed = [t for k, t in enumerate(ids) if not (t == image_id and k > 0 and ids[k - 1] == image_id)]
            text = tok.decode(collapsed, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            buffer = io.BytesIO()
            images[row].save(buffer, format="PNG")  # lossless: the engine gets these exact pixels
            uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            out.append((ids, text, uri))
        return out

    def _request(
        self, body: dict, prompt: tuple[list[int], str, str], seed: int
    ) -> tuple[list[int], list[tuple[list[int], list[float]]]]:
        _, text, uri = prompt
        message = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}],
        }
        reply = self._post("/v1/chat/completions", {**body, "messages": [message], "seed": seed})
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            keys = ", ".join(map(str, reply)) if isinstance(reply, dict) else type(reply).__name__
            raise RuntimeError(
                f"{self.url}/v1/chat/completions answered without 'choices' ({keys or 'empty'}): not an "
                "OpenAI/vLLM chat-completions server; check rollout.vllm_url"
            )
        choices = []
        for choice in sorted(reply["choices"], key=lambda c: c["index"]):
            token_ids = list(choice.get("token_ids") or [])
            content = (choice.get("logprobs") or {}).get("content") or []
            if len(content) != len(token_ids):
                raise EngineMismatchError(
                    f"the engine returned {len(token_ids)} token ids but {len(content)} log-probs for one response"
                )
            choices.append((token_ids, [float(c["logprob"]) for c in content]))
        return list(reply.get("prompt_token_ids") or []), choices

    def _post(self, route: str, payload: dict | None, *, text: bool = False) -> Any:
        """POST ``payload`` as JSON; the reply parsed as JSON (``text``: as a string, e.g. the LoRA routes')."""
        data = json.dumps(payload).encode() if payload is not None else b""
        request = urllib.request.Request(
            f"{self.url}{route}", data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as r:
                raw = r.read()
        except TimeoutError:  # accepted, then silent: a stuck or overloaded server
            raise RuntimeError(
                f"vLLM server {self.url}{route}: no reply within {self.request_timeout:g} s "
                "(rollout.vllm_request_timeout); check that the server is not stuck or overloaded"
            ) from None
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            hint = " (start the server with VLLM_SERVER_DEV_MODE=1 for weight pushes)" if err.code == 404 else ""
            if err.code == 404 and "lora_adapter" in route:
                hint = " (a LoRA student needs a server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
            if err.code >= 500 and self.process is not None:  # the cause is in the server log, not the reply
                causes = [ln for ln in self._log_tail(400).splitlines() if "Error: " in ln and "Traceback" not in ln]
                hint += "; server log: " + " | ".join(dict.fromkeys(c.split("] ", 1)[-1] for c in causes[-3:]))
            raise RuntimeError(f"vLLM server {route}: HTTP {err.code}{hint}: {detail}") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise RuntimeError(
                    f"vLLM server {self.url}{route}: no reply within {self.request_timeout:g} s "
                    "(rollout.vllm_request_timeout); check that the server is not stuck or overloaded"
                ) from None
            tail = f"\n{self._log_tail()}" if self.process is not None else ""
            raise RuntimeError(f"vLLM server {self.url}{route} unreachable: {err.reason}{tail}") from None
        if text:
            return raw.decode(errors="replace")
        try:
            return json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            head = raw[:60].decode(errors="replace").replace("\n", " ")
            raise RuntimeError(
                f"{self.url}{route} answered something that is not JSON ({head!r}...): not an OpenAI/vLLM "
                "server; check rollout.vllm_url"
            ) from None


def server_command(
    python: str | Path,
    model_dir: str | Path,
    port: int,
    template_path: str | Path,
    *,
    dtype: str = "float32",
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a vLLM server vopd can sample from (writes the pass-through template).

    ``--logprobs-mode processed_logprobs``: log-probs of the distribution sampled from;
    ``--generation-config vllm``: the checkpoint's generation_config does not change sampling;
    ``--chat-template`` (pass-through) + ``--chat-template-content-format openai``: the prompt
    text vopd sends already has the trainer's chat template applied.
    """
    Path(template_path).write_text(PASSTHROUGH_TEMPLATE)
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--generation-config",
        "vllm",
        "--logprobs-mode",
        "processed_logprobs",
        "--limit-mm-per-prompt",
        json.dumps({"image": 1}),
        "--chat-template-content-format",
        "openai",
        "--chat-template",
        str(template_path),
        *extra,
    ]


def server_env() -> dict[str, str]:
    """Environment for a server process: dev mode on (weight pushes), CPU-backend defaults."""
    env = dict(os.environ)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # enables /collective_rpc and the cache resets (weight pushes)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the cores with the trainer
    for key in ("PYTHONPATH", "VIRTUAL_ENV"):  # the server runs in its own environment
        env.pop(key, None)
    return env


def _fingerprint(model: torch.nn.Module) -> tuple[int, int]:
    """Changes whenever any parameter is modified in place (optimiser steps, EMA, loading)."""
    return id(model), sum(p._version for p in model.parameters())


_STEPS = {"taken": 0, "hooked": False}  # optimiser steps in this process (any optimiser), once hooked


def _count_step(*_: Any) -> None:
    _STEPS["taken"] += 1


def _optimizer_steps() -> int:
    """Optimiser steps taken in this process since the first call (installs a global step hook once)."""
    if not _STEPS["hooked"]:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(_count_step)
        _STEPS["hooked"] = True
    return _STEPS["taken"]


def _die_with_parent() -> None:
    """In the forked server, before exec: ask Linux to SIGTERM it when vopd dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: close() and atexit still stop it
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_token_id(processor: Any, model: PreTrainedModel | None) -> int:
    for source in (processor, getattr(model, "config", None)):
        value = getattr(source, "image_token_id", None)
        if isinstance(value, int):
            return value
    tok = getattr(processor, "tokenizer", processor)
    value = tok.convert_tokens_to_ids("<|image_pad|>")
    if not isinstance(value, int) or value == tok.unk_token_id:
        raise ValueError("rollout.engine=vllm supports the Qwen-VL families (no <|image_pad|> token in this tokenizer)")
    return value


def check_engine_prompt(trainer_ids: list[int], engine_ids: list[int], image_id: int) -> None:
    """The engine must have run exactly the trainer's prompt; say how it differs otherwise."""
    if trainer_ids == engine_ids:
        return
    n_trainer, n_engine = trainer_ids.count(image_id), engine_ids.count(image_id)
    if n_trainer != n_engine:
        raise EngineMismatchError(
            f"image-token count differs: the trainer's prompt has {n_trainer} image tokens, the engine's {n_engine}. "
            "The engine's processor resized the image differently (compare min_pixels/max_pixels in the served "
            "folder's processor_config.json with the trainer's), or expanded the placeholder twice"
        )
    first = next(
        (k for k, (a, b) in enumerate(zip(trainer_ids, engine_ids)) if a != b), min(len(trainer_ids), len(engine_ids))
    )
    raise EngineMismatchError(
        f"the engine's prompt ids differ from the trainer's at position {first} (lengths {len(engine_ids)} vs "
        f"{len(trainer_ids)}): start the server with vopd's pass-through template (--chat-template with "
        "vopd.rollout_vllm.PASSTHROUGH_TEMPLATE, --chat-template-content-format openai) on a folder with the "
        "trainer's tokenizer"
    )


def qwen_images_from_pixels(prompt_batch: Any, processor: Any) -> list[Image.Image]:
    """The RGB images a Qwen-VL processor turned into ``pixel_values``, at their processed size.

    Inverts the image processor's rescale / normalise / patchify (one image per prompt row), then
    re-runs the processor on the result and raises `EngineMismatchError` unless it reproduces
    the same ``pixel_values`` and grid, so the engine sees exactly the trainer's pixels.
    """
    if "image_grid_thw" not in prompt_batch:
        raise ValueError("rollout.engine=vllm supports the Qwen-VL families (pixel_values + image_grid_thw)")
    ip = processor.image_processor
    grid_I_3 = prompt_batch["image_grid_thw"]
    pixels = prompt_batch["pixel_values"].detach().float().cpu()
    patch, merge, tp = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    mean = np.asarray(ip.image_mean, dtype=np.float64)[:, None, None]
    std = np.asarray(ip.image_std, dtype=np.float64)[:, None, None]
    images, start = [], 0
    for t, gh, gw in grid_I_3.tolist():
        if t != 1:
            raise ValueError("qwen_images_from_pixels: videos are not supported")
        chunk = pixels[start : start + gh * gw].double().numpy()
        start += gh * gw
        x = chunk.reshape(gh // merge, gw // merge, merge, merge, 3, tp, patch, patch)[:, :, :, :, :, 0]
        x = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)
        x = (x * std + mean) / float(ip.rescale_factor)
        images.append(Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0), "RGB"))
    redo = ip(images=images, return_tensors="pt")
    if not (
        torch.equal(redo["image_grid_thw"], grid_I_3.cpu())
        and torch.allclose(redo["pixel_values"].float(), pixels, atol=1e-4)
    ):
        raise EngineMismatchError(
            "could not rebuild the trainer's images from pixel_values (the processor's resize is not idempotent "
            "at the processed size); the engine would see other pixels than the trainer"
        )
    return images


def default_work_dir(output_dir: str) -> Path:
    """Where the engine keeps its policy snapshot: ``<output_dir>/vllm`` (a temp dir when empty)."""
    return Path(output_dir) / "vllm" if output_dir else Path(tempfile.mkdtemp(prefix="vopd-vllm-"))
