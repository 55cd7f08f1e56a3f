"""Held-out evaluation: greedy answers scored by the same verifiers UPO optimises, plus held-out loss.

Run on the base model and after every stage, so each stage's effect is a measured difference. Rows are
`prompt` (messages), `answer`, `domain`, `thinking` and optionally the reference reply `completion` (for the loss)
and the `tools` the prompt is rendered with.
Rows with `images`, evaluated with a vision-language model's processor as the tokenizer, are generated and scored
with their images (`posttrain.models.vision`); the metrics are the same.

    posttrain eval outputs/<run> --stage sft        # a stage of a finished run
    posttrain eval --model DIR [--adapter DIR] --dataset DIR   # anything else

What to evaluate on and how (`EvalArguments`: dataset, split, limit, generation budget, batch size, samples kept) is
one object from the recipe's `eval:` section, `posttrain eval`'s flags or a stage's arguments, passed to `run`
(a loaded model) or `run_saved` (a model folder).
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import typing
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from . import devices
from .configs import EvalArguments, Precision
from .data import (
    completion_text,
    conversation_replies,
    data_folder,
    has_tool_turns,
    opens_think,
    preference_texts,
    prompt_text,
)
from .errors import UserError, is_out_of_memory, row_name, what_ran_out
from .gates import check_image_slots, check_special_token_text, prompt_end
from .io import write_json
from .models import sampling_weights, vision
from .models.lm_head import chunks
from .stats import wilson

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
    """The positions the model was trained for: `max_position_embeddings`, times the RoPE scaling factor where one is
    set (Qwen's YaRN leaves `max_position_embeddings` at the unscaled length); None where the config does not say."""
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None) or {}
    if limit and rope.get("rope_type", "default") != "default" and rope.get("factor"):
        limit = int(limit * rope["factor"])
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
             images: list | None = None, share: Share | None = None, key: str = "max_new_tokens", **sampling):
    """Completions for rendered prompts, greedy unless `sampling` says otherwise (e.g. `do_sample=True,
    temperature=1.0`); returns (texts, stopped flags, token counts). With `images` (one list per prompt),
    `tokenizer` is a VLM's processor. With a `share`, this process generates its share and every process gets all
    of them back. `key` names `max_new_tokens` in the error when the prompts and it do not fit the model
    (`check_context`)."""
    check_context(model, tokenizer, prompts, max_new_tokens, key)
    if share is not None:
        mine = range(share.index, len(prompts), share.count)  # interleaved: each share has long and short prompts
        texts, stopped, lengths = _generate_here(model, tokenizer, [prompts[i] for i in mine], max_new_tokens,
                                                 batch_size, progress,
                                                 None if images is None else [images[i] for i in mine], **sampling)
        replies = [None] * len(prompts)
        for indices, part in share.gather([(list(mine), list(zip(texts, stopped, lengths)))]):
            for index, reply in zip(indices, part):
                replies[index] = reply
        texts, stopped, lengths = (list(column) for column in zip(*replies)) if replies else ([], [], [])
        return texts, stopped, lengths
    return _generate_here(model, tokenizer, prompts, max_new_tokens, batch_size, progress, images, **sampling)


