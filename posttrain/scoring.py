"""Teacher-forced scoring: the log-probabilities of replies after their prompts, batched by length, for the held-out
loss of reference replies and the preference accuracy of held-out pairs (each pair cut to `max_length` as TRL cuts it)."""

from .data import completion_text, conversation_replies, has_tool_turns, opens_think, preference_texts, prompt_text
from .generation import autocast, length_batches, row_images
from .models import vision
from .models.lm_head import chunks
from .stats import mean_of

# Rows scored in one forward at most: each keeps its logits over the whole vocabulary for every completion position
# (16 rows of 2,048 tokens with a 152k vocabulary: 9 GiB in bf16), so fewer when the evaluation's batch_size is lower
SCORE_BATCH = 16


def completion_logps(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = SCORE_BATCH,
                     images: list | None = None, max_length: int | list | None = None,
                     truncation_mode: str = "keep_start"):
    """Summed log-prob and token count of each completion given its rendered prompt (teacher forcing); with `images`
    (one list per prompt), `tokenizer` is a VLM's processor. Text rows are cut to `max_length` (one for all, or one
    per row) as TRL cuts them."""
    out = [None] * len(prompts)
    limits = max_length if isinstance(max_length, list) else [max_length] * len(prompts)
    for window in length_batches([len(p) + len(c) for p, c in zip(prompts, completions)], batch_size,
                                 longest_first=True):
        texts, replies = [prompts[i] for i in window], [completions[i] for i in window]
        if images is None:
            batch = _text_layout(tokenizer, texts, replies, model.device, [limits[i] for i in window],
                                 truncation_mode)
        else:
            batch = vision.completion_layout(tokenizer, texts, [images[i] for i in window], replies, model.device)
        for i, score in zip(window, _score_completions(model, batch)):
            out[i] = score
    return out


def _text_layout(tokenizer, prompts: list[str], completions: list[str], device,
                 limits: list[int | None] | None = None, truncation_mode: str = "keep_start") -> dict:
    """Prompt + completion token ids, right-padded, with the completion's positions marked in `completion_mask`;
    each row tokenized whole and cut to its `limits` entry (its max_length, when not None) as TRL's DPO tokenizes and
    collates it."""
    import torch
    from trl.data_utils import common_prefix_length

    ids, replies = [], []
    for prompt, completion in zip(prompts, completions):
        # tokenized whole, as TRL tokenizes a pair: a token across the boundary (a text prompt's trailing space and
        # the reply's first word: " 5") is the reply's, which starts where the prompt's own tokens part from these
        alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        cut = common_prefix_length(alone, whole)
        ids.append(whole[:cut])
        replies.append(whole[cut:])
    limits = limits or [None] * len(ids)
    ids, replies = zip(*(_cut(p, c, limit, truncation_mode) if limit is not None else (p, c)
                         for p, c, limit in zip(ids, replies, limits)))
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
    given = row_images(rows)
    prompts, replies, images = [], [], []
    for row, its_images in zip(rows, given or [None] * len(rows)):
        for prompt, reply in _reference_turns(tokenizer, row, eos):
            prompts.append(prompt)
            replies.append(reply)
            images.append(its_images)
    scores = completion_logps(model, tokenizer, prompts, replies, batch_size=min(batch_size, SCORE_BATCH),
                              images=images if given else None)
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
    # (side, pair, prompt, reply, max_length); a reply with tool results by its own turns only, as DPO scores it
    pieces = []
    for side, name in ((1, "chosen"), (2, "rejected")):
        for i, (pair, text) in enumerate(zip(pairs, texts)):
            if not has_tool_turns(pair):
                pieces.append((side, i, prompts[i], text[side], max_length))
                continue
            turns = _reference_turns(tokenizer, {**pair, "completion": pair[name]}, text_tokenizer.eos_token)
            limits = _turn_limits(text_tokenizer, turns, text[0] + text[side], max_length, truncation_mode)
            pieces += [(side, i, *turn, limit) for turn, limit in zip(turns, limits) if limit is None or limit > 0]
    images = row_images(pairs)
    with autocast(model, dtype):
        scores = completion_logps(model, tokenizer, [p[2] for p in pieces], [p[3] for p in pieces],
                                  batch_size=min(batch_size, SCORE_BATCH),
                                  images=[images[p[1]] for p in pieces] if images else None,
                                  max_length=[p[4] for p in pieces], truncation_mode=truncation_mode)
    chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
    for (side, i, *_), (score, _) in zip(pieces, scores):
        (chosen if side == 1 else rejected)[i] += score
    if was_training:
        model.train()
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"n": len(pairs), "accuracy": mean_of([m > 0 for m in margins]), "mean_logp_margin": mean_of(margins)}


def _turn_limits(tokenizer, turns: list[tuple[str, str]], whole: str, max_length: int | None,
                 truncation_mode: str) -> list:
    """Each of a reply's turns' `max_length` when scored after all before it: TRL cuts the whole prompt + reply once.
    `keep_start` keeps its first `max_length` tokens, as cutting each turn with its context to `max_length` does;
    `keep_end` keeps its last ones, so a turn keeps what lies in that window: `max_length` less the tokens after it
    (cut to `max_length` on its own, an early turn kept the prompt's start, which TRL cuts; 0 or less: none of it)."""
    if max_length is None or truncation_mode != "keep_end":
        return [max_length] * len(turns)
    total = len(tokenizer(whole, add_special_tokens=False)["input_ids"])
    return [max_length - total + len(tokenizer(prompt + reply, add_special_tokens=False)["input_ids"])
            for prompt, reply in turns]


def added_bos(tokenizer) -> str:
    """The BOS text the tokenizer puts before any text it encodes with its special tokens, or ""."""
    bos = tokenizer.bos_token_id
    return tokenizer.bos_token if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else ""
