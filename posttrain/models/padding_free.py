"""Padding-free scoring for trainers that collate padded batches: TRL's DPOTrainer, and GRPO's forwards in UPO.

TRL (1.16) turns DPO's `padding_free` off ("temporarily unavailable after a refactor"): its collator pads each batch of
chosen and rejected rows to the longest, and on the default recipe's on-policy pairs (37 to 79 tokens) 29% of every
policy and reference forward was padding. `pack_scoring_forward` wraps the model's scoring forward (TRL's fused LM head,
`trl.trainer.utils.add_fused_lm_head`: `model(..., labels=labels, fused_lm_head=True)`) so that a padded batch runs on
its real tokens only, as one sequence whose position ids restart at each row, and the per-token outputs are put back in
the padded layout. TRL's loss code reads them unchanged, so every DPO loss type, `ld_alpha` and the reference
log-probs work as before, and so do GRPO's forwards in `UPOTrainer` (left-padded prompts, right-padded rollouts).
Attention stays within each row: transformers builds a block-diagonal mask from the position ids, flash-attention
kernels take the row boundaries, and on CPU the stage switches to `models.attention.packed_rows`.
"""

import functools

import torch

# keyword arguments a packed call can take; anything else (pixel values, token type ids, pre-shifted labels under
# context parallelism, MoE routing inputs) is scored padded, as TRL does it
PACKABLE = {"input_ids", "attention_mask", "labels", "use_cache", "output_router_logits"}
PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def multimodal_positions(model) -> bool:
    """Whether `model` places tokens with multimodal rotary positions (`mrope_section`: Qwen2-VL, Qwen2.5-VL,
    ERNIE-4.5-VL). Their text model (transformers 5.x, `Qwen2VLTextModel.forward`) expands packed 2-D position ids to
    its three sections and builds a plain causal mask over the whole sequence, so the rows of a padding-free batch
    would attend to the rows before them: 0.2 nats off in a row's log-prob on a tiny Qwen2-VL. Their batches stay
    padded."""
    config = model.config.get_text_config()
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return "mrope_section" in rope


def pack_scoring_forward(model) -> None:
    """Make `model(..., fused_lm_head=True)` on a padded batch score its real tokens only (see the module docstring).

    `model` is the one TRL patched, e.g. `trainer.model.get_base_model()` under PEFT. Other calls (generation, plain
    logits, batches without padding) go to the forward as it was."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, fused_lm_head=False, **kwargs):
        mask = kwargs.get("attention_mask")
        given = {key for key, value in kwargs.items() if value is not None}  # PEFT passes unset inputs as None
        if (not fused_lm_head or args or mask is None or mask.dim() != 2 or kwargs.get("labels") is None
                or given - PACKABLE or bool(mask.all())):
            return original(*args, fused_lm_head=fused_lm_head, **kwargs)
        real = mask.bool()
        positions = (real.cumsum(dim=1) - 1)[real]
        # the fused head pairs the hidden state at t with the label at t + 1: a row's first token would be the target
        # of the row before it, so it is none (padded, a first token is never a target either)
        labels = kwargs["labels"][real].masked_fill(positions == 0, -100)
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "labels")}
        outputs = original(input_ids=kwargs["input_ids"][real][None], position_ids=positions[None],
                           labels=labels[None], fused_lm_head=True, **rest)
        for field in PER_TOKEN:
            value = getattr(outputs, field, None)
            if value is not None:
                setattr(outputs, field, unpack(value[0], real))
        return outputs

    model.forward = forward


def unpack(packed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-token outputs of a packed sequence ([tokens - 1], the value at t about token t + 1) in the padded batch's
    shifted layout ([rows, length - 1]), zero at padding: what the fused head returns for the padded batch."""
    whole = torch.cat([packed, packed.new_zeros(1)])  # the last token is the target of nothing
    return packed.new_zeros(real.shape).masked_scatter(real, whole)[:, :-1]
