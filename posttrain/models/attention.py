"""Attention over padding-free batches without the square: `packed_rows`, each row attending within itself.

A padding-free SFT batch is one sequence of rows whose position ids restart at 0 for each row. With SDPA, transformers
builds a block-diagonal causal mask over the whole sequence and attends over the full square, masking what lies
between rows: for 16 rows of ~50 tokens, a 800 x 800 square of which one row's share is 50 x 50. Flash-attention
kernels take the row boundaries instead (varlen), but they need a GPU; on CPU nothing in torch or transformers does,
so this does it by hand:

- under bf16 (or fp16) autocast: the rows gathered into one padded batch (rows x heads x longest row), attention
  computed there with two batched matmuls and a softmax (causal within each row, padding masked), and the rows put
  back in order. Autocast runs SDPA in bf16, and torch's CPU flash-attention kernel, called once per row, spent more
  time in its bf16 backward than this whole batch takes: forward and backward of the default recipe's SFT batches
  1.17x faster (see `stages.common.attend_by_row`);
- otherwise SDPA row by row: in float32 the padded batch was slower (0.92x), and so it is where the padded scores
  would be large (`MAX_SCORES`: long rows of very different lengths).

On CUDA without flash-attention's varlen kernels, SDPA over the packed square is worse still: its fused kernels do
not take an arbitrary mask, so the square is computed and kept for the backward (SFT of a 1.5B model on 16
conversations of ~200 tokens: 32 GiB and slower than plain TRL's padded batches). There the rows are gathered into a
padded batch and given to SDPA with `is_causal` and no mask (`padded_rows_sdpa`), which its flash kernel takes.

Anything that is not a packed training batch (padded batches, generation with a cache), a row longer than a
sliding-window layer's window, and a model that adds a position bias to the scores, goes to transformers' SDPA as it
is. Registered with transformers' attention and mask interfaces as "packed_rows" (`register`); the SFT, DPO and UPO
stages switch to it for padding-free batches when the model uses SDPA and the recipe names no `attn_implementation`
(a flash-attention one takes the row boundaries itself).
"""

import dataclasses
import functools
import weakref

import torch

NAME = "packed_rows"
MAX_SCORES = 1 << 24  # rows x heads x longest row^2 above this: SDPA row by row (64 MB of float32 scores per layer)


