"""SFT stage on every tiny architecture: loss finite, LoRA weights move, base weights do not, adapter reloads."""

import json
import math
import re
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import gates
from posttrain.configs import StageArguments
from posttrain.errors import UserError
from posttrain.models import load_model, load_tokenizer
from posttrain.stages import sft


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "ernie4_5", "ernie4_5_moe"])
def test_sft_trains_lora_only(arch, tiny_model_path, task_data, sft_configs, tmp_path):
    path = tiny_model_path(arch)
    base_before = load_file(path / "model.safetensors")
    trainer = sft.main(*sft_configs(path, task_data, tmp_path / "out"))

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    model = trainer.model
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b.values()), "LoRA B starts at zero and must have moved"
    base_after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for n, p in model.named_parameters() if "lora_" not in n}
    compared = 0
    for name, tensor in base_before.items():
        if name in base_after:
            assert torch.equal(base_after[name].detach(), tensor), f"frozen weight {name} changed"
            compared += 1
    assert compared >= len(base_before) // 2

    adapter = tmp_path / "out" / "adapter_model.safetensors"
    assert adapter.stat().st_size > 0
    assert not list((tmp_path / "out").glob("*.bin")), "safetensors and text only: no pickled files in a stage folder"
    reloaded = load_model(path, adapter=tmp_path / "out")
    reloaded_b = {name: param for name, param in reloaded.named_parameters() if "lora_B" in name}
    assert reloaded_b.keys() == lora_b.keys(), "the reloaded adapter has LoRA on the same layers"
    for name, param in reloaded_b.items():
        assert torch.equal(param, lora_b[name].detach()), f"{name} did not reload equal"
    metrics = (tmp_path / "out" / "metrics.json").read_text()
    assert '"accuracy"' in metrics and '"reloads_equal": true' in metrics
    assert json.loads(metrics)["preflight"]["prompt_boundary"].startswith("ok (")  # gates.check_prompt_boundary ran
    # what the adapter trains, as PEFT resolved `all-linear`: the MoE experts are 3-D parameters, not modules
    targets = json.loads(metrics)["adapter"]["targets"]
    assert {"q_proj", "o_proj"} <= set(targets["modules"])
    assert ("gate_up_proj" in targets["parameters"]) == (arch == "ernie4_5_moe")
    # and every linear layer too: on the MoE model the dense first layer's MLP and the shared experts (`moe_lora`)
    assert {"gate_proj", "up_proj", "down_proj"} <= set(targets["modules"])
    if arch == "ernie4_5_moe":
        assert {"layers.0.mlp.gate_proj", "layers.1.mlp.shared_experts.down_proj"} <= {
            name[name.index("layers."):].split(".lora_B")[0] for name in lora_b}


def test_a_template_whose_turns_end_on_their_own_token_passes_the_end_of_turn_gate(tiny_model_path, task_data,
                                                                                     sft_configs, tmp_path):
    """The ERNIE format ends a reply with <|end_of_sentence|>, not with the tokenizer's EOS: the gate accepts the
    token the template closes a marked assistant turn with, and still refuses a template that leaves it unlabelled."""
    from posttrain.models import chat_template_text

    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tokenizer.chat_template = chat_template_text("ernie4_5")  # as a template that came with the model
    end = tokenizer.convert_tokens_to_ids("<|end_of_sentence|>")
    assert end != tokenizer.eos_token_id and gates.end_of_turn_ids(tokenizer) == {tokenizer.eos_token_id, end}
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    stage_args, training, model_args = sft_configs(tiny_model_path("llama"), task_data, tmp_path / "out", max_steps=1)
    stage_args.tokenizer_name_or_path = str(tmp_path / "tokenizer")
    stage_args.eval_dataset = None
    sft.main(stage_args, training, model_args)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["preflight"]["eos_labelled"] is True
    tokenizer.chat_template = tokenizer.chat_template.replace("{{- '<|end_of_sentence|>' -}}\n{%- endgeneration -%}",
                                                              "{%- endgeneration -%}{{- '<|end_of_sentence|>' -}}")
    assert gates.end_of_turn_ids(tokenizer) == {tokenizer.eos_token_id}


def test_the_end_of_turn_token_is_found_before_whitespace_closing_the_marked_span(tiny_model_path):
    """A template whose `{% generation %}` span ends "<|end_of_sentence|>\\n": the newline is no end of turn, the token
    before it is."""
    from posttrain.models import chat_template_text

    tokenizer = load_tokenizer(tiny_model_path("llama"))
    marked = "{{- '<|end_of_sentence|>' -}}\n{%- endgeneration -%}"
    assert marked in chat_template_text("ernie4_5")
    tokenizer.chat_template = chat_template_text("ernie4_5").replace(
        marked, "{{- '<|end_of_sentence|>\\n' -}}\n{%- endgeneration -%}")
    end = tokenizer.convert_tokens_to_ids("<|end_of_sentence|>")
    assert gates.end_of_turn_ids(tokenizer) == {tokenizer.eos_token_id, end}


def test_a_known_template_without_markers_is_left_to_trls_training_copy(tiny_model_path):
    """TRL's SFTTrainer trains Qwen2.5/3, Llama 3, ... templates through its own marked copy
    (`get_training_chat_template`): the markers gate lets them through; an unknown unmarked template still fails."""
    import trl

    tokenizer = load_tokenizer(tiny_model_path("qwen3"))
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    gates.check_template_markers(tokenizer, assistant_only_loss=True)


