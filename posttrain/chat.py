"""`posttrain chat`: talk to a run's stage in the terminal, to see what the stage did to the model.

    posttrain chat outputs/<run> [--stage sft] [--thinking on|off] [--system TEXT] [--max-new-tokens 256]

The base model plus the stage's adapter (or the bare base model for `--stage base`), the recipe's chat template,
multi-turn history (after an optional system message, which `/reset` keeps), replies streamed as they are
generated, greedy like the held-out evaluation (what you read is what the stage's metrics scored). `/reset` forgets
the history, `/exit` (or end of input,
Ctrl-D) leaves. The loop is `chat_loop(model, tokenizer, lines, out)`: any iterable of lines in, replies out, so it
runs the same from a keyboard, a pipe or a test.
"""

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from .errors import UserError

USER_PROMPT = "you> "
REPLY_PREFIX = "assistant> "
COMMANDS = {"/reset": "forget the conversation so far", "/exit": "leave; Ctrl-D does too"}


def make_streamer(tokenizer, out: TextIO):
    """A transformers TextStreamer that writes the reply (not the prompt) to `out` as it is generated."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text)
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def reply(model, tokenizer, messages: list[dict], out: TextIO, thinking: bool | None = None,
          max_new_tokens: int = 256) -> str:
    """Generate (greedy) the assistant's next turn for `messages`, streaming it to `out`; returns its text."""
    import torch

    from .data import render_prompt
    from .generation import stop_ids
    from .models import vision

    prompt = render_prompt(tokenizer, messages, thinking)
    text = vision.text_tokenizer(tokenizer)  # a vision-language model's processor: chat in text, with its tokenizer
    inputs = text(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stop_ids(model, text), pad_token_id=text.pad_token_id,
                                streamer=make_streamer(text, out))
    return text.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def chat_loop(model, tokenizer, lines: Iterable[str], out: TextIO, thinking: bool | None = None,
              max_new_tokens: int = 256, system: str | None = None) -> list[str]:
    """Answer each line of `lines` in one conversation; returns the replies in order.

    Lines are stripped; empty lines are ignored; `/reset` clears the history (the `system` message, if any, stays),
    `/exit` stops (as does the end of `lines`). Each reply is written to `out` as `assistant> <text>` followed by a
    newline.
    """
    opening = [{"role": "system", "content": system}] if system else []
    messages: list[dict] = list(opening)
    replies: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages[:] = opening
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line}; commands: " + ", ".join(f"{c} ({h})" for c, h in COMMANDS.items())
                      + "\n")
            continue
        messages.append({"role": "user", "content": line})
        out.write(REPLY_PREFIX)
        text = reply(model, tokenizer, messages, out, thinking, max_new_tokens)
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": text})
        replies.append(text)
    return replies


def check_system_renders(tokenizer, system: str) -> None:
    """--system before the first line is read: a template without a system role (Gemma's own) raises at the first
    reply, which ended the chat with a Jinja traceback."""
    from jinja2 import TemplateError

    from .data import render_prompt

    try:
        render_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": "hi"}], None)
    except TemplateError as exc:
        raise UserError(f"--system: the stage's chat template refuses a system message ({exc}); write it at the start "
                        "of your first message instead") from exc


def terminal_lines(stdin: TextIO) -> Iterator[str]:
    """Lines typed at a prompt when stdin is a terminal, else the lines of the pipe; both end at EOF."""
    if stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                yield input(USER_PROMPT)
            except EOFError:
                print()
                return
    else:
        yield from stdin


def load_stage(run: str, stage: str | None, dtype: str | None = None):
    """The stage's model (base + adapter) on the best device, its tokenizer, and the StageRef."""
    from .runs import stage_ref

    ref = stage_ref(run, stage)
    ref.check_base_model()
    model, tokenizer = load_for_chat(ref.base_model, ref.adapter, ref.tokenizer, ref.trust_remote_code, dtype)
    return model, tokenizer, ref


