"""The two KV caches through which a group's G completions share one forward of their prompt
(`grpo.shared_prompt_logits`), built to give the same answer every time they are read, so that they also work
under gradient checkpointing.

Why not transformers' own `DynamicCache`: with gradient checkpointing on, in training, with gradients enabled,
transformers (checked in 5.24) turns the KV cache off. `merge_with_config_defaults` sets `use_cache=False`, so
no cache comes back, and each `GradientCheckpointingLayer` sets `cache=None` unless its class sets
`_can_checkpoint_with_cache`. The backward pass replays a checkpointed layer's forward, and a cache that appends
on every `update` would append a second time. The two caches here never change what they return once
filled, so a replay sees exactly what the forward saw:
- `RecordOnceLayer`, for the prompt pass: each layer keeps the first keys/values it is given (the prompt's, with
  their autograd graph) and returns them unchanged, as an empty cache does. A replay stores nothing.
- `FixedPrefixLayer`, for the completion pass: each layer's recorded prompt keys/values repeated over the group;
  `update` returns prompt + completion keys/values and stores nothing.
`cache_kept_under_checkpointing` lets the checkpointed layers take these caches for one forward. Checkpointing
still saves what it saves: each layer keeps its input and recomputes the rest in backward, in both passes. On
top of that the prompt's keys/values stay in memory until backward, as they do in any KV-cache route. Without
checkpointing the caches behave like `DynamicCache` with its `batch_repeat_interleave` (tested against a
per-row forward both ways).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rlopt_cli.errors import RloptError


class RecordOnceLayer(DynamicLayer):
    """One layer's prompt keys/values [N/G, H_kv, P, D], kept from the first `update`."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:  # the forward; a checkpoint replay finds it filled and keeps the first
            self.device = key_states.device
            self.keys, self.values = key_states, value_states
            self.is_initialized = True
        return key_states, value_states  # no past: the prompt attends to itself only


class FixedPrefixLayer(DynamicLayer):
    """One layer's prompt keys/values [N, H_kv, P, D] that every query block attends to; never grows."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device = keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        keys = torch.cat([self.keys, key_states], dim=-2)  # [N, H_kv, P+L, D]
        values = torch.cat([self.values, value_states], dim=-2)  # [N, H_kv, P+L, D]
        return keys, values


class SharedPrompt:
    """The caches of one prompt pass and the completion pass that reads it."""

    def __init__(self, model: Any) -> None:
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.recorded = [RecordOnceLayer() for _ in range(layers)]
        self.prompt_cache = Cache(layers=list[Any](self.recorded))  # empty: for the prompt pass

    def completion_cache(self, group_size: int, needs_grad: bool) -> Cache:
        """The recorded prompt keys/values [N/G, ...] repeated over each group [N, ...]; differentiable.
        `needs_grad`: the prompt pass's output has a graph, so its keys/values must have one too."""
        layers: list[Any] = []
        for layer in self.recorded:
            if layer.keys is None or layer.values is None:
                raise RloptError(
                    "the model's layers ignored the KV cache in the prompt pass (an older transformers under "
                    "gradient checkpointing?); upgrade transformers, or set grpo.share_prompt_forward=false"
                )
            if torch.is_grad_enabled() and needs_grad and not layer.keys.requires_grad:
                raise RloptError(
                    "the prompt's keys/values came out of the prompt pass without gradients (reentrant gradient "
                    "checkpointing?); enable checkpointing with use_reentrant=False, as rlopt does"
                )
            keys = layer.keys.repeat_interleave(group_size, 0)  # [N, H_kv, P, D]
            values = layer.values.repeat_interleave(group_size, 0)  # [N, H_kv, P, D]
            layers.append(FixedPrefixLayer(keys, values))
        return Cache(layers=layers)


@contextmanager
def cache_kept_under_checkpointing(model: Any) -> Iterator[None]:
    """For the forwards inside: checkpointed decoder layers keep the cache they are given (transformers drops it
    unless `_can_checkpoint_with_cache`, which is safe for the caches above: a replay reads what the forward read).
    The flag is read when a layer's forward starts, so the backward replay after the block needs nothing more."""
    flag = "_can_checkpoint_with_cache"
    layers = [m for m in model.modules() if hasattr(type(m), flag)]
    before = [vars(layer).get(flag) for layer in layers]  # None: the class's value, no instance attribute
    for layer in layers:
        setattr(layer, flag, True)  # an instance attribute over the class's False
    try:
        yield
    finally:
        for layer, value in zip(layers, before, strict=True):
            if value is None:
                vars(layer).pop(flag, None)
            else:
                setattr(layer, flag, value)
