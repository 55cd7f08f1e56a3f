"""Batched generation for evaluation and the pair sampler: prompts sorted by length into batches, decoded in rounds that
stop once every row has ended, under bf16 autocast where asked; the prompts checked against the model's positions, the
token ids a reply ends on, and each process's share of the prompts under a launcher."""

import dataclasses
import logging
import typing
from collections.abc import Callable

from . import devices
from .configs import Precision
from .errors import UserError
from .generation_journal import Journal, restore_rng
from .models import sampling_weights, vision

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Share:
    """This process's share of the prompts when several data-parallel processes evaluate one model together: every
    `count`-th prompt from `index`, and `gather`, which hands every process's list to every process, in process order
    (`accelerate.utils.gather_object`). Each process holds the whole model under DDP, so the work divides with no
    collective inside a forward; the others do not wait at a barrier while one process evaluates alone, which past
    `ddp_timeout` (30 minutes) would end the job."""

    index: int
    count: int
    gather: Callable[[list], list]

    @classmethod
    def among(cls, index: int, count: int) -> "Share | None":
        """Process `index`'s share among `count` processes of accelerate's process group, or None for one process."""
        if count < 2:
            return None
        from accelerate.utils import gather_object

        return cls(index, count, gather_object)


def context_limit(model) -> int | None:
    """The positions the model was trained for: `max_position_embeddings`, or the RoPE scaling's original length times
    its factor where that is more (Qwen's YaRN leaves `max_position_embeddings` at the unscaled length, which is the
    original one unless the scaling names it); None where the config does not say. Where the scaling names its
    original length, `max_position_embeddings` may be the scaled one already (Llama-3.1's llama3 RoPE: 131,072 from
    8,192 with factor 8; DeepSeek-V3's YaRN: 163,840 = 4,096 x 40): times the factor, it was 8-40x past the model."""
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or {}
    if limit and rope.get("rope_type", "default") != "default" and rope.get("factor"):
        limit = max(limit, int(rope.get("original_max_position_embeddings", limit) * rope["factor"]))
    return limit


def check_context(model, tokenizer, prompts: list[str], new_tokens: int | None, key: str) -> None:
    """The longest prompt and `new_tokens` more fit in the model's positions (`context_limit`): past them a RoPE model
    goes on generating without an error (transformers only logs a "friendly reminder"), and what it writes there is
    noise that evaluation scores and training learns from. Image prompts count their text tokens only."""
    limit = context_limit(model)
    if limit is None or not new_tokens or not prompts:
        return
    ids = vision.text_tokenizer(tokenizer)(sorted(set(prompts)), add_special_tokens=False)["input_ids"]
    longest = max(map(len, ids))
    if longest + new_tokens > limit:
        fix = f"lower {key} to at most {limit - longest}, or shorten the prompts" if longest < limit else \
            "shorten the prompts"
        raise UserError(f"{key}={new_tokens} after the longest prompt ({longest} tokens) runs to position "
                        f"{longest + new_tokens}, past the model's max_position_embeddings ({limit}), where it writes "
                        f"noise without an error (transformers only warns): {fix}")


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress=None,
             images: list | None = None, share: Share | None = None, key: str = "max_new_tokens",
             journal: Journal | None = None, **sampling):
    """Completions for rendered prompts, greedy unless `sampling` says otherwise (e.g. `do_sample=True,
    temperature=1.0`); returns (texts, stopped flags, token counts). With `images` (one list per prompt),
    `tokenizer` is a VLM's processor. With a `share`, this process generates its share and every process gets all
    of them back. `key` names `max_new_tokens` in the error when the prompts and it do not fit the model
    (`check_context`). With a `journal` (this process's), the batches a killed run of the same call finished are
    taken from it and each new one is added to it (`generation_journal`)."""
    check_context(model, tokenizer, prompts, max_new_tokens, key)
    if share is not None:
        mine = range(share.index, len(prompts), share.count)  # interleaved: each share has long and short prompts
        texts, stopped, lengths = _generate_here(model, tokenizer, [prompts[i] for i in mine], max_new_tokens,
                                                 batch_size, progress,
                                                 None if images is None else [images[i] for i in mine], journal,
                                                 **sampling)
        replies = [None] * len(prompts)
        for indices, part in share.gather([(list(mine), list(zip(texts, stopped, lengths)))]):
            for index, reply in zip(indices, part):
                replies[index] = reply
        texts, stopped, lengths = (list(column) for column in zip(*replies)) if replies else ([], [], [])
        return texts, stopped, lengths
    return _generate_here(model, tokenizer, prompts, max_new_tokens, batch_size, progress, images, journal, **sampling)


