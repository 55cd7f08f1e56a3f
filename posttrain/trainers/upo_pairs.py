"""The pure parts of UPO, kept out of the trainer so they can be read and tested alone: mining preference pairs from
grouped rewards, the DPO loss, rendering prompts per row's thinking mode, and the offline preference pairs."""

import collections
import logging
import math
import random
import re

import torch
import torch.nn.functional as F
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from ..data import completion_text, render_prompt
from ..errors import UserError
from ..gates.prompts import names_tools
from ..reward_groups import TIE

logger = logging.getLogger(__name__)
# set by the UPO stage's pre-flight on the pairs it keeps: each row's line in the file (`load_offline_pairs`)
LINE_COLUMN = "__line__"
# With thinking off, the prompt already ends with this block; a stored reply repeating it would render it twice.
_LEADING_EMPTY_THINK = re.compile(r"\A\s*<think>\s*</think>\s*")


# ----------------------------------------------------------------------------------------------------------------------
# Online pairs
# ----------------------------------------------------------------------------------------------------------------------
def default_margin(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Half the range (max − min) of the scorable rewards: `upo_margin=None`, i.e. "0.5 × reward range"."""
    keep = ~torch.isnan(rewards) if valid is None else valid.bool() & ~torch.isnan(rewards)
    scored = rewards[keep]
    return 0.5 * (scored.max() - scored.min()).item() if scored.numel() else 0.0


def uniform_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """One flag per group of `num_generations` consecutive rollouts: True where every scorable rollout got the same
    combined reward (all right or all wrong, say), or none could be scored. Such a group has no advantage to learn from
    and gives no pair."""
    grouped = rewards.view(-1, num_generations)
    unscored = torch.isnan(grouped)
    high = grouped.masked_fill(unscored, -math.inf).amax(dim=1)
    low = grouped.masked_fill(unscored, math.inf).amin(dim=1)
    return ~(high - low > TIE)  # all unscorable: -inf - inf is not > TIE


def mine_pairs(
    rewards: torch.Tensor,
    num_generations: int,
    margin: float,
    pairs_per_prompt: int = 1,
    valid: torch.Tensor | None = None,
) -> list[tuple[int, int, float]]:
    """Preference pairs within each group of `num_generations` consecutive rollouts (one prompt's group).

    Rollouts are ranked by reward (ties: the earlier rollout ranks higher, so mining is deterministic and draws no
    random numbers). The k-th pair is the k-th best vs the k-th worst, for k < `pairs_per_prompt` and while the two are
    distinct; a pair is kept only if its reward gap is > `TIE` and >= `margin`, and mining of a group stops at the first
    pair that fails (later gaps are smaller). So a group whose rewards are all equal gives no pair.

    Args:
        rewards (`torch.Tensor` of shape `(rows,)`): the combined reward of each rollout; NaN means unscorable.
        num_generations (`int`): group size; `rows` is a multiple of it.
        margin (`float`): minimum reward gap.
        pairs_per_prompt (`int`, *optional*, defaults to `1`): at most this many pairs per group.
        valid (`torch.Tensor` of shape `(rows,)`, *optional*): rollouts that may be paired (e.g. not masked out).

    Returns:
        `list[tuple[int, int, float]]`: `(chosen row, rejected row, reward gap)` per pair, in row order of the groups.
    """
    values = rewards.tolist()
    usable = [not math.isnan(v) for v in values] if valid is None else [
        bool(ok) and not math.isnan(v) for ok, v in zip(valid.tolist(), values, strict=True)
    ]
    pairs = []
    for start in range(0, len(values), num_generations):
        ranked = sorted((i for i in range(start, start + num_generations) if usable[i]), key=lambda i: (-values[i], i))
        for k in range(min(pairs_per_prompt, len(ranked) // 2)):
            chosen, rejected = ranked[k], ranked[-1 - k]
            gap = values[chosen] - values[rejected]
            if gap <= TIE or gap < margin:
                break
            pairs.append((chosen, rejected, gap))
    return pairs


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss `-log σ(β·[(π+ − ref+) − (π− − ref−)])` on summed sequence log-probs.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the per-pair losses and the logits `β·[...]` (the implicit reward margins).
    """
    logits = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(logits), logits


def _as_tensor(ids) -> torch.Tensor:
    return ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, dtype=torch.long)


def pad_sequences(sequences: list, pad_token_id: int, side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists (or 1-D tensors) to one padded `(ids, mask)` pair; padding on `side` ("left" or "right")."""
    sequences = [_as_tensor(s) for s in sequences]
    ids = pad(sequences, padding_value=pad_token_id, padding_side=side)
    mask = pad([torch.ones_like(s) for s in sequences], padding_value=0, padding_side=side)
    return ids.to(device), mask.to(device)


def pack(prompts: list, completions: list, pad_token_id: int, device) -> tuple[torch.Tensor, ...]:
    """GRPO's layout: `(prompt_ids, prompt_mask, completion_ids, completion_mask)`, prompts left-padded and
    completions right-padded, so `cat([prompt, completion])` puts every completion at the same positions."""
    prompt_ids, prompt_mask = pad_sequences(prompts, pad_token_id, "left", device)
    completion_ids, completion_mask = pad_sequences(completions, pad_token_id, "right", device)
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def select_images(batch: dict, rows: list[int]) -> dict:
    """The image inputs of `rows` (indices, in that order, repeats allowed) of a GRPO batch, to score those rows'
    prompts again in another layout: `pixel_values` (and `image_grid_thw`, `image_sizes`) of their images and their
    `num_images`, plus `typed`: the per-token image-marker keys (`mm_token_type_ids`, `token_type_ids`) the model
    needs, which the caller rebuilds for its own token layout. Empty for a text batch."""
    from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid

    if batch.get("pixel_values") is None or "num_images" not in batch:
        return {}
    keys = [k for k in ("pixel_values", "image_grid_thw", "image_sizes", "num_images") if k in batch]
    split = split_pixel_values_by_grid({k: batch[k] for k in keys})
    if not isinstance(split["pixel_values"], list):
        raise UserError("UPO's DPO term with images supports models whose image inputs split per image (LLaVA, "
                        "Qwen-VL); this model keeps them padded per sample")
    picked = {k: [split[k][i] for i in rows] for k in keys}
    picked = unsplit_pixel_values_by_grid(picked) if rows else {"num_images": []}
    picked["typed"] = [k for k in TYPED_KEYS if k in batch]
    return picked


# ----------------------------------------------------------------------------------------------------------------------
# Prompts in each row's thinking mode
# ----------------------------------------------------------------------------------------------------------------------
def render_prompt_text(tokenizer, prompt, thinking: bool | None, template_kwargs: dict | None = None) -> str:
    """A conversational prompt as the text GRPO will tokenize, in the row's thinking mode; a text prompt unchanged.

    `template_kwargs` are GRPO's `chat_template_kwargs`: GRPO would have rendered the prompt with them, so they are
    kept (a row's own thinking mode overrides their `enable_thinking`). GRPO tokenizes text prompts with the
    tokenizer's special tokens; a template that writes the BOS token itself would then get it twice, so it is removed
    from the text when the tokenizer adds it.
    """
    if isinstance(prompt, str):
        return prompt
    text = render_prompt(tokenizer, prompt, thinking, template_kwargs)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer(text="x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def render_prompts(dataset, tokenizer, template_kwargs: dict | None = None):
    """Render a dataset's conversational `prompt`s to text in each row's `thinking` mode (other columns kept).

    GRPOTrainer applies one global `chat_template_kwargs` to every prompt, so it cannot honour a per-row thinking
    switch; rendering first makes each prompt carry its own mode (thinking off prefills the empty think block), and the
    completions GRPO decodes are then plain strings. Datasets without a `thinking` column, or with text prompts, are
    returned unchanged.
    """
    if dataset is None or "thinking" not in (dataset.column_names or []):
        return dataset
    if not is_conversational(next(iter(dataset))):
        return dataset
    return dataset.map(lambda row: {"prompt": render_prompt_text(tokenizer, row["prompt"], row["thinking"],
                                                                 template_kwargs)})


# ----------------------------------------------------------------------------------------------------------------------
# Offline pairs
# ----------------------------------------------------------------------------------------------------------------------
def _reply_ids(tokenizer, reply: str, thinking: bool | None) -> list[int]:
    if thinking is not None and not thinking:
        reply = _LEADING_EMPTY_THINK.sub("", reply, count=1)
    ids = tokenizer(text=reply, add_special_tokens=False)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:  # a rollout ends with EOS; so must a stored reply
        ids = ids + [tokenizer.eos_token_id]
    return ids


def _check_one_reply(reply, where: str) -> None:
    """An offline reply is one assistant message of text, as a rollout is: of several turns, or of tool calls, the DPO
    term would keep only the last message's text (a pair told apart by its calls would compare what follows them)."""
    if not isinstance(reply, list) or (len(reply) == 1 and not reply[0].get("tool_calls")):
        return
    found = "a tool call" if len(reply) == 1 else f"{len(reply)} turns"
    raise UserError(f"{where} is {found}; an offline UPO pair is scored as one text reply, as a rollout is, and would "
                    "be cut to the text of its last message, without tool calls. Give each reply as one assistant "
                    "message of text, or train such pairs in the DPO stage, which takes whole exchanges")


def load_offline_pairs(path: str, tokenizer, max_completion_length: int | None,
                       processor=None, dataset=None, thinking: bool | None = None,
                       template_kwargs: dict | None = None, drop_truncated: bool = False) -> list[tuple[list[int], ...]]:
    """Tokenize a preference dataset once: `(prompt_ids, chosen_ids, rejected_ids)` per row, plus the prompt's image
    inputs (`_image_prompt`) as a fourth element for rows with `images` (which need the VLM's `processor`).

    Rows have `prompt`, `chosen`, `rejected`, conversational or text, and optionally `thinking`. Prompts are rendered
    exactly as the RL prompts are (`render_prompt_text`), in the row's thinking mode, else in `thinking` (what
    GRPO's `chat_template_kwargs` give the RL prompts without one); replies get the tokenizer's EOS appended (the chat
    template ends an assistant turn with it) and are truncated to `max_completion_length` like rollouts. `dataset`,
    when given, is the already loaded (e.g. pre-flight filtered) content of `path`. A pair whose replies are the same
    once truncated is left out with a warning (its DPO term would stay at log 2 with no gradient and dilute the
    others'), and so, with `drop_truncated` (GRPO's `mask_truncated_completions`), is a pair with a truncated reply,
    as truncated rollouts are; none left is an error.
    """
    template_kwargs = dict(template_kwargs or {})
    default = template_kwargs.pop("enable_thinking", None) if thinking is None else thinking
    from ..data import load_split

    dataset = load_split(path, "train") if dataset is None else dataset
    images = "images" in dataset.column_names
    if images and processor is None:
        raise UserError(f"{path}: offline pairs with images need a vision-language model (and its processor)")
    if images:
        from ..data import data_folder
        from ..models.vision import decode_images

        kept = [line - 1 for line in dataset[LINE_COLUMN]] if LINE_COLUMN in dataset.column_names else None
        dataset = decode_images(dataset, data_folder(path), path, rows=kept)  # named by their rows in the file
    _check_offline_columns(dataset, path)
    pairs, left_out = [], collections.defaultdict(list)
    for line, row in enumerate(dataset, start=1):
        line = row.get(LINE_COLUMN, line)  # its line in the file, when rows before it were skipped
        thinking = row["thinking"] if "thinking" in dataset.column_names else None
        thinking = default if thinking is None else thinking
        if images:
            prompt_ids, image_inputs = _image_prompt(processor, row["prompt"], thinking, row["images"],
                                                     template_kwargs, f"{path}:{line}")
        else:
            prompt_ids = tokenizer(text=render_prompt_text(tokenizer, row["prompt"], thinking,
                                                           template_kwargs))["input_ids"]
        replies = [_side_ids(tokenizer, row[column], thinking, f'{path}:{line}: "{column}"')
                   for column in ("chosen", "rejected")]
        if max_completion_length and any(len(ids) > max_completion_length for ids in replies):
            if drop_truncated:
                left_out["longer than max_completion_length (mask_truncated_completions)"].append(line)
                continue
            replies = [ids[:max_completion_length] for ids in replies]
        if replies[0] == replies[1]:
            left_out[f"the same in their first {max_completion_length} tokens (max_completion_length)"].append(line)
            continue
        pairs.append((prompt_ids, *replies, image_inputs) if images else (prompt_ids, *replies))
    for reason, lines in left_out.items():
        logger.warning(f"{path}: {len(lines)} offline pair(s) left out, replies {reason}: line(s) "
                       f"{', '.join(map(str, lines[:5]))}{', …' if len(lines) > 5 else ''}")
    if not pairs:
        raise UserError(f"{path}: no offline pair is left once replies are cut to max_completion_length="
                        f"{max_completion_length}; raise it")
    return pairs


def _check_offline_columns(dataset, path: str) -> None:
    """Offline pairs have the three columns, some rows, and no `tools` column."""
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise UserError(f"{path}: offline UPO pairs need the columns prompt, chosen, rejected; missing: "
                        f"{', '.join(missing)} (has: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise UserError(f"{path}: the offline preference dataset is empty")
    # the pre-flight names the row (check_no_row_tools); empty cells and empty JSON text ("[]") hold no tools
    if "tools" in dataset.column_names and any(map(names_tools, dataset["tools"])):
        raise UserError(f"{path}: offline UPO pairs have a `tools` column; their prompts are rendered as the RL "
                        "prompts are, without one, so the model would be shown no tools: put the schemas in each "
                        "prompt's system turn, and drop the column")


def _side_ids(tokenizer, side, thinking: bool | None, where: str) -> list[int]:
    """One reply of a pair (`where`: its file, line and column, for errors) as token ids, ending in EOS."""
    _check_one_reply(side, where)
    reply = completion_text(side)
    if not reply.strip():
        raise UserError(f"{where} is empty; expected a non-empty assistant reply")
    return _reply_ids(tokenizer, reply, thinking)


IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")  # per image; `num_images` says which row has which
# what GRPO slices by image or tile for a chunk of rows: empty for a chunk of text rows
PER_IMAGE_INPUTS = (*IMAGE_KEYS, "pixel_attention_mask", "spatial_shapes", "image_position_ids")
TYPED_KEYS = ("mm_token_type_ids", "token_type_ids")  # per token: rebuilt for each layout of the tokens


def _image_prompt(processor, prompt: list, thinking: bool | None, images: list,
                  template_kwargs: dict | None = None, where: str = "an offline pair") -> tuple[list[int], dict]:
    """An image prompt's token ids (each image expanded to its tokens) and its image inputs, as GRPO makes them:
    rendered with the chat template, then processed with the images, no special tokens added. A text prompt among
    image prompts (no images) is processed the same way without any: `num_images` 0. `where` names the pair in
    errors."""
    from ..models.vision import with_image_parts

    parts = [part for m in prompt if isinstance(m.get("content"), list) for part in m["content"]]
    # a placeholder without its image: the processor's bare "need at least one array to concatenate"
    if not images and any(isinstance(part, dict) and part.get("type") == "image" for part in parts):
        raise UserError(f"{where}: a pair without images whose prompt has image placeholders; expected its "
                        "image(s) (each pair is scored with its own images), or leave the pair out")
    prompt = with_image_parts(prompt, len(images))  # text-only contents: the images go first, as GRPO puts them
    text = render_prompt(processor, prompt, thinking, template_kwargs)
    inputs = processor(text=[text], images=[list(images)] if images else None, return_tensors="pt",
                       add_special_tokens=False)
    image_inputs = {key: inputs[key] for key in IMAGE_KEYS if key in inputs}
    image_inputs.update(num_images=[len(images)], typed=[key for key in TYPED_KEYS if key in inputs])
    return inputs["input_ids"][0].tolist(), image_inputs


def merge_images(parts: list[dict | None]) -> dict:
    """Image inputs of consecutive groups of rows (`select_images`, `_image_prompt` outputs) as one: per-image tensors
    concatenated, `num_images` appended in row order. Empty groups (no rows) may be given as `{}` or None."""
    import torch

    parts = [part for part in parts if part]
    if not parts:
        return {}
    merged = {"num_images": [n for part in parts for n in part["num_images"]],
              "typed": sorted({key for part in parts for key in part.get("typed", [])})}
    for key in IMAGE_KEYS:
        tensors = [part[key] for part in parts if key in part]
        if tensors:
            merged[key] = torch.cat(tensors)
    return merged


class OfflinePairs:
    """Pre-tokenized offline pairs, handed out in a shuffled order that is reshuffled at every pass over the data.

    All processes walk one shared order: a draw of `count` pairs (all processes together) takes the next `count` pairs
    and process `rank` keeps its slice (as even as `count` allows; a process may get none), so no two processes train
    on the same pair in a step (a pass's tail too short for a whole step is left for the next, reshuffled pass, unless
    a step needs more pairs than there are). The position in the order (`state_dict`) is saved with every checkpoint,
    so a resumed run draws exactly the pairs an uninterrupted one would.

    Args:
        pairs (`list[tuple[list[int], list[int], list[int]]]`): `(prompt_ids, chosen_ids, rejected_ids)` per pair.
        seed (`str`): seeds the order (the same on every process).
        rank (`int`, *optional*, defaults to `0`): this process's index.
        processes (`int`, *optional*, defaults to `1`): how many processes draw.
    """

    def __init__(self, pairs: list[tuple[list[int], ...]], seed: str, rank: int = 0, processes: int = 1):
        self.pairs, self.seed, self.rank, self.processes = pairs, seed, rank, processes
        self.epoch, self.cursor = 0, 0
        self.order = self._shuffled()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)  # own generator: never moves torch's or python's RNG
        return order

    def start_step(self, count: int) -> None:
        """Before a step that draws `count` pairs in several `take`s (its micro-steps): leaves a pass's tail too short
        for all of them to the next pass, as `take` does for one draw, so the step's draws are one draw's pairs."""
        if self.cursor + count > len(self.order) and count <= len(self.order):
            self.cursor = len(self.order)  # like drop_last: a step's pairs come from one pass, so none appears twice

    def take(self, count: int, in_step: bool = False) -> list[tuple[list[int], ...]]:
        """The next `count` pairs (this process's slice). `in_step`: one of several draws of a step that
        `start_step` began with the step's whole count; skipping the tail for this draw's smaller count would leave
        pairs of the pass out when the step needs more than a pass holds."""
        if not in_step:
            self.start_step(count)
        taken = []
        while len(taken) < count:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._shuffled()
            taken.append(self.pairs[self.order[self.cursor]])
            self.cursor += 1
        share, extra = divmod(count, self.processes)  # the first `extra` processes take one more
        start = self.rank * share + min(self.rank, extra)
        return taken[start:start + share + (self.rank < extra)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "pairs": len(self.pairs), "processes": self.processes}

    def load_state_dict(self, state: dict, where: str) -> None:
        if (state["pairs"], state["processes"]) != (len(self.pairs), self.processes):
            raise UserError(f"{where}: saved with {state['pairs']} offline pairs on {state['processes']} process(es), "
                            f"resumed with {len(self.pairs)} on {self.processes}; resume with the same data and "
                            "process count, or remove the checkpoint to start the stage over")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._shuffled()