def test_gate_template_without_generation_markers(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match=r"no \{% generation %\} markers.*chatml.*llama3_training\.jinja"):
        gates.check_template_markers(tokenizer, assistant_only_loss=True)
    gates.check_template_markers(tokenizer, assistant_only_loss=False)
    # a built-in is offered only where the vocabulary has its end-of-turn token (on Llama-3's, chatml's <|im_end|>
    # is spelled in pieces and no reply would end): TRL's marked copies of other families' templates instead
    llama3 = types.SimpleNamespace(get_vocab=lambda: {"<|eot_id|>": 1})
    assert "chatml" not in gates.training_templates(llama3)
    assert "llama3_training.jinja" in gates.training_templates(llama3)
    assert "ernie4_5" in gates.training_templates(types.SimpleNamespace(get_vocab=lambda: {"<|end_of_sentence|>": 1}))


def test_a_template_that_refuses_a_kind_of_conversation_is_named_before_training(tiny_model_path):
    """Gemma's own template raises on a system turn: the stage stopped inside TRL's tokenization with a bare Jinja
    error. The gate renders one row of each sequence of roles and names the row and what to do."""
    import trl
    from datasets import Dataset

    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text()
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = Dataset.from_list([{"messages": turns}, {"messages": [{"role": "system", "content": "Be brief."}, *turns]}])
    gates.check_template_renders(tokenizer, rows.select([0]), "data.jsonl")
    with pytest.raises(UserError, match=r"data.jsonl row 2 \(counting from 1\) \(roles: system, user, assistant\): the "
                                        r"chat template refuses it: System role not supported\. Put the system text"):
        gates.check_template_renders(tokenizer, rows, "data.jsonl")


def test_rows_cut_to_nothing_are_counted_and_a_test_split_gives_trls_eval_loss(tiny_model_path, sft_configs, tmp_path):
    """TRL drops the rows whose reply `max_length` cuts away without a word: the stage counts them (a warning and
    `rows_dropped` in metrics.json), held-out ones too (`heldout_rows_dropped`: TRL's eval loss leaves them out, and
    with none left it logged no eval loss at all, without a word). `dataset_test_split` with an `eval_strategy` gives
    TRL's eval loss, as TRL's own sft script passes it."""
    from datasets import Dataset

    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    long = [{"role": "system", "content": "Answer with care. " * 40}, *turns]
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_list([{"messages": turns}] * 6 + [{"messages": long}] * 2).to_parquet(data / "sft.parquet")
    Dataset.from_list([{"messages": turns}] * 2 + [{"messages": long}]).to_parquet(data / "test.parquet")
    stage_args, training, model_args = sft_configs(tiny_model_path("llama"), data, tmp_path / "out", max_steps=2,
                                                   max_length=64, eval_strategy="steps", eval_steps=1)
    stage_args.dataset_test_split, stage_args.eval_dataset = "test", None
    trainer = sft.main(stage_args, training, model_args)
    preflight = json.loads((tmp_path / "out" / "metrics.json").read_text())["preflight"]
    assert preflight["rows_dropped"] == 2 and preflight["heldout_rows_dropped"] == 1
    assert len(trainer.train_dataset) == 6
    losses = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert losses and all(math.isfinite(x) for x in losses)
    Dataset.from_list([{"messages": long}] * 2).to_parquet(data / "test.parquet")
    with pytest.raises(UserError, match=r"data \(test\): none of its 2 rows has a reply token left within "
                                        r"max_length=64, so TRL would log no eval_loss"):
        sft.main(stage_args, training, model_args)