def _generate_here(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress,
                   images: list | None, journal: Journal | None = None, **sampling):
    """`generate` in this process, on all of `prompts` (checked against the model's positions by `generate`, on every
    process's prompts, so that all of them fail alike)."""
    processor, tokenizer = tokenizer, vision.text_tokenizer(tokenizer)
    tokenizer.padding_side = "left"
    # MoE models trained with a load-balancing loss keep `output_router_logits` on, and transformers then computes
    # that loss inside generate() with the full-prompt attention mask against one-token steps, and fails.
    config = model.config.get_text_config()
    router_logits = getattr(config, "output_router_logits", None)
    if router_logits:
        config.output_router_logits = False
    texts, stopped, lengths = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    settings = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": stop_ids(model, tokenizer), "do_sample": False,
                **sampling}
    # less of each prefill is padding: ~10% less time, 2x100 vs 1x200 prompts here
    windows, done = length_batches([len(p) for p in prompts], batch_size), 0
    inputs = {"prompts": prompts, "images": images, "max_new_tokens": max_new_tokens, "settings": settings}
    journaled = journal.start(inputs, windows) if journal else []
    for number, window in enumerate(windows):
        if number < len(journaled):  # finished by an earlier run: its replies, and the generators as it left them
            entry = journaled[number]
            replies = list(zip(entry["texts"], entry["stopped"], entry["lengths"]))
            if number == len(journaled) - 1:
                restore_rng(entry["rng"])
        else:
            replies = _decode_window(model, processor, [prompts[i] for i in window],
                                     None if images is None else [images[i] for i in window], max_new_tokens, settings)
            if journal:
                journal.record(window, *(list(column) for column in zip(*replies)))
        for index, (text, ended, length) in zip(window, replies):
            texts[index], stopped[index], lengths[index] = text, ended, length
        done += len(window)
        if progress:
            progress(done, len(prompts))
    if router_logits:
        config.output_router_logits = router_logits
    return texts, stopped, lengths


def _decode_window(model, processor, prompts: list[str], images: list | None, max_new_tokens: int,
                   settings: dict) -> list[tuple[str, bool, int]]:
    """(text, whether it ended, its token count) of each prompt of one batch."""
    tokenizer = vision.text_tokenizer(processor)
    if images is None:
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        rounds = ROUNDS
    else:  # image inputs are only read by the first forward: one round, no continuation from the cache
        batch = vision.encode(processor, prompts, images, model.device)
        rounds = (max_new_tokens,)
    replies = []
    for row in decode(model, batch, max_new_tokens, rounds, **settings):
        ended = bool(row) and row[-1] in settings["eos_token_id"]  # `decode` cuts each row after its first EOS
        kept = row[:-1] if ended else row
        replies.append((tokenizer.decode(kept, skip_special_tokens=True), ended, len(kept)))
    return replies


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens a reply ends at: the tokenizer's EOS and every one the model's generation_config lists (as TRL's
    GRPO rollouts stop). Gemma-2/3-it end a turn with <end_of_turn> and Phi-3 with <|end|> while their tokenizer's
    EOS is <eos> / <|endoftext|>: on EOS alone a reply ran on into invented turns to max_new_tokens."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    return list(dict.fromkeys(([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []) + listed))


# New tokens per decoding round. `generate` keeps every row of a batch to the step its longest reply ends at: after
# SFT the mean reply here is 16 tokens and some run to the 40-token budget, so most of the decoding went to rows that
# had already finished. Between rounds the finished rows leave the batch with their part of the KV cache, and the
# rest continue from it: 30-32 s instead of 38 s for 200 prompts after SFT here. (transformers'
# continuous batching does this per step, but on CPU it took twice as long as one `generate`.)
ROUNDS = (12, 6, 6, 6, 10)


