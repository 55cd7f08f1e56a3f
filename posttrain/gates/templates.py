"""Chat-template gates: `{% generation %}` markers where assistant-only loss is asked for, a template that renders
every row, the prompt ending where the reply's tokens begin, the end-of-turn token labelled in collated batches."""

import logging
import os

from ..errors import UserError, row_name
from ..models.vision import is_processor

logger = logging.getLogger("posttrain")


def check_template_markers(tokenizer, assistant_only_loss: bool) -> None:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if assistant_only_loss and (template is None or not has_generation_markers(template)):
        try:  # a known template (Qwen, Llama 3, Gemma, Phi, ...): TRL's SFTTrainer trains with its marked copy
            if template is not None and get_training_chat_template(tokenizer):
                return
        except (ValueError, TypeError):
            pass
        raise UserError(
            "pre-flight: assistant_only_loss is on, but the chat template has no {% generation %} markers, so no "
            f"assistant mask can be built. Set `base.chat_template` to {training_templates(tokenizer)}, or set "
            "assistant_only_loss: false."
        )


def training_templates(tokenizer) -> str:
    """The advice for a template without markers: only the built-ins whose turn tokens this vocabulary has (chatml
    on a Llama-3 vocabulary spells <|im_end|> in pieces, and no reply would end with an end-of-turn token), and
    TRL's marked copies of other families' templates (`*_training.jinja`), which take a path."""
    from pathlib import Path

    import trl

    from ..models.templates import END_OF_TURN

    vocab = tokenizer.get_vocab()
    builtins = sorted(name for name, token in END_OF_TURN.items() if token in vocab and name != "chatml_vl")
    folder = Path(trl.__file__).parent / "chat_templates"
    marked = f"a .jinja file with the markers (TRL's for other families, such as {folder / 'llama3_training.jinja'}, " \
             f"are in {folder})"
    return f"a built-in training template ({', '.join(builtins)}) or {marked}" if builtins else marked


def check_template_renders(tokenizer, dataset, name: str) -> None:
    """The chat template renders every kind of conversation (one row per sequence of roles): a model's own template
    may refuse some, e.g. Gemma-2's raises "System role not supported" on a system turn, which stopped the stage
    inside TRL's tokenization with a bare Jinja error. Names the row and what to do."""
    from jinja2 import TemplateError

    if "messages" not in dataset.column_names:
        return
    seen = set()
    for index, messages in enumerate(dataset["messages"]):
        roles = tuple(m.get("role") for m in messages)
        if roles in seen:
            continue
        seen.add(roles)
        try:
            tokenizer.apply_chat_template(messages, tokenize=False)
        except TemplateError as exc:
            advice = ("Set base.chat_template to one that renders such rows (a .jinja file; TRL's "
                      "gemma3_training.jinja takes a system turn for Gemma)")
            if "system" in roles:
                advice = ("Put the system text at the start of the first user turn (the template has no system role), "
                          "or s" + advice[1:])
            raise UserError(f"pre-flight: {name} {row_name(index)} (roles: {', '.join(roles)}): the chat template "
                            f"refuses it: {exc}. {advice}") from exc


def check_prompt_boundary(tokenizer, dataset, name: str, samples: int = 8) -> dict:
    """The prompt a reply is generated from must be tokenized the same way in training as when the model answers.

    Training tokenizes a whole conversation at once; generation tokenizes the prompt alone and the model writes the
    reply after it. With a byte-level BPE that splits on GPT-2's rule (SmolLM2's), a prompt whose text ends in a run
    of whitespace is one token when it ends the string ("</think>\\n\\n" -> "\\n\\n") but splits when a reply
    follows ("\\n", "\\n", "4"), so every reply would be learned after a context the model never sees at inference
    (the default run's non-thinking accuracy: 51.3% as generated, 56.6% with its prompts tokenized as in training).
    TRL warns about this for prompt/completion rows, not for conversations (nor for DPO's pairs, tokenized the same
    way). This checks the first rows of each thinking mode on the text the template renders, and warns: a template
    that came with the model may not be ours to change. Returns what it found for the pre-flight record.
    """
    reply_column = next((c for c in ("completion", "chosen") if c in dataset.column_names), None)
    if "messages" not in dataset.column_names and not ("prompt" in dataset.column_names and reply_column):
        return {}
    checked, mismatched, example, modes = 0, 0, None, {}
    rewritten, rewrite = 0, None
    for row in dataset.select(range(min(len(dataset), 200))):
        prompt_turns, reply = _prompt_and_reply(row, reply_column)
        kwargs = row.get("chat_template_kwargs") or {}
        mode = kwargs.get("enable_thinking")
        if (not isinstance(prompt_turns, list) or not prompt_turns or not isinstance(reply, list) or not reply
                or reply[-1].get("role") != "assistant" or modes.get(mode, 0) >= samples):
            continue  # plain-text rows have no template; TRL checks those itself
        modes[mode] = modes.get(mode, 0) + 1
        prompt = tokenizer.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True, **kwargs)
        full = tokenizer.apply_chat_template(prompt_turns + reply, tokenize=False, **kwargs)
        if not full.startswith(prompt):
            # the template writes a reply's context otherwise than the prompt it answers (ERNIE-4.5-VL's own drops its
            # non-thinking prompt's empty think block): the same skew, in the text itself
            rewritten += 1
            cut = len(os.path.commonprefix([prompt, full]))
            rewrite = rewrite or (prompt[cut:], full[cut:cut + 24], mode)
            continue
        checked += 1
        if is_processor(tokenizer):
            continue  # image rows: the vision collator tokenizes prompt and reply apart, as generation does
        if skew := _token_skew(tokenizer, prompt, full):
            mismatched += 1
            example = example or (*skew, mode)
    if mismatched:
        logger.warning(
            "pre-flight: %s: in %d of %d rows checked, the prompt ends in tokens %s when rendered for generation but "
            "as %s when the reply follows it in training (enable_thinking=%s): the model learns each reply after a "
            "context it will not see when it answers. End the chat template's generation prompt on a token boundary "
            "(e.g. one newline after an empty <think></think> block, as posttrain's chatml template does).",
            name, mismatched, checked, *example)
    found = {"prompt_boundary": f"{mismatched} of {checked} rows differ" if mismatched else f"ok ({checked} rows)"}
    if rewritten:
        logger.warning(
            "pre-flight: %s: in %d of %d rows the chat template renders the prompt for generation ending %r, but "
            "before the reply in training as %r (enable_thinking=%s): the model learns each reply after a context it "
            "will not see when it answers. Use a chat template that renders both the same way (base.chat_template).",
            name, rewritten, rewritten + checked, *rewrite)
        found["prompt_rewritten"] = f"{rewritten} of {rewritten + checked} rows"
    return found