def load_folder(model_path: str, adapter: str | None = None, dtype: str | None = None):
    """A model folder or Hub id (a merged export, any causal LM), or `tiny:<arch>` (what an adapter export of a tiny
    run names as its base), found as `posttrain eval --model` finds it, with an adapter folder on it if given, and the
    tokenizer the adapter folder carries (posttrain's stages and adapter exports save theirs, chat template included),
    else the model's."""
    from .models import adapter_tokenizer, resolve_model

    folder = resolve_model(str(model_path))
    return load_for_chat(folder, adapter, adapter_tokenizer(adapter) or folder, False, dtype)


def load_for_chat(model_path, adapter, tokenizer_path, trust_remote_code: bool, dtype: str | None):
    """The model (+ adapter) in eval mode on the best device (bf16 on a GPU that has it) and its tokenizer, which
    must have a chat template."""
    import torch

    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)  # first: its errors are quick
    if not tokenizer.chat_template:
        raise UserError(f"{tokenizer_path}: the tokenizer has no chat template, so there is no way to format a chat")
    cuda = torch.cuda.is_available()
    dtype = dtype or ("bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32")
    model = load_model(model_path, adapter=adapter, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to("cuda" if cuda else "cpu").eval()
    config = model.config.get_text_config()
    if getattr(config, "output_router_logits", False):  # MoE aux loss inside generate() fails (see evaluate.py)
        config.output_router_logits = False
    return model, tokenizer


def run_chat(run: str | None, stage: str | None = None, thinking: str | None = None, max_new_tokens: int = 256,
             stdin: TextIO = sys.stdin, out: TextIO = sys.stdout, info: TextIO = sys.stderr,
             system: str | None = None, model_path: str | None = None, adapter: str | None = None) -> list[str]:
    """`posttrain chat`: load a run's stage, or `model_path` (+ `adapter`: an export, any model folder), print a
    one-line banner to `info`, then chat over `stdin`."""
    if thinking not in (None, "on", "off"):
        raise UserError(f"--thinking {thinking}: expected on or off")
    if (run is None) == (model_path is None):
        raise UserError("give a run folder (posttrain chat outputs/<run>) or --model (an exported or other model "
                        "folder, or a Hub id), not both")
    if adapter and not model_path:
        raise UserError("--adapter goes with --model: a run's stage brings its own adapter (--stage picks it)")
    mode = None if thinking is None else thinking == "on"
    if model_path:
        model, tokenizer = load_folder(model_path, adapter)
        title, as_trained = f"{model_path}{f' + {adapter}' if adapter else ''}", ""
    else:
        from .export import public_base_name

        model, tokenizer, ref = load_stage(run, stage)
        what = (f"{public_base_name(ref.run, ref.stage)} + {ref.stage} adapter" if ref.adapter
                else f"{ref.base_model} (no adapter)")
        # without --thinking, the mode the stage trained its prompts in (UPO's `chat_template_kwargs`), if it set one
        trained = (ref.resolved.get("chat_template_kwargs") or {}).get("enable_thinking")
        mode = trained if thinking is None else mode
        as_trained = f" (thinking {'on' if mode else 'off'}, as it trained)" if thinking is None and mode is not None \
            else ""
        title = f"{ref.run.name}/{ref.stage}: {what}"
    info.write(f"chatting with {title}{as_trained}\n"
               f"commands: {', '.join(COMMANDS)}; end of input (Ctrl-D) also exits\n")
    info.flush()
    if system:
        check_system_renders(tokenizer, system)
    if thinking and "enable_thinking" not in str(tokenizer.chat_template):
        raise UserError(f"--thinking {thinking}: the chat template of {title} has no enable_thinking switch, so both "
                        "modes would render the same prompt; leave --thinking out")
    try:
        return chat_loop(model, tokenizer, terminal_lines(stdin), out, mode, max_new_tokens, system)
    except KeyboardInterrupt:
        out.write("\n")
        return []
