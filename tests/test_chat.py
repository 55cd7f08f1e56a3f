"""`posttrain chat` on a real tiny run: piped stdin through the real CLI, and the loop itself (history, /reset, /exit,
thinking mode). Replies of a random-weight model are gibberish, so the tests assert the structure, not the words."""

from io import StringIO
from pathlib import Path

import pytest

from posttrain import chat
from posttrain.errors import UserError


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run


def test_cli_chat_with_piped_input(run, tmp_path, posttrain_cli):
    result = posttrain_cli("chat", run, "--max-new-tokens", "4", "--thinking", "off", cwd=tmp_path,
                       stdin="What is 2 + 2?\n\nAnd 3 + 3?\n", timeout=120)
    assert result.stdout.count(chat.REPLY_PREFIX) == 2, result.stdout  # two questions, two replies, blank skipped
    assert result.stdout.endswith("\n")
    assert "chatting with tiny-text/upo: tiny:llama + upo adapter" in result.stderr  # the last finished stage
    assert "Traceback" not in result.stdout + result.stderr  # end of input is a clean exit (code 0, checked above)


def test_cli_chat_unknown_stage_is_a_user_error(run, tmp_path, posttrain_here):
    result = posttrain_here("chat", run, "--stage", "ppo", cwd=tmp_path, check=False)
    assert result.returncode == 2
    shown = " ".join(result.stdout.split())  # as one line, however the terminal wrapped it
    assert "'ppo' is not a stage" in shown and "finished: base, sft, dpo, upo" in shown


@pytest.fixture(scope="module")
def loaded(run):
    model, tokenizer, ref = chat.load_stage(str(run), "sft")
    assert ref.stage == "sft" and ref.adapter
    return model, tokenizer