def _prompt_and_reply(row: dict, reply_column: str | None) -> tuple:
    """A row's prompt turns and its reply: a conversation's last turn, or its `reply_column`."""
    if "messages" in row:
        return (row["messages"] or [])[:-1], (row["messages"] or [])[-1:]
    return row["prompt"], row[reply_column]


def _token_skew(tokenizer, prompt: str, full: str) -> tuple | None:
    """Where `prompt` tokenized alone ends otherwise than at the start of `full` (prompt + reply): the prompt's last
    tokens each way, or None where they agree."""
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint = tokenizer(full, add_special_tokens=False)["input_ids"]
    if joint[:len(alone)] == alone:
        return None
    cut = next((i for i, (a, b) in enumerate(zip(alone, joint)) if a != b), len(joint))
    return tokenizer.convert_ids_to_tokens(alone[cut:]), tokenizer.convert_ids_to_tokens(joint[cut:len(alone) + 1])


def end_of_turn_ids(tokenizer, chat_template: str | None = None) -> set[int]:
    """The tokens that end a reply: EOS (plain-text rows get it appended), and the special token the chat template
    closes an assistant turn with inside its `{% generation %}` markers, e.g. ERNIE's <|end_of_sentence|> where EOS is
    </s>. A template whose marked span ends on content adds nothing, so the gate still fails on it."""
    from trl.chat_template_utils import has_generation_markers

    ids = {tokenizer.eos_token_id} - {None}
    template = chat_template or tokenizer.chat_template
    if not isinstance(template, str) or not has_generation_markers(template):
        return ids
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}]
    try:
        out = tokenizer.apply_chat_template(probe, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                            chat_template=template)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: EOS only
        return ids
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    last = next((t for t in reversed(masked) if tokenizer.decode([t]).strip()), None)
    return ids | ({last} if last in set(tokenizer.get_added_vocab().values()) else set())


def check_collated_labels(trainer, eos_token_id: int | set[int], samples: int = 8) -> dict:
    """Collate the first rows exactly as training will; each must have labels, and its end-of-turn token labelled
    (`eos_token_id`: the id, or the ids any of which ends a turn: `end_of_turn_ids`). Packed in pieces (`wrapped`,
    `bfd_split`: a row's rest carried into other sequences), the set as a whole (`check_pieces_labelled`)."""
    import torch

    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    dataset = trainer.train_dataset
    rows = [dataset[i] for i in range(min(samples, len(dataset)))]
    batch = trainer.data_collator(rows)
    labels = batch["labels"]
    trained = labels != -100
    # packed in pieces, a sequence may hold a reply's start without its end, or no reply at all: TRL trains it as is
    pieces = trainer.args.packing and trainer.args.packing_strategy in ("wrapped", "bfd_split")
    if pieces:
        check_pieces_labelled(dataset, eos_ids)
    for index in range(0 if pieces else labels.shape[0]):
        if not trained[index].any():
            raise UserError(
                f"pre-flight: training {row_name(index)} has no trained tokens (empty assistant mask or everything "
                "truncated by max_length); check the chat template's {% generation %} markers and max_length."
            )
        if not torch.isin(labels[index], torch.tensor(sorted(eos_ids))).any():
            raise UserError(
                f"pre-flight: training {row_name(index)}: the end-of-turn token "
                f"({' or '.join(f'id {i}' for i in sorted(eos_ids))}) is never in the labels, "
                "so the model would never learn to stop. Common causes: pad token == EOS with padding masked by id, "
                "a template that puts the end-of-turn token outside {% generation %}, or max_length cutting it off."
            )
    return {
        "rows_checked": int(labels.shape[0]),
        "trained_token_fraction": float(trained.float().mean()),
        "eos_labelled": True,
        "max_tokens": int(torch.as_tensor(batch["input_ids"]).shape[1]),
    }


def check_pieces_labelled(dataset, eos_ids: set[int]) -> None:
    """Some sequence of a set packed in pieces has an end-of-turn token (`eos_ids`) in its labels. Each sequence
    checked on its own, the first ones, a piece of a long reply or document was refused as cut by `max_length`,
    although `bfd_split` (which the cut-reply warning advises) and `wrapped` carry its end into another sequence."""
    if not any(eos_ids.intersection(row["labels"]) for row in dataset.select_columns(["labels"])):
        raise UserError(f"pre-flight: the end-of-turn token ({' or '.join(f'id {i}' for i in sorted(eos_ids))}) is "
                        "in the labels of no training sequence, so the model would never learn to stop. Common causes: "
                        "pad token == EOS with padding masked by id, or a template that puts the end-of-turn token "
                        "outside {% generation %}.")
