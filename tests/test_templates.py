"""Our chat templates: generation markers cover each reply and its end-of-turn token; thinking switch; ERNIE format."""

import pytest

from posttrain.data import render_prompt, with_template_kwargs
from posttrain.models import TINY_TOKENIZER, load_tokenizer

CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("template, eot", [("chatml", "<|im_end|>"), ("ernie4_5", "<|end_of_sentence|>")])
def test_assistant_mask_is_the_reply_and_its_end_of_turn(template, eot):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    tokenizer = load_tokenizer(TINY_TOKENIZER, chat_template=template)
    out = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    # ERNIE's "Assistant: " ends in a space that BPE merges into the reply's first token (" 5"), so it is masked too
    assert tokenizer.decode(masked).lstrip(" ") == "5" + eot
    assert len(masked) <= 3, "only the reply and its end-of-turn token are trained on"
    assert is_chat_template_stop_token_trained(tokenizer)


def test_ernie_format_and_thinking_switch():
    tokenizer = load_tokenizer(TINY_TOKENIZER, chat_template="ernie4_5")
    system = [{"role": "system", "content": "Be brief."}]
    text = tokenizer.apply_chat_template(system + CHAT, tokenize=False)
    assert text == "<|begin_of_sentence|>Be brief.\nUser: What is 2 + 3?\nAssistant: 5<|end_of_sentence|>"
    assert render_prompt(tokenizer, CHAT[:1], thinking=False).endswith("Assistant: <think>\n\n</think>\n\n")
    assert render_prompt(tokenizer, CHAT[:1], thinking=True).endswith("Assistant: ")


def test_chatml_thinking_modes_are_prefix_consistent():
    tokenizer = load_tokenizer(TINY_TOKENIZER, chat_template="chatml")
    for thinking in (True, False):
        prompt = render_prompt(tokenizer, CHAT[:1], thinking)
        full = tokenizer.apply_chat_template(CHAT, tokenize=False, enable_thinking=thinking)
        assert full.startswith(prompt), "the prompt the model is asked with must prefix what it was trained on"
    assert "<think>" not in render_prompt(tokenizer, CHAT[:1], None)