def test_loop_keeps_history_resets_and_exits(loaded, monkeypatch):
    import posttrain.data

    model, tokenizer = loaded
    seen = []
    render = posttrain.data.render_prompt

    def spy(tok, messages, thinking=None):
        text = render(tok, messages, thinking)
        seen.append((len(messages), thinking, text))
        return text

    monkeypatch.setattr(posttrain.data, "render_prompt", spy)
    out = StringIO()
    lines = ["first question", "second", "  ", "/reset", "third", "/exit", "never answered"]
    replies = chat.chat_loop(model, tokenizer, lines, out, thinking=False, max_new_tokens=3)

    assert len(replies) == 3
    assert [n for n, _, _ in seen] == [1, 3, 1], "history grows by a user+assistant pair; /reset empties it"
    assert all(thinking is False for _, thinking, _ in seen)
    assert all(text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n") for _, _, text in seen), \
        "thinking off goes through the chat template's enable_thinking"
    assert "first question" in seen[1][2] and replies[0] in seen[1][2], "the second turn sees the first exchange"
    assert "first question" not in seen[2][2]
    # what was streamed is exactly what was returned
    assert out.getvalue() == (f"{chat.REPLY_PREFIX}{replies[0]}\n{chat.REPLY_PREFIX}{replies[1]}\n"
                              f"(conversation cleared)\n{chat.REPLY_PREFIX}{replies[2]}\n")


def test_a_system_message_opens_every_conversation(loaded, monkeypatch):
    """`--system TEXT`: the first message of the conversation, rendered by the chat template before each turn, and
    still there after `/reset`."""
    import posttrain.data

    model, tokenizer = loaded
    seen = []
    render = posttrain.data.render_prompt
    monkeypatch.setattr(posttrain.data, "render_prompt",
                        lambda tok, messages, thinking=None: seen.append(list(messages)) or render(tok, messages, thinking))
    chat.chat_loop(model, tokenizer, ["hello", "/reset", "again"], StringIO(), max_new_tokens=2, system="Be brief.")
    assert [[m["role"] for m in messages] for messages in seen] == [["system", "user"], ["system", "user"]]
    assert all(messages[0]["content"] == "Be brief." for messages in seen)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in render(tokenizer, seen[1])


def test_a_system_message_a_template_refuses_is_named_before_the_chat(loaded):
    """Gemma's own template has no system role: `--system` ended the chat at the first reply with a Jinja traceback."""
    import copy
    from pathlib import Path

    import trl

    from posttrain.errors import UserError

    _, tokenizer = loaded
    chat.check_system_renders(tokenizer, "Be brief.")
    gemma = copy.deepcopy(tokenizer)
    gemma.chat_template = (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text()
    with pytest.raises(UserError, match=r"--system: the stage's chat template refuses a system message \(System role"):
        chat.check_system_renders(gemma, "Be brief.")


def test_loop_thinking_default_and_on(loaded):
    model, tokenizer = loaded
    out = StringIO()
    assert len(chat.chat_loop(model, tokenizer, iter(["hello"]), out, thinking=True, max_new_tokens=2)) == 1
    assert len(chat.chat_loop(model, tokenizer, iter([]), out)) == 0  # EOF at once: no reply, no error
    with pytest.raises(UserError, match="--thinking maybe"):
        chat.run_chat("unused", thinking="maybe")


NO_THINKING_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
                        "+ '<|im_end|>\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_thinking_on_or_off_with_a_template_that_has_no_switch_is_refused(tiny_model_path, tmp_path):
    """A model's own template without enable_thinking (SmolLM2-Instruct's, Llama's): both modes rendered the same
    prompt, and --thinking was silently ignored."""
    import shutil

    folder = shutil.copytree(tiny_model_path("llama"), tmp_path / "model")
    (folder / "chat_template.jinja").write_text(NO_THINKING_TEMPLATE)
    for mode in ("on", "off"):
        with pytest.raises(UserError, match=f"--thinking {mode}: the chat template of .* has no enable_thinking"):
            chat.run_chat(None, thinking=mode, stdin=StringIO("hi\n"), out=StringIO(), info=StringIO(),
                          model_path=str(folder))
    out = StringIO()
    chat.run_chat(None, max_new_tokens=2, stdin=StringIO("hi\n"), out=out, info=StringIO(), model_path=str(folder))
    assert out.getvalue().startswith(chat.REPLY_PREFIX)


def test_chat_defaults_to_the_thinking_mode_the_stage_trained_in(run, tmp_path, monkeypatch):
    """A UPO stage trained on prompts of one mode (`chat_template_kwargs`, as GRPO renders image prompts) is chatted
    with in that mode unless --thinking says otherwise."""
    import shutil

    import yaml

    import posttrain.data

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    resolved = copy / "upo" / "resolved.yaml"
    resolved.write_text(yaml.safe_dump({**yaml.safe_load(resolved.read_text()),
                                        "chat_template_kwargs": {"enable_thinking": False}}))
    modes = []
    render = posttrain.data.render_prompt
    monkeypatch.setattr(posttrain.data, "render_prompt",
                        lambda tok, messages, thinking=None: modes.append(thinking) or render(tok, messages, thinking))
    info = StringIO()
    chat.run_chat(str(copy), "upo", None, 2, stdin=StringIO("hello\n"), out=StringIO(), info=info)
    chat.run_chat(str(copy), "upo", "on", 2, stdin=StringIO("hello\n"), out=StringIO(), info=StringIO())
    assert modes == [False, True] and "(thinking off, as it trained)" in info.getvalue()


def test_a_run_whose_base_model_is_gone_says_so(run, tmp_path):
    """The converted or cached base model was cleared, or the run was copied from another machine: one paragraph, not
    a traceback from the loader."""
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("dpo", "upo"))
    resolved = copy / "sft" / "resolved.yaml"
    resolved.write_text(yaml.safe_dump({**yaml.safe_load(resolved.read_text()), "model_name_or_path": "/gone/model"}))
    with pytest.raises(UserError, match="the base model this run trained on is not at /gone/model any more"):
        chat.load_stage(str(copy), "sft")


def test_chat_model_is_found_as_eval_model_finds_it(tiny_model_path):
    """`--model tiny:llama` (the base an adapter export of a tiny run names) and a Hub id not in the offline cache:
    `posttrain eval --model` resolves or names them; chat took them as folders and ended in a traceback."""
    tiny_model_path("llama")  # built once, as the run built it
    out = StringIO()
    chat.run_chat(None, max_new_tokens=2, stdin=StringIO("hi\n"), out=out, info=StringIO(), model_path="tiny:llama")
    assert out.getvalue().startswith(chat.REPLY_PREFIX)
    with pytest.raises(UserError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        chat.run_chat(None, stdin=StringIO("hi\n"), out=StringIO(), info=StringIO(), model_path="someone/not-cached")


def test_cli_chat_with_an_exported_model_or_a_model_and_adapter(run, tmp_path, posttrain_cli, posttrain_here):
    """`--model` takes what `posttrain export` wrote (a merged folder) or any model folder, `--adapter` an adapter
    folder on it, whose own tokenizer and chat template it chats with; a run and --model together are refused."""
    from posttrain.runs import stage_ref

    merged = tmp_path / "merged"
    posttrain_here("export", run, "--stage", "sft", "--merge", "--out", merged, cwd=tmp_path)
    result = posttrain_cli("chat", "--model", merged, "--max-new-tokens", "3", cwd=tmp_path, stdin="2 + 2?\n",
                           timeout=120)
    assert result.stdout.count(chat.REPLY_PREFIX) == 1 and f"chatting with {merged}\n" in result.stderr

    base, adapter = stage_ref(str(run), "sft").base_model, run / "sft"
    info = StringIO()
    replies = chat.run_chat(None, thinking="off", max_new_tokens=3, stdin=StringIO("2 + 2?\n"), out=StringIO(),
                            info=info, model_path=str(base), adapter=str(adapter))
    assert len(replies) == 1 and f"chatting with {base} + {adapter}\n" in info.getvalue()

    refused = posttrain_here("chat", run, "--model", merged, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "not both" in refused.stdout
    with pytest.raises(UserError, match="--adapter goes with --model"):
        chat.run_chat(str(run), adapter=str(adapter))