def _generate_here(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress,
                   images: list | None, **sampling):
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
    done = 0
    # less of each prefill is padding: ~10% less time, 2x100 vs 1x200 prompts here
    for window in length_batches([len(p) for p in prompts], batch_size):
        if images is None:
            batch = tokenizer([prompts[i] for i in window], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            rounds = ROUNDS
        else:  # image inputs are only read by the first forward: one round, no continuation from the cache
            batch = vision.encode(processor, [prompts[i] for i in window], [images[i] for i in window], model.device)
            rounds = (max_new_tokens,)
        for index, row in zip(window, decode(model, batch, max_new_tokens, rounds, **settings)):
            ended = bool(row) and row[-1] in settings["eos_token_id"]  # `decode` cuts each row after its first EOS
            kept = row[:-1] if ended else row
            texts[index] = tokenizer.decode(kept, skip_special_tokens=True)
            stopped[index], lengths[index] = ended, len(kept)
        done += len(window)
        if progress:
            progress(done, len(prompts))
    if router_logits:
        config.output_router_logits = router_logits
    return texts, stopped, lengths


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
    replies = [[] for _ in range(len(batch["input_ids"]))]
    rows = list(range(len(replies)))  # batch position -> row
    inputs, left = dict(batch), max_new_tokens
    for size in itertools.chain(rounds, itertools.repeat(rounds[-1])):
        step = min(size, left)
        with torch.no_grad():
            result = model.generate(**inputs, max_new_tokens=step, return_dict_in_generate=True, **settings)
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


# Rows scored in one forward at most: each keeps its logits over the whole vocabulary for every completion position
# (16 rows of 2,048 tokens with a 152k vocabulary: 9 GiB in bf16), so fewer when the evaluation's batch_size is lower
SCORE_BATCH = 16


def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = SCORE_BATCH,
                     images: list | None = None, max_length: int | None = None, truncation_mode: str = "keep_start"):
    """Summed log-prob and token count of each completion given its rendered prompt (teacher forcing); with `images`
    (one list per prompt), `tokenizer` is a VLM's processor. Text rows are cut to `max_length` as TRL cuts them."""
    out = [None] * len(prompts)
    for window in length_batches([len(p) + len(c) for p, c in zip(prompts, completions)], batch_size,
                                 longest_first=True):
        texts, replies = [prompts[i] for i in window], [completions[i] for i in window]
        if images is None:
            batch = _text_layout(tokenizer, texts, replies, model.device, max_length, truncation_mode)
        else:
            batch = vision.completion_layout(tokenizer, texts, [images[i] for i in window], replies, model.device)
        for i, score in zip(window, _score_completions(model, batch)):
            out[i] = score
    return out


def _text_layout(tokenizer, prompts: list[str], completions: list[str], device, max_length: int | None = None,
                 truncation_mode: str = "keep_start") -> dict:
    """Prompt + completion token ids, right-padded, with the completion's positions marked in `completion_mask`;
    each row cut to `max_length` (when given) as TRL's collators cut it."""
    import torch

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    replies = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    if max_length is not None:
        ids, replies = zip(*(_cut(p, c, max_length, truncation_mode) for p, c in zip(ids, replies)))
    width = max(len(p) + len(c) for p, c in zip(ids, replies))

    def padded(rows, value=0):
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], device=device)

    return {"input_ids": padded([p + c for p, c in zip(ids, replies)], tokenizer.pad_token_id),
            "attention_mask": padded([[1] * (len(p) + len(c)) for p, c in zip(ids, replies)]),
            "completion_mask": padded([[0] * len(p) + [1] * len(c) for p, c in zip(ids, replies)])}


def _cut(prompt: list[int], reply: list[int], max_length: int, truncation_mode: str) -> tuple[list, list]:
    """A prompt's and its reply's ids cut to `max_length` together: the end goes (`keep_start`) or the start
    (`keep_end`), as TRL's DPO collator cuts prompt + reply."""
    if truncation_mode == "keep_end":
        drop = max(len(prompt) + len(reply) - max_length, 0)
        return prompt[min(drop, len(prompt)):], reply[max(drop - len(prompt), 0):]
    return prompt[:max_length], reply[:max(max_length - len(prompt), 0)]