def test_rows_of_both_modes_need_a_template_that_tells_them_apart():
    """A template without the thinking switch (Qwen2.5-VL's own, most templates) gives both modes the same prompt: the
    model would learn to think or not at random. Rows of one mode, or a template with the switch, pass."""
    from datasets import Dataset

    from posttrain import gates
    from posttrain.errors import UserError

    rows = with_template_kwargs(Dataset.from_list([{"messages": CHAT, "thinking": True},
                                                   {"messages": CHAT, "thinking": False}]))
    plain = load_tokenizer(TINY_TOKENIZER)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match="tasks.jsonl has thinking and non-thinking rows, but the chat template "
                                        "renders both modes the same"):
        gates.check_thinking_modes(plain, rows, "tasks.jsonl")
    gates.check_thinking_modes(plain, rows.select([0]), "tasks.jsonl")
    gates.check_thinking_modes(load_tokenizer(TINY_TOKENIZER, chat_template="chatml"), rows, "tasks.jsonl")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CHAT = [{"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
             {"role": "tool", "content": '{"temperature": -3}'},
             {"role": "assistant", "content": "It is -3 degrees."}]


@pytest.mark.parametrize("template", ["chatml", "ernie4_5"])
def test_tool_calls_are_trained_and_tool_results_are_not(template):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, supports_tool_calling

    tokenizer = load_tokenizer(TINY_TOKENIZER, chat_template=template)
    out = tokenizer.apply_chat_template(TOOL_CHAT, tools=TOOLS, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    text = tokenizer.decode(out["input_ids"])
    trained = tokenizer.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert '"name": "get_weather"' in text and '"description": "Weather of a city"' in text  # the schema is shown
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in trained
    assert "It is -3 degrees." in trained and "temperature" not in trained and "Weather in Oslo" not in trained
    assert supports_tool_calling(tokenizer) and is_chat_template_prefix_preserving(tokenizer)


def _newline_merging_bpe(template: str):
    """A byte-level BPE with GPT-2's split rule that, like SmolLM2's, has a token for "\\n\\n"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["<think>\n\n</think>\n\n"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = template
    assert "ĊĊ" in tokenizer.get_vocab()
    return tokenizer


@pytest.mark.parametrize("shape", ["messages", "pairs"])
def test_generation_prompt_is_tokenized_as_in_training(shape, caplog):
    """Non-thinking prompts end "</think>\\n": with two newlines (Qwen3's text) a byte-level BPE makes "\\n\\n" one
    token at the end of a prompt but two before a reply, and the pre-flight gate says so."""
    from datasets import Dataset

    from posttrain import gates
    from posttrain.models.templates import CHAT_TEMPLATES

    ours = (CHAT_TEMPLATES / "chatml.jinja").read_text()
    qwen3_like = ours.replace("'<think>\\n\\n</think>\\n'", "'<think>\\n\\n</think>\\n\\n'")
    assert qwen3_like != ours
    thinking = [False, True, None]
    if shape == "messages":
        rows = {"messages": [CHAT] * 3, "thinking": thinking}
    else:
        rows = {"prompt": [CHAT[:1]] * 3, "chosen": [CHAT[1:]] * 3, "rejected": [[{"role": "assistant",
                "content": "6"}]] * 3, "thinking": thinking}
    dataset = with_template_kwargs(Dataset.from_dict(rows))

    tokenizer = _newline_merging_bpe(ours)
    prompt = render_prompt(tokenizer, CHAT[:1], thinking=False)
    alone = tokenizer(prompt)["input_ids"]
    assert tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False, enable_thinking=False))["input_ids"][
        :len(alone)] == alone
    assert gates.check_prompt_boundary(tokenizer, dataset, "rows") == {"prompt_boundary": "ok (3 rows)"}
    assert gates.check_prompt_boundary(tokenizer, dataset.select([0, 0, 0]), "rows", samples=2) == {
        "prompt_boundary": "ok (2 rows)"}  # `samples` rows of a thinking mode, not one more

    with caplog.at_level("WARNING", logger="posttrain"):
        found = gates.check_prompt_boundary(_newline_merging_bpe(qwen3_like), dataset, "rows")
    assert found == {"prompt_boundary": "1 of 3 rows differ"}  # only the non-thinking row ends in "\n\n"
    assert "['ĊĊ']" in caplog.text and "['Ċ', 'Ċ'" in caplog.text and "enable_thinking=False" in caplog.text


@pytest.mark.parametrize("arch", [None, "qwen2_vl"])
def test_a_template_that_renders_the_replys_context_otherwise_is_named(arch, tiny_model_path, caplog):
    """A template whose non-thinking generation prompt prefills an empty think block that its assistant turns lack
    (ERNIE-4.5-VL's own) teaches every non-thinking reply after a context evaluation and UPO never ask with: the gate
    says so (it skipped such rows as no tokenizer matter), for a VLM's processor too (it failed on one)."""
    from datasets import Dataset

    from posttrain import gates
    from posttrain.models.templates import CHAT_TEMPLATES

    ours = (CHAT_TEMPLATES / "chatml.jinja").read_text()
    prefill = "{%- if no_think and not content.startswith('<think>') -%}{{- '<think>\\n\\n</think>\\n' -}}{%- endif -%}"
    assert prefill in ours
    tokenizer = load_tokenizer(tiny_model_path(arch) if arch else TINY_TOKENIZER)
    tokenizer.chat_template = ours.replace(prefill, "")
    if arch:
        tokenizer.tokenizer.chat_template = tokenizer.chat_template
    dataset = with_template_kwargs(Dataset.from_dict({"messages": [CHAT] * 2, "thinking": [False, True]}))
    with caplog.at_level("WARNING", logger="posttrain"):
        found = gates.check_prompt_boundary(tokenizer, dataset, "rows")
    assert found["prompt_rewritten"] == "1 of 2 rows" and "enable_thinking=False" in caplog.text
    tokenizer.chat_template = ours
    if arch:
        tokenizer.tokenizer.chat_template = ours
    assert "prompt_rewritten" not in gates.check_prompt_boundary(tokenizer, dataset, "rows")


def test_tiny_tokenizer_ships_the_chatml_template():
    """The tiny test tokenizer carries a copy of chatml.jinja: tests of the template are tests of the copy only while
    the two are the same text (the prefill fix had to change both)."""
    from posttrain.models.templates import CHAT_TEMPLATES

    assert (TINY_TOKENIZER / "chat_template.jinja").read_text() == (CHAT_TEMPLATES / "chatml.jinja").read_text()
