"""Pre-flight gates: checks that stop a run before it trains on something silently broken.

Each failure here is one users of TRL-based tools discover after hours of training: an assistant mask that is empty
(the loss trains on nothing, or on the prompt), an end-of-turn token that never gets a label (the model never
stops), a chat template without `{% generation %}` markers while assistant-only loss was asked for, chosen == rejected
pairs. The checks use the trainer's own tokenized data and collator where they can, so they test what will train.
"""

from .errors import UserError


def check_template_markers(tokenizer, assistant_only_loss: bool) -> None:
    from trl.chat_template_utils import has_generation_markers

    template = tokenizer.chat_template
    if assistant_only_loss and (template is None or not has_generation_markers(template)):
        raise UserError(
            "pre-flight: assistant_only_loss is on, but the chat template has no {% generation %} markers, so no "
            "assistant mask can be built. Set `base.chat_template` to a training template (built-ins: chatml, "
            "ernie4_5) or a .jinja file with the markers, or set assistant_only_loss: false."
        )


def check_conversations(dataset, name: str) -> None:
    """Every conversational row has at least one assistant turn and no empty assistant turn; names the row."""
    if "messages" not in dataset.column_names:
        return
    for index, messages in enumerate(dataset["messages"]):
        replies = [m for m in messages if m.get("role") == "assistant"]
        if not replies:
            raise UserError(f"pre-flight: {name} row {index}: no assistant turn; expected at least one reply to train on")
        for turn, message in enumerate(replies, 1):
            if not (message.get("content") or "").strip() and not message.get("tool_calls"):
                raise UserError(
                    f"pre-flight: {name} row {index}: assistant turn {turn} is empty; expected a non-empty reply"
                )


def check_collated_labels(trainer, eos_token_id: int, samples: int = 8) -> dict:
    """Collate the first rows exactly as training will; each must have labels, and its end-of-turn token labelled."""
    import torch

    dataset = trainer.train_dataset
    rows = [dataset[i] for i in range(min(samples, len(dataset)))]
    batch = trainer.data_collator(rows)
    labels = batch["labels"]
    trained = labels != -100
    for index in range(labels.shape[0]):
        if not trained[index].any():
            raise UserError(
                f"pre-flight: training row {index} has no trained tokens (empty assistant mask or everything "
                "truncated by max_length); check the chat template's {% generation %} markers and max_length."
            )
        if not (labels[index] == eos_token_id).any():
            raise UserError(
                f"pre-flight: training row {index}: the end-of-turn token (id {eos_token_id}) is never in the labels, "
                "so the model would never learn to stop. Common causes: pad token == EOS with padding masked by id, "
                "a template that puts the end-of-turn token outside {% generation %}, or max_length cutting it off."
            )
    return {
        "rows_checked": int(labels.shape[0]),
        "trained_token_fraction": float(trained.float().mean()),
        "eos_labelled": True,
        "max_tokens": int(torch.as_tensor(batch["input_ids"]).shape[1]),
    }


def check_preference_pairs(dataset, name: str, tokenizer=None, max_length: int | None = None,
                           allow_skip: bool = False):
    """Bad pairs are an error naming the row, or a counted skip when allowed: an empty side, chosen == rejected, or a
    prompt so long that truncation to `max_length` would leave no reply token to learn from."""
    from .data import completion_text, render_prompt

    bad = []
    for index, row in enumerate(dataset):
        chosen, rejected = completion_text(row["chosen"]).strip(), completion_text(row["rejected"]).strip()
        reason = None
        if not chosen or not rejected:
            reason = f"\"{'chosen' if not chosen else 'rejected'}\" is empty; expected a non-empty reply"
        elif chosen == rejected:
            reason = "chosen == rejected; expected two different replies"
        elif tokenizer is not None and max_length:
            prompt = row["prompt"]
            text = render_prompt(tokenizer, prompt, row.get("thinking")) if isinstance(prompt, list) else prompt
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if length >= max_length:
                reason = (f"the prompt is {length} tokens, so max_length={max_length} would cut every reply token; "
                          "raise max_length or shorten the prompt")
        if reason:
            if not allow_skip:
                raise UserError(f"pre-flight: {name} row {index}: {reason} (set skip_bad_rows: true to skip such rows)")
            bad.append(index)
    if bad:
        dataset = dataset.select(sorted(set(range(len(dataset))) - set(bad)))
    return dataset, len(bad)
