"""Attention over padding-free batches without the square: `sdpa_rows`, SDPA run row by row.

A padding-free SFT batch is one sequence of rows whose position ids restart at 0 for each row. With SDPA, transformers
builds a block-diagonal causal mask over the whole sequence and attends over the full square, masking what lies
between rows: for 16 rows of ~50 tokens, a 800 x 800 square of which one row's share is 50 x 50. Flash-attention
kernels take the row boundaries instead (varlen), but they need a GPU; on CPU nothing in torch or transformers does,
so this does it by hand: the same SDPA call per row, causal within it, then the rows put back in order. Anything that
is not a packed training batch (padded batches, generation with a cache) goes to transformers' SDPA as it is.

Registered with transformers' attention and mask interfaces as "sdpa_rows" (`register`); the SFT stage switches to
it off CUDA for padding-free batches when the recipe names no `attn_implementation` (`stages.sft.attend_by_row`).
"""

import torch

NAME = "sdpa_rows"


def row_bounds(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """(start, end) of each row of a packed batch of one sequence, from position ids that restart at 0 per row; None
    when the batch is not packed (several sequences, or one row only)."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, [*starts[1:], length], strict=True))


def sdpa_rows_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' attention-interface signature (query/key/value: batch, heads, tokens, head dim); returns the
    output as (batch, tokens, heads, head dim) like `sdpa_attention_forward`, and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = row_bounds(position_ids, query.shape[2]) if key.shape[2] == query.shape[2] else None
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                                   is_causal=True, **kwargs)[0] for start, end in bounds]
    return torch.cat(rows, dim=1), None


def register() -> str:
    """Make "sdpa_rows" a name `from_pretrained(attn_implementation=...)` accepts, with SDPA's masks (what padded
    batches need); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, sdpa_rows_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