def _score_completions(model, batch: dict) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of the `completion_mask` tokens of each row of a laid-out batch."""
    import torch

    completion_mask = batch.pop("completion_mask")
    # the LM head only from the first position that predicts a completion token: prompts are most of each row
    first = max(int(completion_mask.any(0).int().argmax()) - 1, 0)
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=completion_mask.shape[1] - first).logits[:, :-1]
    target, scored = batch["input_ids"][:, first + 1:], completion_mask[:, first + 1:].bool()
    # log-softmax over the vocabulary at the scored positions only (prompts and padding are most of each row), in
    # chunks of positions: float32 copies of all of them at once were twice the size of the bf16 logits, twice over
    rows, columns = scored.nonzero(as_tuple=True)
    picked = torch.cat([
        torch.log_softmax(logits[rows[start:end], columns[start:end]].float(), dim=-1)
        .gather(-1, target[rows[start:end], columns[start:end], None]).squeeze(-1)
        for start, end in chunks(len(rows), logits.shape[-1])])
    logps = torch.zeros(target.shape, dtype=picked.dtype, device=picked.device).masked_scatter(scored, picked)
    return list(zip(logps.sum(-1).tolist(), scored.sum(-1).tolist()))


def heldout_loss(model, tokenizer, rows: list[dict], limit: int | None = None,
                 batch_size: int = SCORE_BATCH) -> float | None:
    """Mean per-token NLL of the reference replies (`completion` column) given their prompts; of the first `limit`
    rows that have one, when given; `batch_size` rows a forward at most (`SCORE_BATCH`)."""
    rows = [r for r in rows if r.get("completion")][:limit]
    if not rows:
        return None
    eos = vision.text_tokenizer(tokenizer).eos_token
    row_images = _images(rows)
    prompts, replies, images = [], [], []
    for row, its_images in zip(rows, row_images or [None] * len(rows)):
        for prompt, reply in _reference_turns(tokenizer, row, eos):
            prompts.append(prompt)
            replies.append(reply)
            images.append(its_images)
    scores = completion_logps(model, tokenizer, prompts, replies, batch_size=min(batch_size, SCORE_BATCH),
                              images=images if row_images else None)
    return -sum(s for s, _ in scores) / max(sum(n for _, n in scores), 1)


def _reference_turns(tokenizer, row: dict, eos: str) -> list[tuple[str, str]]:
    """A row's reference reply as (rendered context, text to score) pieces. A text reply is one piece. A reply in TRL's
    conversational form gives one piece per assistant turn, as the chat template renders it after all before it (its
    tool calls and end-of-turn marker), the tool results between them context only, as SFT's assistant-only loss
    trains them: only the last message's text was scored, so a reply's tool calls never counted."""
    completion = row["completion"]
    if not isinstance(completion, list):
        prompt = prompt_text(tokenizer, row)
        return [(prompt, continuation(prompt, completion_text(completion)) + eos)]
    pieces = []
    for turn, message in enumerate(completion):
        if message.get("role") != "assistant":
            continue
        context = {**row, "prompt": row["prompt"] + completion[:turn]}
        prompt, [reply] = conversation_replies(tokenizer, context, [[message]])
        head, end, _ = reply.rpartition(eos)  # up to its end-of-turn, as a text reply is scored
        pieces.append((prompt, head + end if end else reply))
    return pieces


def continuation(prompt: str, reply: str) -> str:
    """A reference reply as it continues its rendered prompt: a template whose generation prompt opens the think
    block itself (ERNIE-4.5-VL's and Qwen3.5's with thinking on end in "<think>") is continued without a second one."""
    if opens_think(prompt) and reply.lstrip().startswith("<think>"):
        return reply.lstrip()[len("<think>"):]
    return reply


def preference_eval(model, tokenizer, pairs: list[dict], dtype: str = "float32",
                    batch_size: int = SCORE_BATCH, max_length: int | None = None,
                    truncation_mode: str = "keep_start") -> dict:
    """How often the model itself prefers `chosen` to `rejected`: log π(chosen|x) > log π(rejected|x), summed over
    the reply's tokens. Unlike DPO's reward accuracy it needs no reference model, so base, SFT and DPO compare.
    Scored in `dtype` as `evaluate` scores its held-out loss (bf16: about half the time of float32 on CPU),
    `batch_size` replies a forward at most (`SCORE_BATCH`), each pair cut to the stage's `max_length` as TRL cuts
    it (scored whole, long held-out pairs went past the memory `max_length` was set for, and the context). A reply
    with tool results is scored on its own turns only, each after all before it (`_reference_turns`), as DPO trains
    it (`trainers.dpo_trainer`): the results are the environment's text."""
    was_training = model.training
    model.eval()
    # scored as TRL trains them (`data.preference_texts`)
    text_tokenizer = vision.text_tokenizer(tokenizer)
    texts = [preference_texts(tokenizer, p, text_tokenizer.eos_token) for p in pairs]
    # TRL tokenizes a text prompt with the tokenizer's special tokens (Llama-3's and Gemma's BOS) and
    # `completion_logps` adds none: the BOS is written in (a rendered conversation has its own)
    bos = added_bos(text_tokenizer)
    prompts = [bos + t[0] if isinstance(p["prompt"], str) else t[0] for p, t in zip(pairs, texts)]
    pieces = []  # (side, pair, prompt, reply); a reply with tool results by its own turns only, as DPO scores it
    for side, name in ((1, "chosen"), (2, "rejected")):
        for i, (pair, text) in enumerate(zip(pairs, texts)):
            turns = (_reference_turns(tokenizer, {**pair, "completion": pair[name]}, text_tokenizer.eos_token)
                     if has_tool_turns(pair) else [(prompts[i], text[side])])
            pieces += [(side, i, *turn) for turn in turns]
    images = _images(pairs)
    with autocast(model, dtype):
        scores = completion_logps(model, tokenizer, [p[2] for p in pieces], [p[3] for p in pieces],
                                  batch_size=min(batch_size, SCORE_BATCH),
                                  images=[images[p[1]] for p in pieces] if images else None, max_length=max_length,
                                  truncation_mode=truncation_mode)
    chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
    for (side, i, _, _), (score, _) in zip(pieces, scores):
        (chosen if side == 1 else rejected)[i] += score
    if was_training:
        model.train()
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"n": len(pairs), "accuracy": _mean([m > 0 for m in margins]), "mean_logp_margin": _mean(margins)}