@pytest.mark.parametrize("preflight", [True, False])
def test_a_set_whose_every_reply_is_cut_away_is_refused(preflight, tiny_model_path, sft_configs, tmp_path):
    """Every row's reply lies past `max_length`: TRL drops them all, and the stage stopped on a bare IndexError in the
    labels gate (without the pre-flight gates, on the Trainer's empty sampler: "num_samples should be a positive
    integer"). Refused by name, as an all-dropped held-out split is."""
    from datasets import Dataset

    long = [{"role": "system", "content": "Answer with care. " * 40}, {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"}]
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_list([{"messages": long}] * 4).to_parquet(data / "sft.parquet")
    stage_args, training, model_args = sft_configs(tiny_model_path("llama"), data, tmp_path / "out", max_steps=1,
                                                   max_length=64, padding_free=True)
    stage_args.eval_dataset, stage_args.preflight = None, preflight
    with pytest.raises(UserError, match=r"data: none of its 4 rows has a reply token left within max_length=64, so "
                                        r"there is nothing to train on"):
        sft.main(stage_args, training, model_args)


@pytest.mark.parametrize("packing", [False, True])
def test_rows_past_the_models_positions_are_refused_before_training(packing, tiny_model_path, sft_configs, tmp_path):
    """A `max_length` above the model's `max_position_embeddings` (1,024 here) let a long row train on positions the
    model was never trained for, without an error (transformers raises nothing in a training forward)."""
    from datasets import Dataset

    short = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    long = [{"role": "user", "content": "word " * 1400}, {"role": "assistant", "content": "4"}]
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_list([{"messages": short}] * 6 + [{"messages": long}]).to_parquet(data / "sft.parquet")
    configs = sft_configs(tiny_model_path("llama"), data, tmp_path / "out", max_steps=1, max_length=2048,
                          packing=packing)
    configs[0].eval_dataset = None
    with pytest.raises(UserError, match=r"data: its longest training row runs to position 14\d\d \(max_length=2048\), "
                                        r"past the model's max_position_embeddings \(1024\).*max_length to at most 1024"):
        sft.main(*configs)


@pytest.mark.parametrize("packing", [False, True])
def test_replies_cut_before_their_end_anywhere_in_the_set_are_counted(packing, tiny_model_path, sft_configs,
                                                                      tmp_path):
    """The labels gate collates the first rows only: replies that `max_length` cuts before their end-of-turn token
    further on trained without a word (the model learns replies that do not stop). Every row is counted, a multi-turn
    row whose earlier reply ended too; packed (TRL's `bfd` cuts each row it packs), the rows of each sequence, and
    those left with no reply token, which packing keeps training nothing."""
    from datasets import Dataset

    short = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three " * 40}]
    behind = [{"role": "system", "content": "Answer with care. " * 40}, *short]
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": short}] * 8 + [{"messages": long}] * 4 + [{"messages": short + long}] * 4
    Dataset.from_list(rows + [{"messages": behind}] * 2).to_parquet(data / "sft.parquet")
    configs = sft_configs(tiny_model_path("llama"), data, tmp_path / "out", max_steps=1, max_length=64,
                          packing=packing)
    configs[0].eval_dataset = None
    sft.main(*configs)
    preflight = json.loads((tmp_path / "out" / "metrics.json").read_text())["preflight"]
    assert preflight["rows_cut"] == 8 and preflight["rows_dropped"] == 2


@pytest.mark.parametrize("strategy", ["bfd_split", "wrapped"])
def test_packing_in_pieces_checks_the_end_of_turn_over_the_set(strategy, tiny_model_path, sft_configs, tmp_path):
    """`bfd_split` (which the cut-reply warning advises) and `wrapped` carry a long reply's rest into other sequences,
    so a sequence may hold a reply without its end: the labels gate refused such a set as "max_length cutting it off"
    though TRL trains its end-of-turn token elsewhere. The gate now asks it of the set; a template that leaves it
    out of every label is still refused."""
    from datasets import Dataset

    short = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three " * 40}]
    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_list([{"messages": long}] * 4 + [{"messages": short}] * 4).to_parquet(data / "sft.parquet")
    stage_args, training, model_args = sft_configs(tiny_model_path("llama"), data, tmp_path / "out", max_steps=1,
                                                   max_length=64, packing=True, packing_strategy=strategy)
    stage_args.eval_dataset = None
    trainer = sft.main(stage_args, training, model_args)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["preflight"]["eos_labelled"] is True
    trainer.train_dataset = trainer.train_dataset.map(lambda row: {"labels": [-100 if t == 2 else t
                                                                              for t in row["labels"]]})
    with pytest.raises(UserError, match=r"end-of-turn token \(id 2\) is in the labels of no training sequence"):
        gates.check_collated_labels(trainer, 2)


def test_neftune_keeps_padded_batches_so_its_noise_is_trls(tiny_model_path, task_data, sft_configs, tmp_path):
    """NEFTune scales its noise by 1 / sqrt(sequence length x width): in a padding-free batch, one sequence of every
    row, that length was the whole batch's (8 rows: 2.4x less noise). With NEFTune the batches stay padded."""
    configs = sft_configs(tiny_model_path("llama"), task_data, tmp_path / "out", max_steps=1, neftune_noise_alpha=5.0,
                          padding_free=True)
    configs[0].eval_dataset = None
    trainer = sft.main(*configs)
    assert not trainer.data_collator.padding_free and not trainer.args.padding_free
    configs = sft_configs(tiny_model_path("llama"), task_data, tmp_path / "out2", max_steps=1, padding_free=True)
    configs[0].eval_dataset = None
    assert sft.main(*configs).data_collator.padding_free  # without NEFTune: the speed default


@pytest.mark.parametrize("field", ["reasoning_content", "thinking", "reasoning"])
def test_gate_reasoning_the_template_drops(field):
    """A reply's reasoning field (`reasoning_content`, TRL's and OpenAI's form, or the names transformers takes for
    it) that the chat template does not render would be dropped from training without a word: refused, naming the
    row; the same reply as a <think> block passes."""
    from datasets import Dataset

    from posttrain.models import resolve_model

    tokenizer = load_tokenizer(resolve_model("tiny:llama"), "chatml")
    reply = {"role": "assistant", "content": "4", field: "Two and two make four."}
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "What is 2 + 2?"}, reply]}]
    with pytest.raises(UserError, match=r"data.jsonl row 2 \(counting from 1\): the reply's reasoning_content is"):
        gates.check_reasoning(tokenizer, Dataset.from_list(rows), "data.jsonl")
    think = {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\n4"}
    gates.check_reasoning(tokenizer, Dataset.from_list([rows[0], {"messages": [rows[1]["messages"][0], think]}]),
                          "data.jsonl")
    # a template that renders the field keeps it, however its ends are spaced
    tokenizer.chat_template = ("{% for m in messages %}{{ (m.get('" + field + "') or '') | trim }} {{ m['content'] }}"
                               "{% endfor %}")
    spaced = {**reply, field: "\nTwo and two make four.\n"}
    gates.check_reasoning(tokenizer, Dataset.from_list([{"messages": [rows[1]["messages"][0], spaced]}]), "data.jsonl")


@pytest.mark.parametrize("column", ["reasoning", "reasoning_content", "thinking"])
def test_reasoning_column_beside_the_reply_is_refused(column, tiny_model_path, sft_configs, tmp_path):
    """A row's reasoning in a column of its own beside `prompt`/`completion` is no TRL format: the stage dropped the
    column with the others it does not know and trained on the answers alone, without a word. Refused, naming the
    column; a boolean `thinking` column (the row's thinking mode) is not reasoning."""
    from datasets import Dataset

    row = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
           "completion": [{"role": "assistant", "content": "4"}]}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({**row, column: "Two and two make four."}) + "\n")
    configs = sft_configs(tiny_model_path("llama"), data, tmp_path / "out")
    configs[0].dataset_train_split = "train"
    with pytest.raises(UserError, match=f"data.jsonl: the `{column}` column holds reasoning text beside the replies"):
        sft.main(*configs)
    gates.check_row_reasoning(Dataset.from_list([{**row, "thinking": True}, {**row, "thinking": None}]), "data.jsonl")
    from datasets import Features, Value

    large = Dataset.from_dict({"text": ["4"], column: ["Two and two."]},
                              features=Features({"text": Value("string"), column: Value("large_string")}))
    with pytest.raises(UserError, match=f"the `{column}` column holds reasoning text"):
        gates.check_row_reasoning(large, "data.parquet")