def decode(model, batch: dict, max_new_tokens: int, rounds=ROUNDS, **settings) -> list[list[int]]:
    """Each row's new tokens (up to and including its end-of-sequence token) for a left-padded batch, decoded in
    `rounds` (then the last size again until `max_new_tokens`), finished rows dropped between rounds."""
    import itertools

    import torch

    eos = settings["eos_token_id"]
    eos = {eos} if isinstance(eos, int) else set(eos)  # one id, or the ids any of which ends a reply (`stop_ids`)
    # a minimum reply length (the call's or the checkpoint's generation_config) counts from each call's own start:
    # every round gets what is left of it, or a reply could not end in the first tokens of each round
    floor = settings.pop("min_new_tokens", getattr(getattr(model, "generation_config", None), "min_new_tokens", None))
    replies = [[] for _ in range(len(batch["input_ids"]))]
    rows = list(range(len(replies)))  # batch position -> row
    inputs, left = dict(batch), max_new_tokens
    for size in itertools.chain(rounds, itertools.repeat(rounds[-1])):
        step = min(size, left)
        minimum = {"min_new_tokens": min(max(floor - (max_new_tokens - left), 0), step)} if floor else {}
        with torch.no_grad():
            result = model.generate(**inputs, max_new_tokens=step, return_dict_in_generate=True, **settings,
                                    **minimum)
        width = inputs["input_ids"].shape[1]
        new = result.sequences[:, width:]
        going = []
        for position, tokens in enumerate(new.tolist()):
            ended = next((i for i, t in enumerate(tokens) if t in eos), None)
            replies[rows[position]].extend(tokens if ended is None else tokens[:ended + 1])
            if ended is None and len(tokens) == step:
                going.append(position)
        left -= step
        if not going or left <= 0:
            return replies
        keep = torch.tensor(going, device=new.device)
        mask = inputs["attention_mask"]
        inputs = {"input_ids": result.sequences[keep],
                  "attention_mask": torch.cat([mask, mask.new_ones(mask.shape[0], new.shape[1])], dim=1)[keep]}
        try:
            result.past_key_values.batch_select_indices(keep)
            inputs["past_key_values"] = result.past_key_values
        except (AttributeError, NotImplementedError):  # no cache, or one that cannot drop rows: re-read the text
            pass
        else:  # multimodal-RoPE models (Qwen-VL, ERNIE-VL, GLM-4V...) keep each row's position offset outside the
            # cache and add it to the continuation's positions: it must lose the same rows as the cache
            for module in model.modules():
                deltas = getattr(module, "rope_deltas", None)
                if torch.is_tensor(deltas) and deltas.shape[0] == len(rows):
                    module.rope_deltas = deltas[keep.to(deltas.device)]
        rows = [rows[p] for p in going]


def length_batches(lengths: list[int], batch_size: int, longest_first: bool = False) -> list[list[int]]:
    """Row indices in batches of rows of similar length, so little of each batch is padding; callers put each
    result back at its row's index, so the caller's order is kept."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i] if longest_first else lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def autocast(model, dtype: str, option: str = "eval.dtype", merge_lora: bool = False):
    """bf16 autocast around generation and scoring when `dtype` asks for it (`auto`: where the device has native
    bf16, `devices.resolve_precision`), with the frozen linear weights cast once for its duration; `merge_lora`
    (decoding only, not scoring) merges LoRA into those copies, or in float32 on CPU into float32 copies
    (`models.sampling_weights`). The model's own weights are back as they were afterwards."""
    if dtype not in typing.get_args(Precision):  # a recipe's or command line's value is checked there; this is for code
        raise UserError(f"{option}: '{dtype}'; expected one of: {', '.join(typing.get_args(Precision))}")
    bf16 = devices.resolve_precision(dtype, model.device.type) == "bfloat16"
    if bf16 and not devices.native_bf16(model.device.type):
        logger.warning("%s: bfloat16: %s; 'auto' or float32 would be faster", option, devices.EMULATED_BF16)
    return sampling_weights(model, bf16, merge_lora)


def row_images(rows: list[dict]) -> list | None:
    """Each row's images, or None for text rows (the text code path)."""
    return [r.get("images") or [] for r in rows] if rows and "images" in rows[0] else None
