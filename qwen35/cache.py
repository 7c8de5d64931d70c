"""Decode cache: per GDN layer the conv window (last K pre-conv inputs, model dtype) and the fp32 recurrent
state [B, HV, K, V]; per attention layer a preallocated KV buffer. Buffers are allocated once per generation,
so a decode step does no allocation or concatenation.

Every step sees tensors of the same shapes: new keys are written at a position given as a tensor and attention
always runs over the whole buffer (`max_length` keys) with a mask that hides the positions not written yet. So a
compiled step (`qwen35.decoding`) is reused for every position instead of being specialised to each length."""

from __future__ import annotations

import torch

from .config import FULL_ATTENTION, Qwen35Config


class GatedDeltaNetCache:
    def __init__(self, config: Qwen35Config, batch_size: int, dtype: torch.dtype, device):
        self.conv_state = torch.zeros(batch_size, config.conv_dim, config.linear_conv_kernel_dim, dtype=dtype,
                                      device=device)
        self.recurrent_state = torch.zeros(batch_size, config.linear_num_value_heads, config.linear_key_head_dim,
                                           config.linear_value_head_dim, dtype=torch.float32, device=device)
        self.initialized = False
        # Conv windows and states after each but the last position of a recorded multi-token step (written in
        # place, which compiled steps support); None = not recording.
        self.step_conv_states: torch.Tensor | None = None
        self.step_recurrent_states: torch.Tensor | None = None


class KVCache:
    def __init__(self, config: Qwen35Config, batch_size: int, max_length: int, dtype: torch.dtype, device,
                 owner: "Qwen35Cache"):
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.owner = owner

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value [B, Nkv, T, D] at the positions of the current step (`Qwen35Cache.write_positions`);
        return the whole buffers [B, Nkv, max_length, D] (the step's attention mask hides unwritten positions)."""
        positions = self.owner.write_positions
        # an indexed assignment, which inductor keeps in place (it copied the whole buffer for index_copy_)
        self.keys[:, :, positions] = key.to(self.keys.dtype)
        self.values[:, :, positions] = value.to(self.values.dtype)
        return self.keys, self.values


class Qwen35Cache:
    """State of one batch of sequences being decoded. `length` counts the positions already processed
    (padding included); `valid` marks which cached positions are real tokens (False at left padding)."""

    def __init__(self, config: Qwen35Config, batch_size: int, max_length: int, dtype: torch.dtype, device=None):
        self.max_length = max_length
        self.length = 0
        self.valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.write_positions = torch.zeros(0, dtype=torch.long, device=device)  # of the current step
        self.layers = [
            KVCache(config, batch_size, max_length, dtype, device, self) if kind == FULL_ATTENTION
            else GatedDeltaNetCache(config, batch_size, dtype, device)
            for kind in config.layer_types
        ]

    def buffers(self) -> list[torch.Tensor]:
        """The tensors decode steps update in place."""
        tensors = [self.valid]
        for layer in self.layers:
            if isinstance(layer, KVCache):
                tensors += [layer.keys, layer.values]
            else:
                tensors += [layer.conv_state, layer.recurrent_state]
                if layer.step_conv_states is not None:
                    tensors += [layer.step_conv_states, layer.step_recurrent_states]
        return tensors

    def attention_mask(self, padding_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
        """Record the validity and the positions of `num_new` incoming positions and return their attention mask
        over the whole cache [B, 1, num_new, max_length] (`padded_causal_mask`)."""
        start, end = self.length, self.length + num_new
        if end > self.max_length:
            raise ValueError(f"cache holds {self.max_length} positions; {end} requested")
        self.valid[:, start:end] = True if padding_mask is None else padding_mask.bool()
        self.write_positions = torch.arange(start, end, device=self.valid.device)
        return padded_causal_mask(self.valid, start, num_new)

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def record_steps(self, max_positions: int) -> None:
        """From now on, steps of up to `max_positions` positions on an initialised cache run the Gated DeltaNet
        layers token by token and keep each intermediate conv window and state, so that `keep_positions` can drop
        a suffix. 0 stops recording."""
        for layer in self.layers:
            if isinstance(layer, GatedDeltaNetCache):
                if max_positions > 1:
                    layer.step_conv_states = layer.conv_state.new_empty((max_positions - 1, *layer.conv_state.shape))
                    layer.step_recurrent_states = layer.recurrent_state.new_empty(
                        (max_positions - 1, *layer.recurrent_state.shape))
                else:
                    layer.step_conv_states = layer.step_recurrent_states = None

    def keep_positions(self, kept: torch.Tensor, num_new: int) -> None:
        """After a recorded step of `num_new` positions, keep the first kept[b] (1..num_new) of them in row b: the
        rest become holes that attention skips and positions do not count (like left padding), and the Gated
        DeltaNet windows and states of those rows return to their values after kept[b] positions."""
        start = self.length - num_new
        offsets = torch.arange(num_new, device=kept.device)
        self.valid[:, start:self.length] &= offsets[None, :] < kept[:, None]
        if bool((kept == num_new).all()):  # every row keeps every position: the states are already right
            return
        rows = torch.arange(len(kept), device=kept.device)
        index = (kept - 1).to(torch.long)
        for layer in self.layers:
            if isinstance(layer, GatedDeltaNetCache):
                for current, steps in ((layer.conv_state, layer.step_conv_states),
                                       (layer.recurrent_state, layer.step_recurrent_states)):
                    current.copy_(torch.cat([steps[:num_new - 1], current[None]])[index, rows])


def padded_causal_mask(valid: torch.Tensor, first_query: int, num_queries: int | None = None) -> torch.Tensor:
    """Bool attention mask [B, 1, queries, keys] for keys 0..K-1 (valid [B, K], False at padding) and the
    queries at positions first_query.. (num_queries of them, default: up to K-1): causal, never attending to
    padding. A padded query row attends to itself only, which keeps SDPA finite; its output is never used."""
    keys = torch.arange(valid.shape[1], device=valid.device)
    queries = keys[first_query:] if num_queries is None else keys[first_query:first_query + num_queries]
    mask = ((keys[None, :] <= queries[:, None])[None] & valid[:, None, :]) | (keys[None, :] == queries[:, None])
    return mask[:, None]