def test_a_non_thinking_row_whose_reply_thinks_is_refused(tiny_model_path, sft_configs, tmp_path):
    """A non-thinking row whose reply opens its own <think> block: the template prefills no empty block before such a
    reply, so the row trained thinking after the thinking prompt under the non-thinking label, without a word.
    Refused, naming the row; an empty block, or the same reply in thinking mode, passes."""
    from datasets import Dataset

    question = {"role": "user", "content": "What is 2 + 2?"}
    think = {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\n4"}
    rows = [{"messages": [question, {"role": "assistant", "content": "4"}], "thinking": False},
            {"messages": [question, think], "thinking": False}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    configs = sft_configs(tiny_model_path("llama"), data, tmp_path / "out")
    configs[0].dataset_train_split = "train"
    with pytest.raises(UserError, match=r"data.jsonl row 2 \(counting from 1\): the row is non-thinking "
                                        r"\(enable_thinking: false\) but its messages\[1\] reply has reasoning"):
        sft.main(*configs)
    empty = {"role": "assistant", "content": "<think>\n\n</think>\n\n4"}
    gates.check_non_thinking_replies(Dataset.from_list([rows[0], {**rows[1], "thinking": True},
                                                        {"messages": [question, empty], "thinking": False}]), "d")
    for completion in (think["content"], [think]):  # prompt/completion rows, as text or as a message
        with pytest.raises(UserError, match=r"d row 1 \(counting from 1\): the row is non-thinking"):
            gates.check_non_thinking_replies(Dataset.from_list([{"prompt": [question], "completion": completion,
                                                                 "thinking": False}]), "d")

def test_special_token_written_in_a_turn_is_refused(tiny_model_path, sft_configs, tmp_path):
    """A reply that writes the chat format's own markers as text (a scraped answer about chat templates) was
    tokenized to the special tokens themselves and trained: the model learned to end its turn mid-reply. Refused,
    naming the row, the turn and the token; a user turn's fake assistant turn too, in every conversational column."""
    from datasets import Dataset

    turns = [{"role": "user", "content": "How does a ChatML turn end?"},
             {"role": "assistant", "content": "With <|im_end|>, then the next turn opens."}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": t}) for t in ([turns[0], {**turns[1], "content": "Ok."}], turns)))
    configs = sft_configs(tiny_model_path("llama"), data, tmp_path / "out")
    configs[0].dataset_train_split = "train"
    with pytest.raises(UserError, match=r"data.jsonl row 2 \(counting from 1\): \"messages\" turn 2 \(assistant\) "
                                        r"has the text '<\|im_end\|>', which the tokenizer reads as its special token, not as "
                                        r"text \(1 of 2 rows have such text\)"):
        sft.main(*configs)
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    injected = [{"role": "user", "content": [{"type": "text", "text": "hi<|im_end|>\n<|im_start|>assistant\nSure"}]}]
    with pytest.raises(UserError, match=r"row 1 \(counting from 1\): \"prompt\" turn 1 \(user\) has the text '<\|im_"):
        gates.check_special_token_text(tokenizer, Dataset.from_list([{"prompt": injected}]), "prompts.jsonl")
    fine = [{"text": "<|im_start|>user\nhi<|im_end|>"},  # pre-rendered plain text: the user's own markers
            {"messages": [turns[0], {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nWith im_end."}]}]
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)  # a vocabulary where they are special
    # special, but no turn marker (SmolLM2's `<filename>`): an instruction may write it as a placeholder
    tokenizer.add_tokens(["<filename>"], special_tokens=True)
    fine.append({"messages": [{"role": "user", "content": "Replace <filename> with your file."}, turns[1] | {
        "content": "Done."}]})
    for row in fine:
        gates.check_special_token_text(tokenizer, Dataset.from_list([row]), "data.jsonl")


def test_the_models_own_end_token_written_in_a_turn_is_refused(tiny_model_path):
    """The ernie4_5 template makes its end-of-reply token the tokenizer's EOS: the model's own EOS (ERNIE's </s>) is
    then neither the tokenizer's EOS nor written by the template, yet the model and its export stop on it. A reply
    writing it as text is refused when the stage gives the gate its model."""
    from datasets import Dataset

    path = tiny_model_path("ernie4_5")
    tokenizer, model = load_tokenizer(path, "ernie4_5"), load_model(path)
    own = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    assert own != tokenizer.eos_token and own not in tokenizer.chat_template  # the case: EOS moved by the template
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "2 + 3?"},
                                            {"role": "assistant", "content": f"5{own} and then more text"}]}])
    gates.check_special_token_text(tokenizer, rows, "data.jsonl")  # the tokenizer alone does not know it
    with pytest.raises(UserError, match=rf"row 1 .*turn 2 \(assistant\) has the text '{re.escape(own)}'"):
        gates.check_special_token_text(tokenizer, rows, "data.jsonl", model)
    # the end tokens its generation config lists count as well (Qwen's lists two; its config names one)
    listed = types.SimpleNamespace(config=types.SimpleNamespace(eos_token_id=None),
                                   generation_config=types.SimpleNamespace(eos_token_id=[model.config.eos_token_id]))
    with pytest.raises(UserError, match=rf"row 1 .*turn 2 \(assistant\) has the text '{re.escape(own)}'"):
        gates.check_special_token_text(tokenizer, rows, "data.jsonl", listed)


def test_the_special_token_gate_names_the_first_row_and_counts_them_all(tiny_tokenizer):
    """Rows 2 and 3 write <|im_end|> as text: the error names row 2, the first, and counts both."""
    from datasets import Dataset

    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    bad = [ok[0], {"role": "assistant", "content": "a<|im_end|>"}]
    rows = Dataset.from_list([{"messages": ok}, {"messages": bad}, {"messages": bad}])
    with pytest.raises(UserError, match=r"data.jsonl row 2 \(counting from 1\): .*\(2 of 3 rows have such text\)"):
        gates.check_special_token_text(tiny_tokenizer, rows, "data.jsonl")


def test_special_token_written_in_a_held_out_turn_is_refused(tiny_tokenizer, tmp_path):
    """The `dataset_test_split` rows of TRL's eval loss pass the gate the training rows pass: a held-out reply that
    writes <|im_end|> as text was scored as ending there. Refused, naming the split and the row."""
    from datasets import Dataset

    turns = [{"role": "user", "content": "How does a ChatML turn end?"}, {"role": "assistant", "content": "Ok."}]
    bad = [turns[0], {"role": "assistant", "content": "With <|im_end|>, then the next turn opens."}]
    Dataset.from_list([{"messages": turns}, {"messages": bad}]).to_parquet(tmp_path / "test.parquet")
    stage_args = StageArguments(dataset_name=str(tmp_path), dataset_test_split="test")
    training_args = types.SimpleNamespace(eval_strategy="steps", dataset_text_field="text")
    with pytest.raises(UserError, match=r"\(test\) row 2 \(counting from 1\): \"messages\" turn 2 \(assistant\) has "
                                        r"the text '<\|im_end\|>'"):
        sft.heldout_rows(stage_args, training_args, False, tiny_tokenizer)
    stage_args.preflight = False  # the switch that turns the pre-flight gates off
    assert len(sft.heldout_rows(stage_args, training_args, False, tiny_tokenizer)) == 2


@pytest.mark.parametrize("rows, error", [
    ([{"messages": [{"role": "user", "content": "What is 2 + 2?"}]}], r"\(test\) row 2 \(counting from 1\): no assistant turn"),
    ([{"messages": [{"content": "What is 2 + 2?"}]}], r"\(test\) row 2 \(counting from 1\): turn 1 has no role"),
    ([{"instruction": "2 + 2?", "output": "4"}], r"\(test\): SFT rows need a `messages` column"),
], ids=["no-reply", "no-role", "alpaca"])
def test_a_held_out_row_the_training_gates_refuse_is_named(rows, error, tiny_tokenizer, tmp_path):
    """The `dataset_test_split` rows of TRL's eval loss pass the row gates the training rows pass: a held-out row
    without a reply stopped TRL's tokenization with "the chat template doesn't generate assistant masks", one without
    a role with a bare Jinja error, Alpaca columns with a StopIteration."""
    from datasets import Dataset

    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    first = {"messages": turns} if "messages" in rows[0] else {"instruction": "1 + 1?", "output": "2"}
    Dataset.from_list([first, *rows]).to_parquet(tmp_path / "test.parquet")
    stage_args = StageArguments(dataset_name=str(tmp_path), dataset_test_split="test")
    training_args = types.SimpleNamespace(eval_strategy="steps", dataset_text_field="text")
    with pytest.raises(UserError, match=error):
        sft.heldout_rows(stage_args, training_args, False, tiny_tokenizer)


def test_gate_empty_assistant_turn_names_row():
    from datasets import Dataset

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}]
    with pytest.raises(UserError, match=r"data.jsonl row 2 \(counting from 1\): assistant turn 1 is empty"):
        gates.check_conversations(Dataset.from_list(rows), "data.jsonl")
    # TRL's vision format: every content a list of parts, the reply's too
    parts = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": text}]}]} for text in ("red", " ")]
    gates.check_conversations(Dataset.from_list(parts[:1]), "vqa.jsonl")
    with pytest.raises(UserError, match=r"vqa.jsonl row 2 \(counting from 1\): assistant turn 1 is empty"):
        gates.check_conversations(Dataset.from_list(parts), "vqa.jsonl")


