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

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path

from . import devices
from .configs import EvalArguments
from .data import (
    data_folder,
    prompt_text,
)
from .errors import UserError, is_out_of_memory, row_name, what_ran_out
from .gates import check_image_slots, check_special_token_text, prompt_end
from .generation import Share, autocast, generate, row_images
from .io import write_json
from .models import vision
from .scoring import heldout_loss
from .stats import mean_of, wilson

logger = logging.getLogger(__name__)


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
                                           images=row_images(rows), share=share, key="eval.max_new_tokens")
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
    if was_training:
        model.train()
    return {
        "n": len(rows),
        "accuracy": mean_of(correct),
        "accuracy_ci95": list(wilson(sum(map(bool, correct)), len(rows))),
        # every prompt's verdict, in row order, with a fingerprint of the prompts: two stages' verdicts pair up (for
        # McNemar's test) only when they answered the same prompts in the same order
        "verdicts": [int(bool(c)) for c in correct],
        "prompts_sha": prompts_sha(prompts, columns["answer"]),
        "format": mean_of(formatted),
        "proxy_reward": mean_of(proxy),
        "stop_rate": mean_of(stopped),
        "mean_completion_tokens": mean_of(lengths),
        "heldout_loss": None if loss is None or math.isnan(loss) else loss,
        "by_group": by_group(rows, correct),
        "seconds": seconds,
        "processes": share.count if share else 1,
        "dtype": dtype,
        "samples": [
            {"prompt": shown_prompt(r["prompt"]), "thinking": r.get("thinking"), "answer": r["answer"],
             "completion": t, "correct": bool(c)}
            for r, t, c in list(zip(rows, texts, correct))[:samples]
        ],
    }


def by_group(rows: list[dict], correct: list) -> dict:
    """Accuracy per domain (`domain/<name>`) and per thinking mode (`mode/thinking`, `mode/non_thinking`,
    `mode/default` for rows that set none)."""
    groups = defaultdict(list)
    for row, ok in zip(rows, correct):
        groups[f"domain/{row.get('domain')}"].append(ok)
        mode = {True: "thinking", False: "non_thinking"}.get(row.get("thinking"), "default")
        groups[f"mode/{mode}"].append(ok)
    return {k: mean_of(v) for k, v in sorted(groups.items())}


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


def prompts_sha(prompts: list[str], answers: list) -> str:
    """Short hash of the rendered prompts and their expected answers, in order."""
    return hashlib.sha256(json.dumps([prompts, answers], default=str).encode()).hexdigest()[:16]


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
    from datasets import Dataset, Features, Json, List

    # a prompt that writes "<|im_end|>" as text is rendered with turns nobody wrote, and scored on them. `Json`: the
    # contents of image prompts (parts) and text prompts (strings) in one set are of no one Arrow type
    prompts = Dataset.from_dict({"prompt": [row["prompt"] for row in rows]}, Features({"prompt": List(Json())}))
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
    loaded_tokenizer = load_tokenizer(tokenizer or model_dir, trust_remote_code=trust_remote_code)
    model = load_for_inference(model_dir, adapter=adapter, precision=settings.dtype,
                               trust_remote_code=trust_remote_code)
    metrics = run(settings, model, loaded_tokenizer, rows, share)
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
