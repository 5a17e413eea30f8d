"""The dense mask and the FlexAttention block mask realise packing.attention_allowed exactly."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

from data_pipeline.packing import (
    PackingConfig,
    SpecialIds,
    assemble_row,
    attention_allowed,
    collate_rows,
    pack_rows,
)
from pretrain.attention import (
    build_attention,
    dense_additive_mask,
    flex_block_mask,
    packed_mask_mod,
)
from pretrain.model import build_model, build_model_config, forward_batch

SPECIALS = SpecialIds(bos=1, eos=2, pad=0, view_sep=3, predictors=(4, 5, 6))
VOCAB = 32
SEQ_LEN = 128


def packed_rows(seed: int, predictor_tokens: int = 2, n_views: int = 3, pairs: str = "chain"):
    """Random records packed into rows, plus one row of padding only."""
    rng = np.random.default_rng(seed)
    records = [
        [rng.integers(8, VOCAB, rng.integers(1, 12)) for _ in range(n_views)] for _ in range(12)
    ]
    cfg = PackingConfig(SEQ_LEN, SPECIALS, predictor_tokens=predictor_tokens, pairs=pairs)
    rows, _ = pack_rows(records, cfg)
    return [*rows, assemble_row([], [], cfg)]


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.as_tensor(value) for name, value in batch.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_mask_equals_attention_allowed(dtype):
    rows = packed_rows(0)
    batch = to_torch(collate_rows(rows))
    mask = dense_additive_mask(
        batch["segment_ids"], batch["attend_start"], batch["attend_end"], dtype
    )
    assert mask.shape == (len(rows), 1, SEQ_LEN, SEQ_LEN) and mask.dtype == dtype
    for b, row in enumerate(rows):
        allowed = torch.as_tensor(attention_allowed(row))
        assert (mask[b, 0][allowed] == 0).all()
        assert (mask[b, 0][~allowed] == torch.finfo(dtype).min).all()
    # The rows hold predictor segments, whose extra keys are what the rule adds to causality.
    assert (batch["attend_end"] > batch["attend_start"]).any()


def test_mask_mod_on_the_full_grid_equals_attention_allowed():
    rows = packed_rows(1)
    batch = to_torch(collate_rows(rows))
    mask_mod = packed_mask_mod(batch["segment_ids"], batch["attend_start"], batch["attend_end"])
    grid = create_mask(mask_mod, len(rows), 1, SEQ_LEN, SEQ_LEN, device="cpu")  # (B, 1, T, T)
    for b, row in enumerate(rows):
        assert torch.equal(grid[b, 0], torch.as_tensor(attention_allowed(row)))


def block_any(allowed: torch.Tensor, block: int) -> torch.Tensor:
    """(B, T, T) → (B, T/block, T/block): does the block hold any allowed pair."""
    B, T, _ = allowed.shape
    return allowed.reshape(B, T // block, block, T // block, block).any(dim=(2, 4))


def test_block_mask_keeps_exactly_the_blocks_with_allowed_pairs():
    rows = packed_rows(2)
    batch = to_torch(collate_rows(rows))
    block_mask = flex_block_mask(
        batch["segment_ids"], batch["attend_start"], batch["attend_end"], block_size=16
    )
    assert block_mask.shape == (len(rows), 1, SEQ_LEN, SEQ_LEN)
    allowed = torch.stack([torch.as_tensor(attention_allowed(r)) for r in rows])
    dense_blocks = block_mask.to_dense()[:, 0].bool()  # (B, T/16, T/16)
    assert torch.equal(dense_blocks, block_any(allowed, 16))
    assert not dense_blocks.all()  # the mask does skip blocks


def test_compiled_block_mask_construction_matches_eager():
    # The GPU path compiles create_block_mask; it must rebuild for new data without going stale.
    for seed in (3, 4):
        batch = to_torch(collate_rows(packed_rows(seed)))
        args = (batch["segment_ids"], batch["attend_start"], batch["attend_end"])
        eager = flex_block_mask(*args, block_size=16, compile_mask=False)
        compiled = flex_block_mask(*args, block_size=16, compile_mask=True)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
            assert torch.equal(getattr(eager, name), getattr(compiled, name)), name


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_block_mask_equals_sdpa_with_dense_mask():
    # Full blocks skip mask_mod in the kernel, so a wrongly "full" block would show up here.
    rows = packed_rows(5)
    batch = to_torch(collate_rows(rows))
    seg, start, end = batch["segment_ids"], batch["attend_start"], batch["attend_end"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(len(rows), 2, SEQ_LEN, 8, generator=g) for _ in range(3))
    dense = F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_additive_mask(seg, start, end, torch.float32)
    )
    block_mask = flex_block_mask(seg, start, end, block_size=16)
    assert block_mask.full_kv_num_blocks.sum() > 0 and block_mask.kv_num_blocks.sum() > 0
    flex = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_build_attention_dispatches_on_the_implementation():
    batch = to_torch(collate_rows(packed_rows(6)))
    for impl in ("sdpa", "eager"):
        mask = build_attention(batch, impl, torch.bfloat16)
        assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bfloat16
    assert isinstance(build_attention(batch, "flex_attention", torch.float32), BlockMask)
    with pytest.raises(ValueError, match="attention implementation"):
        build_attention(batch, "flash_attention_2", torch.float32)


def test_hf_llama_flex_attention_equals_sdpa_dense_path():
    # flex_attention runs on CPU in torch 2.13 (transformers compiles it: ~10 s the first time).
    batch = to_torch(collate_rows(packed_rows(7)))
    torch.manual_seed(0)
    outputs = {}
    state = None
    for impl in ("sdpa", "flex_attention"):
        config = build_model_config(
            "llama", "tiny", vocab_size=VOCAB, max_position_embeddings=SEQ_LEN,
            attn_implementation=impl,
        )  # fmt: skip
        model = build_model(config).eval()
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        with torch.no_grad():
            outputs[impl] = forward_batch(model, batch, impl)
    for flex, dense in zip(outputs["flex_attention"], outputs["sdpa"]):
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_forward_batch_rejects_an_implementation_the_model_was_not_built_with():
    config = build_model_config("llama", vocab_size=VOCAB, max_position_embeddings=SEQ_LEN)
    batch = to_torch(collate_rows(packed_rows(8)))
    with pytest.raises(ValueError, match="built with 'sdpa'"):
        forward_batch(build_model(config), batch, "flex_attention")