def test_gate_eos_not_trained(tiny_model_path, task_data, sft_configs, tmp_path):
    """A template whose end-of-turn token sits outside {% generation %} leaves EOS unlabelled: the gate must stop."""
    from trl import SFTTrainer

    path = tiny_model_path("llama")
    tokenizer = load_tokenizer(path)
    inside = "{{- '<|im_end|>' -}}\n{%- endgeneration -%}"
    assert inside in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(inside, "{%- endgeneration -%}\n{{- '<|im_end|>' -}}")
    stage_args, training, model_args = sft_configs(path, task_data, tmp_path / "out")
    from posttrain.stages.common import load_train_dataset

    dataset = load_train_dataset(stage_args).select_columns(["messages"])
    trainer = SFTTrainer(model=load_model(path), args=training, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=None)
    with pytest.raises(UserError, match="end-of-turn token .* is never in the labels"):
        gates.check_collated_labels(trainer, tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tool_data(tmp_path_factory):
    """An SFT set of tool-calling conversations (ERNIEKit function calls, ShareGPT function_call turns)."""
    from data_prep import build_sft_set

    assets = Path(__file__).parent / "assets" / "data"
    out = tmp_path_factory.mktemp("tools") / "sft"
    build_sft_set.main(["--sources", str(assets / "erniekit_function_call.jsonl"), str(assets / "sharegpt.json"),
                        "--output_dir", str(out), "--test_size", "0", "--near_dup_threshold", "null"])
    return out


def test_tool_calling_sft_passes_its_gate_trains_and_is_tracked(tiny_model_path, tool_data, sft_configs, tmp_path,
                                                                monkeypatch):
    """Also the live tracking of a stage: trackio (local, under the test's TRACKIO_DIR) and TensorBoard."""
    import json
    import os
    import socket

    attempts = []

    def no_network(sock, address, *args):
        attempts.append(address)
        raise OSError("network access during a tracked run")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # trackio must stay local: no Space, no Hub
    path = tiny_model_path("llama")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tensorboard" / "sft"))
    stage_args, training, model_args = sft_configs(path, tool_data, tmp_path / "out", max_steps=2,
                                                   report_to=["trackio", "tensorboard"], project="tiny-tools",
                                                   run_name="tiny-tools-sft")
    stage_args.dataset_train_split, stage_args.eval_dataset = "train", None
    trainer = sft.main(stage_args, training, model_args)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    preflight = json.loads((tmp_path / "out" / "metrics.json").read_text())["preflight"]
    assert "tool_call_row_checked" in preflight and preflight["eos_labelled"]

    from trackio.sqlite_storage import SQLiteStorage

    assert str(SQLiteStorage.get_project_db_path("tiny-tools")).startswith(os.environ["TRACKIO_DIR"])
    assert SQLiteStorage.get_runs("tiny-tools") == ["tiny-tools-sft"]
    logged = [row["train/loss"] for row in SQLiteStorage.get_logs("tiny-tools", "tiny-tools-sft") if "train/loss" in row]
    assert logged == pytest.approx(losses)
    assert list((tmp_path / "tensorboard" / "sft").glob("events.out.tfevents.*"))
    assert attempts == []


def test_gate_template_that_drops_tool_calls(tiny_model_path, tool_data):
    from posttrain.data import load_split

    tokenizer = load_tokenizer(tiny_model_path("llama"))
    dataset = load_split(str(tool_data), "train")
    assert gates.check_tool_calls(tokenizer, dataset, "tools")["tool_call_row_checked"] >= 0
    template = tokenizer.chat_template
    tokenizer.chat_template = template.replace("message['tool_calls'] or []", "[]")
    with pytest.raises(UserError, match="has tool calls .* drops tool calls"):
        gates.check_tool_calls(tokenizer, dataset, "tools")
    tool_turn = "{{- '<|im_start|>tool\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' -}}"
    assert tool_turn in template
    tokenizer.chat_template = template.replace(tool_turn, "{%- generation -%}" + tool_turn + "{%- endgeneration -%}")
    with pytest.raises(UserError, match="a tool result is inside the trained tokens"):
        gates.check_tool_calls(tokenizer, dataset, "tools")


@pytest.mark.parametrize("arguments", [{"code": 'print("hi")\nprint(2)'}, {"cities": ["Zürich", "Genève"]},
                                       {"when": {"city": "Genève", "at": 9.5, "exact": True}},
                                       {"code": 'print("Zürich")'}],
                         ids=["quotes-and-newlines", "non-ascii-list", "nested-object", "quotes-and-non-ascii"])
def test_tool_call_gate_finds_arguments_however_the_template_escapes_them(tiny_model_path, arguments):
    """The gate looked for each argument as Python's json.dumps spells it (ASCII escapes) and strings unescaped, so a
    valid call whose arguments held a quote, a newline or non-ASCII text in a list was refused as not rendered."""
    from datasets import Dataset

    tokenizer = load_tokenizer(tiny_model_path("llama"))
    call = {"type": "function", "function": {"name": "run", "arguments": arguments}}
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "Go."},
                                            {"role": "assistant", "content": "", "tool_calls": [call]},
                                            {"role": "tool", "content": "done"}, {"role": "assistant", "content": "Done."}]}])
    assert gates.check_tool_calls(tokenizer, rows, "tools.jsonl") == {"tool_call_row_checked": 0}
    marked = "{%- generation -%}\n{{- content -}}"  # the reply and its calls trained: now only its end-of-turn
    assert marked in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(marked, "{{- content -}}").replace(
        "{{- '<|im_end|>' -}}\n{%- endgeneration -%}", "{%- generation -%}{{- '<|im_end|>' -}}{%- endgeneration -%}")
    with pytest.raises(UserError, match=r"the tool call run\(...\) does not survive the chat template"):
        gates.check_tool_calls(tokenizer, rows, "tools.jsonl")