def added_bos(tokenizer) -> str:
    """The BOS text the tokenizer puts before any text it encodes with its special tokens, or ""."""
    bos = tokenizer.bos_token_id
    return tokenizer.bos_token if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else ""


def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int = EvalArguments.max_new_tokens,
             batch_size: int = EvalArguments.batch_size, samples: int = EvalArguments.samples, progress=None,
             dtype: str = EvalArguments.dtype, loss_limit: int | None = EvalArguments.loss_limit,
             share: Share | None = None) -> dict:
    """Accuracy (overall, per domain, per thinking mode), format, stop rate, length and held-out loss (on the first
    `loss_limit` rows with a reference reply). With a `share`, the processes generate a share each (`Share`); the
    held-out loss, a few seconds, is scored by the first process only (None elsewhere)."""
    from .rewards import REWARDS

    was_training = model.training
    model.eval()
    # with the row's `tools` (and thinking mode), as SFT trains its rows: without them, it was asked to call tools
    # whose schemas it was never shown
    prompts = [prompt_text(tokenizer, r) for r in rows]
    dtype = devices.resolve_precision(dtype, model.device.type)  # what `auto` is on this machine, recorded below
    started = time.perf_counter()
    # greedy decoding from the weights with LoRA merged in, as a merged export computes: two small matmuls less per
    # layer and token (200 prompts after SFT here: 1.32x [1.23-1.39] less time in bf16, 179 of 200 replies the same
    # as through the unmerged adapter, the rest differ by bf16 rounding)
    with autocast(model, dtype, merge_lora=True):
        texts, stopped, lengths = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress,
                                           images=_images(rows), share=share, key="eval.max_new_tokens")
    generated = time.perf_counter()
    # scored through the adapter itself, in the same precision: in float32 the loss took as long as generating
    loss = None
    if share is None or share.index == 0:
        with autocast(model, dtype):
            loss = heldout_loss(model, tokenizer, rows, loss_limit, batch_size)
    seconds = {"generate": round(generated - started, 1), "heldout_loss": round(time.perf_counter() - generated, 1)}
    columns = {"answer": [r["answer"] for r in rows], "thinking": [r.get("thinking") for r in rows],
               "domain": [r.get("domain") for r in rows], "prompts": prompts}  # TRL passes `prompts` too
    correct = REWARDS["accuracy"](texts, **columns)
    formatted = REWARDS["think_format"](texts, **columns)
    # the ablation's hackable proxy, scored on every evaluation so any two runs compare on it
    proxy = REWARDS["hackable_length"](texts, **columns)
    groups = defaultdict(list)
    for row, ok in zip(rows, correct):
        groups[f"domain/{row.get('domain')}"].append(ok)
        mode = {True: "thinking", False: "non_thinking"}.get(row.get("thinking"), "default")
        groups[f"mode/{mode}"].append(ok)
    if was_training:
        model.train()
    return {
        "n": len(rows),
        "accuracy": _mean(correct),
        "accuracy_ci95": list(wilson(sum(map(bool, correct)), len(rows))),
        # every prompt's verdict, in row order, with a fingerprint of the prompts: two stages' verdicts pair up (for
        # McNemar's test) only when they answered the same prompts in the same order
        "verdicts": [int(bool(c)) for c in correct],
        "prompts_sha": prompts_sha(prompts, columns["answer"]),
        "format": _mean(formatted),
        "proxy_reward": _mean(proxy),
        "stop_rate": _mean(stopped),
        "mean_completion_tokens": _mean(lengths),
        "heldout_loss": None if loss is None or math.isnan(loss) else loss,
        "by_group": {k: _mean(v) for k, v in sorted(groups.items())},
        "seconds": seconds,
        "processes": share.count if share else 1,
        "dtype": dtype,
        "samples": [
            {"prompt": shown_prompt(r["prompt"]), "thinking": r.get("thinking"),
             "answer": r["answer"],
             "completion": t, "correct": bool(c)}
            for r, t, c in list(zip(rows, texts, correct))[:samples]
        ],
    }