def row_bounds(position_ids: torch.Tensor | None, length: int) -> list[tuple[int, int]] | None:
    """(start, end) of each row of a packed batch of one sequence, from position ids that restart at 0 per row; None
    when the batch is not packed (several sequences, or one row only)."""
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] != length:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, [*starts[1:], length], strict=True))


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Where the rows of a packed sequence lie, as the padded-batch attention paths index them.

    `index` (rows x longest): each row's positions in the sequence, padding reading the row's last real token or later
    ones (clamped to the sequence); `real` (rows x longest): the real positions; `flat`: those positions in the
    flattened rows x longest layout, in sequence order (gathering with it needs no host sync, a boolean mask would)."""

    bounds: list[tuple[int, int]]
    longest: int
    index: torch.Tensor
    real: torch.Tensor
    flat: torch.Tensor

    @classmethod
    def from_bounds(cls, bounds: list[tuple[int, int]], length: int, device) -> "PackedRows":
        longest = max(end - start for start, end in bounds)
        starts = torch.tensor([start for start, _ in bounds])
        lengths = torch.tensor([end - start for start, end in bounds])
        offsets = torch.arange(longest)
        # token t of row r (starting at s) sits at r * longest + t - s of the flattened rows
        flat = torch.arange(length) + torch.repeat_interleave(torch.arange(len(bounds)) * longest - starts, lengths)
        index = (starts[:, None] + offsets[None, :]).clamp(max=length - 1)
        return cls(bounds, longest, *(x.to(device) for x in (index, offsets[None, :] < lengths[:, None], flat)))

    @functools.cached_property
    def blocked(self) -> torch.Tensor:
        """(rows x longest x longest): the scores `padded_rows` masks, a later position or padding; made once per batch
        for all its layers (CPU only: on CUDA the rows need no mask)."""
        longest = self.longest
        allowed = torch.ones(longest, longest, dtype=torch.bool, device=self.real.device).tril()[None]
        return ~(allowed & self.real[:, None, :])


# The layout of the last packed batch, keyed by its position ids: every layer of a forward gets the same tensor, and
# reading the row starts off the GPU (`row_bounds`) is a host sync, once per forward instead of once per layer. A weak
# reference, so a later batch whose position ids reuse the freed memory can never match.
_last_layout: tuple = (None, None, None)  # (weak reference to the position ids, (version, length), layout)


def packed_layout(position_ids: torch.Tensor | None, length: int) -> PackedRows | None:
    """The rows of a packed batch (`PackedRows`), or None when it is not one (see `row_bounds`); cached per batch."""
    global _last_layout
    if position_ids is None:
        return None
    # an inference-mode tensor has no version counter, so an in-place change could not be seen: not cached
    key = None if position_ids.is_inference() else (position_ids._version, length)
    ref, cached_key, layout = _last_layout
    if key is not None and ref is not None and ref() is position_ids and cached_key == key:
        return layout
    bounds = row_bounds(position_ids, length)
    layout = PackedRows.from_bounds(bounds, length, position_ids.device) if bounds else None
    if key is not None:
        _last_layout = (weakref.ref(position_ids), key, layout)
    return layout


def packed_rows_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' attention-interface signature (query/key/value: batch, heads, tokens, head dim); returns the
    output as (batch, tokens, heads, head dim) like `sdpa_attention_forward`, and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = packed_layout(position_ids, query.shape[2]) if key.shape[2] == query.shape[2] else None
    # a position bias is one tensor over the whole square, which only SDPA's mask path reads
    if rows is None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Qwen2-MoE and PhiMoE pass no `sliding_window`: their window is in the mask, which rows attended by hand do not
    # read, and on the module (Qwen2-MoE's sliding layers) or only in the config (PhiMoE's, every layer); 0: none
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else (
        getattr(module, "sliding_window", None) or getattr(getattr(module, "config", None), "sliding_window", None))
    if window and rows.longest > window:  # a row longer than a sliding-window layer's window: SDPA's mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    if query.device.type == "cuda":
        return padded_rows_sdpa(query, key, value, rows, kwargs.get("scaling"), kwargs.get("dropout", 0.0)), None
    half = torch.is_autocast_enabled(query.device.type) or query.dtype in (torch.bfloat16, torch.float16)
    if half and len(rows.bounds) * query.shape[1] * rows.longest ** 2 <= MAX_SCORES:
        return padded_rows(query, key, value, rows, kwargs.get("scaling"), kwargs.get("dropout", 0.0)), None
    # split, not sliced row by row: a slice's backward writes its gradient into a zeroed tensor of the whole
    # sequence, once per row and layer, where split's backward is one concatenation (forward and backward of the
    # default recipe's float32 SFT batches 1.09x faster, the same gradients bit for bit)
    lengths = [end - start for start, end in rows.bounds]
    out = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
           for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)]
    return torch.cat(out, dim=1), None


def real_positions(out: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """(rows, longest, heads, dim) -> (1, tokens, heads, dim): the real positions, in sequence order."""
    return out.flatten(0, 1).index_select(0, rows.flat).unsqueeze(0)


def padded_rows_sdpa(query, key, value, rows: PackedRows, scaling: float | None, dropout: float):
    """Causal attention within each row of a packed batch of one sequence, as SDPA over the rows padded at their ends:
    under the causal mask a real position never sees its row's padding (it comes after it), so no mask is needed and
    SDPA may use its flash kernel. Returns (1, tokens, heads, head dim)."""
    q, k, v = (tensor[0][:, rows.index].transpose(0, 1) for tensor in (query, key, value))  # rows x heads x longest x dim
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    return real_positions(out.transpose(1, 2), rows)


def padded_rows(query, key, value, rows: PackedRows, scaling: float | None, dropout: float):
    """Causal attention within each row of a packed batch of one sequence, the rows padded to `longest` and computed
    together; returns (1, tokens, heads, head dim)."""
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` heads
    q = query[0][:, rows.index]  # heads x rows x longest x head dim; padding reads a real token, masked
    k = key[0][:, rows.index].repeat_interleave(groups, dim=0)
    v = value[0][:, rows.index].repeat_interleave(groups, dim=0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    probs = torch.softmax(scores.float().masked_fill(rows.blocked, float("-inf")), dim=-1).to(q.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, v)  # heads x rows x longest x head dim
    return real_positions(out.permute(1, 2, 0, 3), rows)


def register() -> str:
    """Make "packed_rows" a name `from_pretrained(attn_implementation=...)` accepts, with SDPA's masks (what padded
    batches need); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_rows_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME
