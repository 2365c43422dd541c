"""Rollouts with vLLM, colocated with the trainer in one process (the CPU build here, the CUDA build on a GPU).

The engine starts from a folder holding the policy's current weights (saved to a temporary folder, in the
engine's dtype) and runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so a weight update hands tensors over
without serialising them. After every optimizer step `sync_weights` pushes the new weights through
`push_weights`, the one function that touches vLLM internals, then clears the prefix cache.

Generation matches the `hf` backend's contract: prompts are tokenised by the trainer's tokenizer (left-padded
ids in the Rollout, unpadded ids to vLLM), sampling is plain temperature sampling (the model's
generation_config.json defaults such as top_p or repetition penalties are ignored, so the sampler is the
policy the trainer differentiates), a completion stops at the tokenizer's EOS, and each prompt gets its own
seed (vLLM gives its n samples seed, seed+1, ...), so a seed fixes every completion. Temperature 0 is greedy.
The engine also returns each sampled token's log-prob after temperature (`logprobs_mode="processed_logprobs"`,
the distribution it sampled from), so the trainer can measure, and correct for, how far the engine's numbers
(bf16, its own kernels) are from its own (`Rollout.sampler_logps`, grpo.sampler_correction).

In a sharded run (`rlopt train --nproc N`, training/sharding.py) every rank runs its own engine in vLLM's
torchrun mode (`distributed_executor_backend="external_launcher"`): the worker joins the process group the run
already holds, its model-parallel groups are one rank each, and it takes its rank and GPU from RANK and
LOCAL_RANK. Rank 0 writes the starting folder for all; weight pushes gather the FSDP shards one parameter at a
time (a collective: every rank pushes at the same moment); with `prompt_seeds` each request is seeded by its
prompt, so a prompt draws the same completions on whichever rank, in whichever batch, samples it. `close` shuts
the engine down before the run leaves its process group.

Simplifications: one engine per process (in-process vLLM cannot start a second); no tensor parallelism; one host
(rank 0's temporary folder must be visible to every rank); sleep mode (CUDA only) discards the engine's weights
and KV cache after each generate and reloads the policy's weights before the next one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from rlopt_cli.errors import RloptError
from rlopt_cli.models.loading import encode_prompts, mark_saved_dtype, uses_chat_template
from rlopt_cli.rollout.base import Rollout

CPU_KV_CACHE_GIB = "1"  # the KV cache vLLM reserves on CPU; plenty for small models, cheap on a shared box


def push_weights(llm: Any, model: Any, dtype: torch.dtype) -> None:
    """Load `model`'s weights into the engine: vLLM 0.32's in-place `reload_weights` on its in-process worker.

    Not the model's own `load_weights`: the CPU backend repacks linear weights, which that leaves empty.
    Tensors are converted one at a time (a generator), so a GPU holds one extra tensor at most. A sharded
    model's DTensors are made whole one at a time too (`full_tensor`, a collective: every rank pushes at the
    same moment, in the same order), in the engine's dtype, so no rank holds two copies of the model.
    """
    weights = ((name, whole(t.detach().to(dtype))) for name, t in model.state_dict().items())
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP2 shard (a DTensor); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def in_torchrun_world() -> bool:
    """This process is a rank of a multi-process run whose process group is already up (rlopt's FSDP2 run)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def engine_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def save_policy(model: Any, tokenizer: Any, dtype: torch.dtype) -> str:
    """The policy's current weights as a Hugging Face folder vLLM can start from; removed at exit.

    Sharded (a torchrun world on one host): every rank gathers the weights one parameter at a time, in the
    engine's dtype; rank 0 keeps them in host memory and writes the one folder every rank's engine starts from
    (transformers' `save_pretrained` writes nothing on the other ranks once a process group is up)."""
    import torch.distributed as dist

    shared = in_torchrun_world()
    lead = not shared or dist.get_rank() == 0
    state = {}
    for name, tensor in model.state_dict().items():
        full = whole(tensor.detach().to(dtype))  # sharded: a collective, in the same order on every rank
        if lead:
            state[name] = full.cpu() if shared else full.contiguous()
        del full
    folder = ""
    if lead:
        folder = tempfile.mkdtemp(prefix="rlopt-vllm-")
        weakref.finalize(model, shutil.rmtree, folder, ignore_errors=True)
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        mark_saved_dtype(Path(folder), str(dtype).removeprefix("torch."))
        tokenizer.save_pretrained(folder)
    del state
    if shared:  # after rank 0 has written it
        names = [folder]
        dist.broadcast_object_list(names, src=0)
        folder = names[0]
    return folder


class VLLMBackend:
    """A colocated vLLM engine that follows the trainer's model."""

    def __init__(self, model: Any, tokenizer: Any, cfg: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.templated = uses_chat_template(tokenizer, cfg.task.chat_template)  # the trainer renders them so
        self.device = next(model.parameters()).device
        self.dtype = engine_dtype(cfg.rollout.vllm_dtype, self.device)
        self.sleep_mode = cfg.rollout.vllm_sleep_mode and self.device.type == "cuda"
        self.asleep = False
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weight updates pass tensors directly
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the terminal for rlopt's progress bar
        if self.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        try:
            from vllm import LLM, SamplingParams  # heavy: imported on use
        except ModuleNotFoundError as err:
            raise RloptError(
                f"rollout.backend = 'vllm' needs vllm ({err.name} is missing): "
                "pip install -e '.[vllm]' (or `make vllm`)"
            ) from None
        self._sampling_params = SamplingParams
        self.request_seeds = cfg.rollout.vllm_request_seeds
        cuda = self.device.type == "cuda"
        gpu = {"gpu_memory_utilization": cfg.rollout.gpu_memory_utilization} if cuda else {}
        limits = {  # unset (0): vLLM's own defaults
            key: value
            for key, value in (
                ("max_model_len", cfg.rollout.vllm_max_model_len),
                ("max_num_seqs", cfg.rollout.vllm_max_num_seqs),
                ("max_num_batched_tokens", cfg.rollout.vllm_max_num_batched_tokens),
            )
            if value
        }
        # A rank of a sharded run: vLLM's torchrun mode. Its worker joins the process group the run already
        # holds (vLLM's model-parallel groups are then one rank each: an engine per rank, generating alone) and
        # takes its rank and device from torchrun's RANK and LOCAL_RANK; the default "uni" executor would call
        # every rank rank 0 on device 0.
        launcher = {"distributed_executor_backend": "external_launcher"} if in_torchrun_world() else {}
        with torch.random.fork_rng(
            devices=[]
        ):  # in-process vLLM reseeds torch's global RNG: keep the trainer's
            self.llm = LLM(
                model=save_policy(model, tokenizer, self.dtype),
                dtype=str(self.dtype).removeprefix("torch."),
                seed=cfg.train.seed,
                enforce_eager=not cuda,  # no graph capture on CPU; CUDA graphs pay off on a GPU
                generation_config="vllm",  # ignore the model's sampling defaults: sample the policy as it is
                logprobs_mode="processed_logprobs",  # sampled tokens' log-probs after temperature, as sampled
                enable_sleep_mode=self.sleep_mode,
                **launcher,
                **gpu,
                **limits,
            )
        # Set after LLM(), which reconfigures vLLM's loggers. Each reload warns "RotaryEmbedding: Failed to load
        # weights": its cos/sin cache has no checkpoint tensor and is put back as it was (the tests check it).
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

    def generate(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        prompt_seeds: list[int] | None = None,
    ) -> Rollout:
        self._wake()
        enc = encode_prompts(self.tokenizer, prompts, self.templated)
        requests = [
            {"prompt_token_ids": ids[mask.bool()].tolist()}
            for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True)
        ]
        greedy = temperature == 0  # vLLM refuses n > 1 when greedy: sample once, repeat n times
        params = [
            self._sampling_params(
                n=1 if greedy else n,
                temperature=temperature,
                max_tokens=max_new_tokens,
                seed=self._request_seed(seed, i, n, prompt_seeds),
                stop_token_ids=[self.tokenizer.eos_token_id],
                logprobs=None if greedy else 0,  # 0: the sampled token's log-prob only
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep_mode:
            self.llm.sleep(level=2)
            self.asleep = True
        samples = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        if greedy:
            samples = [s for s in samples for _ in range(n)]
        return to_rollout(samples, enc.input_ids, enc.attention_mask, n, self.tokenizer, self.device)

    def _request_seed(self, seed: int, i: int, n: int, prompt_seeds: list[int] | None) -> int | None:
        """Prompt i's seed; vLLM gives its child j that seed + j, so each sample has its own stream."""
        if prompt_seeds is not None:  # wherever the prompt is sampled: in any batch, on any rank
            # distinct prompt seeds: children s*n + j never collide; kept under 2^62 for the engine's int64 seed
            return (prompt_seeds[i] * n) % 2**62
        return seed + i * n if self.request_seeds else None

    def sync_weights(self, model: Any) -> None:
        """Push the new weights now, or at the next generate while the engine sleeps."""
        self.model = model
        if not self.asleep:
            push_weights(self.llm, model, self.dtype)

    def close(self) -> None:
        """Shut the engine down now. In a sharded run this must come before the run leaves its process group:
        vLLM's shutdown destroys its groups (and the default one), which fails once they are gone."""
        self.llm.llm_engine.engine_core.shutdown()

    def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """The engine's log-probs (temperature 1) of a fixed completion: checks that its weights are the policy's."""
        self._wake()
        params = self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = self.llm.generate([{"prompt_token_ids": prompt_ids + completion_ids}], params, use_tqdm=False)[
            0
        ]
        start = len(prompt_ids)
        return [out.prompt_logprobs[start + j][tok].logprob for j, tok in enumerate(completion_ids)]

    def _wake(self) -> None:
        if self.asleep:
            # The trainer's freed blocks stay in torch's cache unless handed back: vLLM would then allocate its
            # weights and KV cache next to the trainer's peak (TRL empties the cache before each wake-up too).
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
            push_weights(self.llm, self.model, self.dtype)
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False


def to_rollout(
    samples: list[Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n: int,
    tokenizer: Any,
    device: torch.device,
) -> Rollout:
    """vLLM's completions (prompt-major, n per prompt) in the hf backend's layout, on `device`."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(1, max(len(s.token_ids) for s in samples))
    completion_ids = torch.full((len(samples), width), pad, dtype=torch.long)  # [N, L] right-padded
    completion_mask = torch.zeros((len(samples), width), dtype=torch.int)  # [N, L]
    scored = all(s.logprobs is not None for s in samples)
    sampler_logps = torch.zeros((len(samples), width), dtype=torch.float32)  # [N, L]
    for row, sample in enumerate(samples):
        ids = list(sample.token_ids)  # ends with EOS when the sample stopped on it
        completion_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[row, : len(ids)] = 1
        if scored:
            logps = [sample.logprobs[j][tok].logprob for j, tok in enumerate(ids)]
            sampler_logps[row, : len(ids)] = torch.tensor(logps, dtype=torch.float32)
    truncated = torch.tensor([s.finish_reason == "length" for s in samples])  # [N]
    texts = tokenizer.batch_decode(
        completion_ids.masked_fill(completion_ids == eos, pad), skip_special_tokens=True
    )
    return Rollout(
        prompt_ids=input_ids.repeat_interleave(n, 0).to(device),  # [N, P] left-padded
        prompt_mask=attention_mask.repeat_interleave(n, 0).to(device),  # [N, P]
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        truncated=truncated.to(device),
        texts=texts,
        sampler_logps=sampler_logps.to(device) if scored else None,
    )