def shown_prompt(messages: list[dict]) -> str:
    """A prompt as the samples show it: one question as its text; several turns (after the system turn) one `role:
    text` line each, a tool call as `name(arguments)`. The last turn alone was a tool result ("5") where the
    conversation ended on one, not what was asked."""
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) == 1:
        return vision.message_text(turns[0]["content"])
    lines = []
    for message in turns:
        calls = [call.get("function", call) for call in message.get("tool_calls") or []]
        text = " ".join([vision.message_text(message.get("content"))] + [
            f"{call.get('name')}({_arguments(call.get('arguments'))})" for call in calls])
        lines.append(f"{message['role']}: {text.strip()}")
    return "\n".join(lines)


def _arguments(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


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


def prompts_sha(prompts: list[str], answers: list) -> str:
    """Short hash of the rendered prompts and their expected answers, in order."""
    return hashlib.sha256(json.dumps([prompts, answers], default=str).encode()).hexdigest()[:16]


def _images(rows: list[dict]) -> list | None:
    """Each row's images, or None for text rows (the text code path)."""
    return [r.get("images") or [] for r in rows] if rows and "images" in rows[0] else None


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else 0.0


def load_rows(dataset: str, split: str = "test", limit: int | None = None) -> list[dict]:
    from .data import load_split

    data = load_split(dataset, split)
    missing = [column for column in ("prompt", "answer") if column not in data.column_names]
    if missing:
        raise UserError(f"{dataset} ({split}): prompt rows need the columns prompt (a list of {{role, content}} "
                        f"messages) and answer (what the reply must end with); missing: {', '.join(missing)} (has: "
                        f"{', '.join(data.column_names)})")
    if len(data) == 0:
        raise UserError(f"{dataset} ({split}): no rows")
    if limit:
        data = data.select(range(min(limit, len(data))))
    # prompts are rendered with the chat template: a plain string (TRL's standard form) would fail inside it
    text = next((i for i, prompt in enumerate(data["prompt"]) if not isinstance(prompt, list)), None)
    if text is not None:
        raise UserError(f"{dataset} ({split}): {row_name(text)}: prompt is {type(data['prompt'][text]).__name__}; "
                        'expected a list of {role, content} messages, e.g. [{"role": "user", "content": "What is '
                        '2 + 2?"}]')
    # a prompt that ends on a reply or a system turn would be answered by a second reply in a row, or an answer to
    # nothing asked: the stages' gates refuse such prompts for training
    ended = next(((i, problem) for i, prompt in enumerate(data["prompt"]) if (problem := prompt_end(prompt))), None)
    if ended is not None:
        raise UserError(f"{dataset} ({split}): {row_name(ended[0])}: {ended[1]}")
    # a row without an answer cannot be scored; counted neither right nor wrong it would make `accuracy` and the
    # paired verdicts disagree
    empty = [i for i, answer in enumerate(data["answer"]) if answer is None or not str(answer).strip()]
    if empty:
        more = f" and {len(empty) - 1} more" if len(empty) > 1 else ""
        raise UserError(f"{dataset} ({split}): {row_name(empty[0])}{more} has no answer to score the reply against; "
                        "fill the answer column or drop the row")
    if vision.has_images(data):  # as the stages' rows: one image per placeholder, paths read in the data's folder
        check_image_slots(data, f"{dataset} ({split})")
        data = vision.decode_images(data, data_folder(dataset), f"{dataset} ({split})")
    return vision.as_rows(data)


def settings_rows(settings: EvalArguments) -> list[dict]:
    """The rows `settings` names (a clear error when there is no dataset or it cannot be read)."""
    if not settings.dataset:
        raise UserError("no evaluation dataset: set `eval.dataset` in the recipe or pass --dataset")
    return load_rows(settings.dataset, settings.split, settings.limit)


def run(settings: EvalArguments, model, tokenizer, rows: list[dict] | None = None, share: Share | None = None) -> dict:
    """`evaluate` a loaded model (and its tokenizer or processor) on `settings.dataset`, as `settings` says."""
    rows = settings_rows(settings) if rows is None else rows
    from datasets import Dataset

    # a prompt that writes "<|im_end|>" as text is rendered with turns nobody wrote, and scored on them
    prompts = Dataset.from_dict({"prompt": [row["prompt"] for row in rows]})
    check_special_token_text(tokenizer, prompts, f"{settings.dataset} ({settings.split})", model,
                             images=any(row.get("images") for row in rows))  # image placeholders are the processor's
    try:
        return evaluate(model, tokenizer, rows, settings.max_new_tokens, settings.batch_size, settings.samples,
                        dtype=settings.dtype, loss_limit=settings.loss_limit, share=share)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise UserError(f"out of memory evaluating on {settings.dataset} ({what_ran_out(exc)}) with "
                        f"{settings.batch_size} prompts a batch and up to {settings.max_new_tokens} new tokens: lower "
                        "eval.batch_size (`posttrain eval --batch-size`), then run the same command again") from exc


def run_saved(settings: EvalArguments, model: str, tokenizer: str | None = None, adapter: str | None = None,
              out: str | Path | None = None, trust_remote_code: bool = False, share: Share | None = None) -> dict:
    """`run` on `model` (a folder, a cached Hub id or `tiny:<arch>`, as a recipe names it; + LoRA `adapter`); the
    metrics, also written as JSON to `out` when given (by the first process, with a `share`). The dataset, the model
    and the adapter are checked before anything loads, so a wrong path is a one-line error rather than a traceback
    after the model load."""
    from .models import adapter_folder, load_for_inference, load_tokenizer, resolve_model

    rows = settings_rows(settings)
    model_dir = resolve_model(str(model))
    if adapter is not None:
        adapter_folder(adapter)
    model = load_for_inference(model_dir, adapter=adapter, precision=settings.dtype,
                               trust_remote_code=trust_remote_code)
    metrics = run(settings, model, load_tokenizer(tokenizer or model_dir, trust_remote_code=trust_remote_code), rows,
                  share)
    if out is not None and (share is None or share.index == 0):
        write_json(out, metrics)
    return metrics


def launched_share() -> Share | None:
    """This process's `Share` when a launcher started several (`Pipeline.eval_command`: one per GPU), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=not devices.has_cuda())  # on CPU accelerate joins the processes only when told (gloo)
    return Share.among(state.process_index, state.num_processes)


def main(argv: list[str] | None = None) -> int:
    """`python -m posttrain.evaluate --settings eval.json --model DIR ...`: `run_saved` in a child process (the pipeline's
    base-model evaluation, logged like a stage); the settings travel as `EvalArguments` JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog="posttrain.evaluate")
    parser.add_argument("--settings", required=True, help="EvalArguments as a JSON file")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--adapter")
    parser.add_argument("--out", required=True, help="write the metrics JSON here")
    parser.add_argument("--trust-remote-code", action="store_true", help="the recipe's base.trust_remote_code")
    args = parser.parse_args(argv)
    settings = EvalArguments(**json.loads(Path(args.settings).read_text()))
    run_saved(settings, args.model, args.tokenizer, args.adapter, args.out, args.trust_remote_code, launched_share())
    return 0


if __name__ == "__main__":  # the pipeline's base evaluation: a user error is one paragraph, handed to the pipeline
    from . import skip_final_collection
    from .errors import UserError, report_child_error

    skip_final_collection()
    try:
        raise SystemExit(main())
    except UserError as exc:
        report_child_error(str(exc))
        raise SystemExit(2) from None