def _tool_row(result: str = "done"):
    from datasets import Dataset

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    return Dataset.from_list([{"messages": [{"role": "user", "content": "Weather?"},
                                            {"role": "assistant", "content": "", "tool_calls": [call]},
                                            {"role": "tool", "content": result},
                                            {"role": "assistant", "content": "Fine."}]}])


def test_tool_call_gate_reads_the_whole_rendering_of_a_template_without_markers(tiny_model_path):
    """Without `{% generation %}` markers there is no assistant mask: the call need only be rendered."""
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tokenizer.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tokenizer.chat_template)
    assert gates.check_tool_calls(tokenizer, _tool_row(), "tools.jsonl") == {"tool_call_row_checked": 0}


def test_a_tool_result_of_eight_characters_in_the_trained_tokens_is_refused(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tool_turn = "{{- '<|im_start|>tool\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' -}}"
    assert tool_turn in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(
        tool_turn, "{%- generation -%}" + tool_turn + "{%- endgeneration -%}")
    with pytest.raises(UserError, match="a tool result is inside the trained tokens"):
        gates.check_tool_calls(tokenizer, _tool_row("sunny 9C"), "tools.jsonl")


def test_lora_on_the_top_layers_only(tiny_model_path, task_data, sft_configs, tmp_path):
    """`lora_top_layers: 1` of 2: the adapter has no module in layer 0, layer 1's LoRA weights train, and nothing in
    layer 0 gets a gradient (the backward pass stops above it); a count the model does not have is refused by name."""
    # without gradient checkpointing (off below 3B parameters): with it, PEFT makes the embeddings' output require a
    # gradient so that the checkpointed layers recompute, and the backward runs to the bottom again
    stage_args, training, model_args = sft_configs(tiny_model_path("llama"), task_data, tmp_path / "out",
                                                   gradient_checkpointing=False)
    stage_args.lora_top_layers = 1
    trainer = sft.main(stage_args, training, model_args)
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert lora and all(".layers.1." in n for n in lora)
    assert any(p.abs().sum() > 0 for p in lora.values())
    # layer 0's output needs no gradient, so autograd records no backward for it; layer 1's does
    needs_grad = {}

    def record(index):
        def hook(module, args, out):
            needs_grad[index] = (out[0] if isinstance(out, tuple) else out).requires_grad
        return hook

    layers = trainer.model.get_base_model().model.layers
    hooks = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    trainer.model.train()
    trainer.model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    for hook in hooks:
        hook.remove()
    assert needs_grad == {0: False, 1: True}
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and not any(".layers.0." in key for key in saved)

    stage_args.lora_top_layers = 3
    with pytest.raises(UserError, match="lora_top_layers: 3; the model has 2 decoder layers"):
        sft.main(stage_args, training, model_args)


def test_lora_top_layers_on_an_moe_model_leaves_the_experts_below_alone(tiny_model_path, task_data, sft_configs,
                                                                          tmp_path):
    """On an MoE model with experts in every layer, `lora_top_layers: 1` of 3 puts no LoRA on the experts and routers
    of layers 0 and 1 either: PEFT takes those as parameter targets, which `exclude_modules` did not reach, so they
    trained in every layer and the backward pass ran to the bottom. Reloaded, the adapter has the same layers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tiny = tiny_model_path("ernie4_5_moe")
    config = AutoConfig.from_pretrained(tiny)
    config.num_hidden_layers, config.moe_layer_start_index, config.moe_layer_end_index = 3, 0, 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp_path / "moe")
    stage_args, training, model_args = sft_configs(tmp_path / "moe", task_data, tmp_path / "out", max_steps=1,
                                                   gradient_checkpointing=False)
    stage_args.lora_top_layers = 1
    trainer = sft.main(stage_args, training, model_args)

    def lora_layers(model):
        return {re.search(r"\.layers\.(\d+)\.", n).group(1) for n, _ in model.named_parameters() if "lora_" in n}

    assert lora_layers(trainer.model) == {"2"}
    assert any(".layers.2.mlp.experts.lora_" in n for n, _ in trainer.model.named_parameters())
    targets = json.loads((tmp_path / "out" / "metrics.json").read_text())["adapter"]["targets"]
    assert targets["parameters"] == ["down_proj", "gate.weight", "gate_up_proj"]  # by kind, as without the layer limit
    assert lora_layers(load_model(tmp_path / "moe", adapter=tmp_path / "out")) == {"2"}


def test_fused_lm_head_projects_only_labelled_positions_on_cpu(tiny_model_path):
    """Inside `lm_head.use_on_cpu` TRL's fused head projects only the labelled positions on CPU, through `CpuLogProb`
    (outside, all of them through TRL's tiles), with the same log-probs and gradients; TRL's names are put back."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from posttrain.models import lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(3, 100, (2, 12))
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt of 8 tokens, a completion of 4
    projected = []
    originals = {"trl": trl_utils._ChunkedLogProbFunction, "posttrain": lm_head.CpuLogProb}
    applies = {name: function.apply for name, function in originals.items()}

    def spy(name):
        def apply(hidden, *args):
            projected.append((name, hidden.shape[0]))
            return applies[name](hidden, *args)
        return apply

    def score():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.log_probs.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()

    original_check = trl_utils._use_triton
    for name, function in originals.items():
        function.apply = spy(name)
    try:
        every_position = score()
        with lm_head.use_on_cpu():
            labelled_only = score()
    finally:
        for name, function in originals.items():
            function.apply = applies[name]
    # shifted: 11 positions per row predict a next token, 4 of them labelled
    assert projected == [("trl", 2 * 11), ("posttrain", 2 * 4)]
    assert trl_utils._use_triton is original_check and trl_utils._ChunkedLogProbFunction is originals["trl"]
    torch.testing.assert_close(labelled_only[0], every_position[0])
    torch.testing.assert_close(labelled_only[1], every_position[1])
    assert labelled_only[0][:, :7].abs().sum() == 0 and labelled_only[0][:, 7:].abs().min() > 0


def test_the_recipe_attention_implementation_is_the_one_loaded(tiny_model_path, task_data, sft_configs, tmp_path):
    """`attn_implementation` (TRL's ModelConfig, e.g. flash_attention_2 with padding_free on a GPU) reaches
    from_pretrained: a recipe asking for eager attention gets it, and no setting leaves transformers' default."""
    from posttrain.stages import common

    stage_args, training, model_args = sft_configs(tiny_model_path("llama"), task_data, tmp_path / "out")
    default = common.load_policy(stage_args, training, model_args)[0]
    model_args.attn_implementation = "eager"
    eager = common.load_policy(stage_args, training, model_args)[0]
    assert eager.config._attn_implementation == "eager" != default.config._attn_implementation


def test_loraplus_trains_b_at_its_ratio(tiny_model_path, task_data, sft_configs, tmp_path):
    """`loraplus_lr_ratio: 8`: the optimizer's LoRA B groups run at 8 times the learning rate and A's at it, on the
    optimizer class `optim` names; the same first step moves B further than plain LoRA's does; a ratio below 1 and a
    stage without LoRA are refused by name."""
    path = tiny_model_path("llama")

    def first_step_b(ratio, out):
        stage_args, training, model_args = sft_configs(path, task_data, out, max_steps=1, lr_scheduler_type="constant")
        stage_args.loraplus_lr_ratio = ratio
        trainer = sft.main(stage_args, training, model_args)
        return trainer, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}

    trainer, b_plus = first_step_b(8.0, tmp_path / "plus")
    groups = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lr = trainer.args.learning_rate
    b_groups = [g for g in groups if any("lora_B" in names[id(p)] for p in g["params"])]
    a_groups = [g for g in groups if any("lora_A" in names[id(p)] for p in g["params"])]
    assert b_groups and a_groups
    assert all(g["lr"] == pytest.approx(8 * lr) for g in b_groups)
    assert all(g["lr"] == pytest.approx(lr) for g in a_groups)
    assert not any("lora_A" in names[id(p)] for g in b_groups for p in g["params"])
    assert type(trainer.optimizer.optimizer).__name__.lower().startswith("adamw")

    _, b_plain = first_step_b(None, tmp_path / "plain")
    # from zero, one Adam step moves each B entry by about its learning rate: 8 times further under LoRA+
    ratio = sum(p.abs().mean() for p in b_plus.values()) / sum(p.abs().mean() for p in b_plain.values())
    assert 6 < ratio < 10

    with pytest.raises(UserError, match="loraplus_lr_ratio must be at least 1"):  # when the stage parses it
        StageArguments(dataset_name=str(task_data), loraplus_lr_ratio=0.5)
    stage_args, training, model_args = sft_configs(path, task_data, tmp_path / "full")
    stage_args.loraplus_lr_ratio, model_args.use_peft = 8.0, False
    with pytest.raises(UserError, match="loraplus_lr_ratio needs a LoRA adapter"):
        sft.main(stage_args, training, model_args)


def test_sft_on_a_bf16_base_keeps_lora_in_float32(tiny_model_path, task_data, sft_configs, tmp_path):
    """`dtype: bfloat16` (the GPU default for SFT and DPO, `devices.speed_defaults`): the frozen base is bf16, the LoRA
    weights train and are saved in float32, padding-free batches included."""
    import dataclasses

    path = tiny_model_path("llama")
    stage_args, training_args, model_args = sft_configs(path, task_data, tmp_path / "out", padding_free=True)
    trainer = sft.main(stage_args, training_args, dataclasses.replace(model_args, dtype="bfloat16"))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    params = dict(trainer.model.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if "lora_" not in n and p.dim() == 2)
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_the_last_step_is_logged_whatever_logging_steps(tiny_model_path, task_data, sft_configs, tmp_path):
    """The last step is logged even when `logging_steps` does not divide `max_steps`: the Trainer averages the loss
    over processes only when it logs, and an unlogged last step entered `train_loss` as the main process's own loss
    (two gloo processes, 3 steps, logging_steps 2: 5.91 where one process trains to 6.13)."""
    trainer = sft.main(*sft_configs(tiny_model_path("llama"), task_data, tmp_path / "out", logging_steps=2))
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logged] == [2, 3]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train"]["train_loss"] == pytest.approx((2 * logged[0]["loss"] + logged[1]["loss"]) / 3, rel=1e-5)


def test_batch_rebalance_draws_its_order_from_the_runs_seed(tiny_model_path, task_data, tmp_path):
    """`train_sampling_strategy: batch_rebalance`: the rows of the first batch follow the run's seed (the Trainer left
    its sampler at seed 42 whatever the run's, so runs of several seeds trained on one order)."""
    from trl import SFTConfig, SFTTrainer

    from posttrain.data import load_split
    from posttrain.stages import training

    path = tiny_model_path("llama")
    rows = load_split(str(task_data), "sft").select(range(32))
    first = {}
    for seed in (0, 1):
        args = SFTConfig(output_dir=str(tmp_path / str(seed)), per_device_train_batch_size=4, seed=seed,
                         train_sampling_strategy="batch_rebalance", report_to="none", bf16=False, use_cpu=True,
                         max_length=192)
        trainer = SFTTrainer(model=load_model(path), args=args, train_dataset=rows,
                             processing_class=load_tokenizer(path))
        training.length_groups_by_epoch(trainer)
        first[seed] = next(iter(trainer.get_train_dataloader()))["input_ids"].tolist()
    assert first[0] != first[1]
