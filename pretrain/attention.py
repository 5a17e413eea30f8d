"""Attention structure of packed rows (data_pipeline/packing.py) for a Hugging Face causal LM.

Query q may attend to key k when

    (segment_ids[q] == segment_ids[k] and k <= q)  or  attend_start[q] <= k < attend_end[q]

which is `packing.attention_allowed`. Two realisations of it:

- a dense additive (B, 1, T, T) mask for `sdpa` / `eager`: 0 where allowed, finfo(dtype).min
  elsewhere. Fine on CPU; on GPU it costs O(T²) memory and loses the fused kernels. (A bool 4D mask
  is silently wrong under HF's eager attention, which adds the mask to the scores.)
- a FlexAttention `BlockMask` for `flex_attention`: the same rule as a `mask_mod` doing index
  lookups, compressed to the blocks that contain any allowed pair. transformers passes a 4D
  `BlockMask` given as `attention_mask` through untouched (masking_utils._preprocess_mask_arguments
  returns any 4D mask as-is) to `flex_attention(block_mask=...)` (integrations/flex_attention.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
from torch.nn.attention.flex_attention import (
    _DEFAULT_SPARSE_BLOCK_SIZE,
    BlockMask,
    create_block_mask,
)

AttnImpl = Literal["sdpa", "eager", "flex_attention"]
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "eager", "flex_attention")


def allowed_mask(
    segment_ids: torch.Tensor, attend_start: torch.Tensor, attend_end: torch.Tensor
) -> torch.Tensor:
    """(B, T, T) bool: may query q attend to key k. Inputs are (B, T)."""
    T = segment_ids.shape[-1]
    pos = torch.arange(T, device=segment_ids.device)
    q, k = pos[:, None], pos[None, :]  # (T, 1), (1, T)
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (k <= q)
    extra = (k >= attend_start[:, :, None]) & (k < attend_end[:, :, None])
    return same | extra


def dense_additive_mask(
    segment_ids: torch.Tensor,
    attend_start: torch.Tensor,
    attend_end: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(B, 1, T, T) additive mask: 0 where allowed, finfo(dtype).min elsewhere."""
    allowed = allowed_mask(segment_ids, attend_start, attend_end)  # (B, T, T)
    mask = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(allowed, 0.0)[:, None]


def packed_mask_mod(
    segment_ids: torch.Tensor, attend_start: torch.Tensor, attend_end: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlexAttention mask_mod of the packed-row rule; closes over the (B, T) tensors."""

    def mask_mod(b, h, q_idx, kv_idx):
        same = (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (kv_idx <= q_idx)
        extra = (kv_idx >= attend_start[b, q_idx]) & (kv_idx < attend_end[b, q_idx])
        return same | extra

    return mask_mod


@functools.cache
def _compiled_create_block_mask():
    # Compiled, create_block_mask evaluates mask_mod block by block and never materialises the
    # (B, T, T) bool mask that the eager version builds (torchtitan compiles it the same way).
    # Guards are on shapes, so a new closure over same-shaped tensors does not recompile.
    return torch.compile(create_block_mask)


def flex_block_mask(
    segment_ids: torch.Tensor,
    attend_start: torch.Tensor,
    attend_end: torch.Tensor,
    block_size: int = _DEFAULT_SPARSE_BLOCK_SIZE,
    compile_mask: bool | None = None,
) -> BlockMask:
    """BlockMask (B, 1, T, T) of the packed-row rule, on the inputs' device.

    compile_mask: compile the mask construction (default: everywhere but CPU, where compiling
    costs more than the O(B·T²) bools of the eager construction it avoids)."""
    B, T = segment_ids.shape
    device = segment_ids.device
    if compile_mask is None:
        compile_mask = device.type != "cpu"
    build = _compiled_create_block_mask() if compile_mask else create_block_mask
    mask_mod = packed_mask_mod(segment_ids, attend_start, attend_end)
    # H=None: one mask shared by all heads.
    return build(mask_mod, B, None, T, T, device=device, BLOCK_SIZE=block_size)


def build_attention(
    batch: dict[str, torch.Tensor], impl: AttnImpl, dtype: torch.dtype
) -> torch.Tensor | BlockMask:
    """What to pass as `attention_mask` for a collated batch under attention implementation impl;
    dtype is the attention compute dtype (used by the dense mask only)."""
    seg, start, end = batch["segment_ids"], batch["attend_start"], batch["attend_end"]
    if impl == "flex_attention":
        return flex_block_mask(seg, start, end)
    if impl in ("sdpa", "eager"):
        return dense_additive_mask(seg, start, end, dtype)
    raise ValueError(f"attention implementation must be one of {ATTN_IMPLS}, got {impl!r}")
