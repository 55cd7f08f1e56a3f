"""DPO after SFT on a tiny model: the SFT adapter keeps training, its frozen copy is the reference, one base model."""

import json
import math

import pytest
import torch
from datasets import Dataset

from posttrain.configs import StageArguments
from posttrain.errors import UserError
from posttrain.gates import check_preference_pairs, count_cut_pairs, non_thinking_reasoning
from posttrain.models import load_tokenizer
from posttrain.stages import dpo, sft
from posttrain.stages.pairs import load_pairs


def pairs_dir(tmp_path):
    """Held-out-style pairs with a clear preference: the correct answer vs a wrong one."""
    rows = []
    for i in range(24):
        a, b = i % 7 + 2, i % 5 + 3
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                     "chosen": [{"role": "assistant", "content": str(a + b)}],
                     "rejected": [{"role": "assistant", "content": f"It is {a * b + 1}, I think."}],
                     "thinking": False})
    out = tmp_path / "pairs"
    out.mkdir()
    Dataset.from_list(rows[:16]).to_parquet(out / "train.parquet")
    Dataset.from_list(rows[16:]).to_parquet(out / "test.parquet")
    return out


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_path, task_data, sft_configs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "adapter"
    sft.main(*sft_configs(tiny_model_path("llama"), task_data, out))
    return out


def test_dpo_continues_sft_adapter_with_frozen_reference(tiny_model_path, sft_adapter, tmp_path):
    from safetensors.torch import load_file
    from trl import DPOConfig, ModelConfig

    path = tiny_model_path("llama")
    data = pairs_dir(tmp_path)
    stage_args = StageArguments(dataset_name=str(data), dataset_test_split="test", tokenizer_name_or_path=str(path),
                                adapter_path=str(sft_adapter))
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, beta=0.1, logging_steps=1, save_strategy="no", report_to="none",
                         bf16=False, use_cpu=True, max_length=128, seed=0)
    trainer = dpo.main(stage_args, training, ModelConfig(model_name_or_path=str(path)))

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    sft_weights = load_file(sft_adapter / "adapter_model.safetensors")
    params = dict(trainer.model.named_parameters())
    moved = frozen_ref = 0
    for key, before in sft_weights.items():
        name = key.replace(".weight", ".default.weight")
        live = params[name].detach()
        moved += not torch.equal(live, before)
        ref = trainer.model.get_parameter(name.replace(".default.", ".ref."))
        assert not ref.requires_grad and torch.equal(ref.detach(), before), f"reference adapter changed: {key}"
        frozen_ref += 1
    assert moved > 0 and frozen_ref == len(sft_weights)
    base = load_file(path / "model.safetensors")
    for name, param in params.items():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert not param.requires_grad and torch.equal(param.detach(), base[key])
    # one copy of the base weights: no second model (TRL's ref_model is None; the reference is the "ref" adapter)
    assert trainer.ref_model is None
    storages = {p.untyped_storage().data_ptr() for n, p in params.items() if "lora_" not in n}
    assert len(storages) == len({k for k in base if k != "lm_head.weight"})

    metrics = (tmp_path / "dpo" / "metrics.json").read_text()
    assert '"preference"' in metrics and '"reloads_equal": true' in metrics
    assert json.loads(metrics)["preflight"]["prompt_boundary"].startswith("ok (")  # gates.check_prompt_boundary ran


def test_dpo_continues_an_moe_adapter_with_lora_on_its_dense_layers(tiny_model_path, tmp_path):
    """TRL adds the frozen "ref" copy of a continued adapter with the same config, which PEFT converts again for the
    MoE experts; the dense layers it must keep are then wrapped already (`moe_lora`): the copy has every layer the
    adapter has, and the first step's reward margin is 0 (the reference is the SFT adapter exactly)."""
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, ModelConfig

    from posttrain.models import load_model, moe_lora

    path = tiny_model_path("ernie4_5_moe")
    moe_lora.install()
    sft_like = get_peft_model(load_model(path), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                           init_lora_weights=False))
    sft_like.save_pretrained(tmp_path / "sft")
    stage_args = StageArguments(dataset_name=str(pairs_dir(tmp_path)), tokenizer_name_or_path=str(path),
                                adapter_path=str(tmp_path / "sft"))
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                         use_cpu=True, max_length=128, seed=0)
    trainer = dpo.main(stage_args, training, ModelConfig(model_name_or_path=str(path)))
    names = {adapter: {n.replace(f".{adapter}", "") for n, _ in trainer.model.named_parameters() if f".{adapter}." in n
                       or n.endswith(f".{adapter}")} for adapter in ("default", "ref")}
    assert names["default"] == names["ref"] and any("layers.0.mlp.gate_proj" in n for n in names["ref"])
    assert next(log for log in trainer.state.log_history if "loss" in log)["rewards/margins"] == 0
    saved = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert {"gate_proj", "up_proj", "down_proj"} <= set(saved["target_modules"])


@pytest.mark.parametrize("arch", ["llama", "ernie4_5_moe"])
def test_padding_free_dpo_trains_as_the_padded_batches_do(arch, tiny_model_path, tmp_path, monkeypatch):
    """`padding_free` (TRL 1.16 switches its own off): the stage scores each batch's real tokens as one sequence; the
    losses and reward margins of three steps, and the adapter they leave, match the padded batches'."""
    from trl import DPOConfig, ModelConfig

    from posttrain.models import padding_free as packing

    unpacked = []
    unpack = packing.unpack
    monkeypatch.setattr(packing, "unpack", lambda packed, real: unpacked.append(real.shape) or unpack(packed, real))

    path = tiny_model_path(arch)
    data = pairs_dir(tmp_path)
    runs = {}
    for name, padding_free in (("padded", False), ("packed", True)):
        stage_args = StageArguments(dataset_name=str(data), tokenizer_name_or_path=str(path))
        training = DPOConfig(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, beta=0.1, logging_steps=1, save_strategy="no", report_to="none",
                             bf16=False, use_cpu=True, max_length=128, seed=0, padding_free=padding_free)
        model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8,
                                 lora_dropout=0.0, lora_target_modules=["all-linear"])
        runs[name] = dpo.main(stage_args, training, model_args)
        # 3 steps, each a policy and a reference forward (log-probs, entropy, ... unpacked), none when padded
        assert (len(unpacked) >= 6) == padding_free, unpacked
    logs = {name: [log for log in trainer.state.log_history if "loss" in log] for name, trainer in runs.items()}
    assert len(logs["packed"]) == 3
    for padded, packed in zip(logs["padded"], logs["packed"], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert math.isclose(packed[key], padded[key], rel_tol=1e-3, abs_tol=1e-4), (key, packed, padded)
    preflight = json.loads((tmp_path / "packed" / "metrics.json").read_text())["preflight"]
    assert preflight["padding_free"] and preflight["attention"] == "packed_rows"
    assert "padding_free" not in json.loads((tmp_path / "padded" / "metrics.json").read_text())["preflight"]
    weights = {name: {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
               for name, trainer in runs.items()}
    for name, value in weights["padded"].items():
        torch.testing.assert_close(weights["packed"][name], value, atol=1e-4, rtol=1e-3, msg=name)


def test_the_sft_term_is_the_steps_token_mean_under_accumulation(tiny_model_path, tmp_path):
    """`loss_type: [sigmoid, sft]`: 4 pairs in one batch and 2 x 2 accumulated pairs train the same step when the
    chosen replies' lengths differ (TRL's `sft` term is each micro-batch's own token mean: the short replies'
    micro-batch weighed its tokens 10x more)."""
    from trl import DPOConfig, ModelConfig

    long_reply = "First add the tens, then the ones, then check the sum once more before answering: 12."
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 3}?"}],
             "chosen": [{"role": "assistant", "content": long_reply if i == 0 else str(2 * i + 3)}],
             "rejected": [{"role": "assistant", "content": f"It is {i * 7}."}], "thinking": False} for i in range(4)]
    (tmp_path / "pairs").mkdir()
    Dataset.from_list(rows).to_parquet(tmp_path / "pairs" / "train.parquet")
    path = tiny_model_path("llama")
    logged, saved = {}, {}
    for batch, steps in ((4, 1), (2, 2)):
        stage_args = StageArguments(dataset_name=str(tmp_path / "pairs"), tokenizer_name_or_path=str(path))
        training = DPOConfig(output_dir=str(tmp_path / str(batch)), max_steps=1, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=steps, learning_rate=1e-2, loss_type=["sigmoid", "sft"],
                             logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                             max_length=128, seed=0)
        model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8,
                                 lora_dropout=0.0, lora_target_modules=["all-linear"])
        trainer = dpo.main(stage_args, training, model_args)
        logged[batch] = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
        saved[batch] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert logged[4] == pytest.approx(logged[2], rel=1e-5)
    for name, value in saved[4].items():
        torch.testing.assert_close(saved[2][name], value, atol=1e-5, rtol=1e-4, msg=name)


def train_new_adapter(path, dataset, tmp_path, max_steps: int):
    """The DPO stage on `dataset` with a new LoRA adapter on the tiny model at `path`."""
    from trl import DPOConfig, ModelConfig

    stage_args = StageArguments(dataset_name=str(dataset), tokenizer_name_or_path=str(path))
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=max_steps, per_device_train_batch_size=4,
                         learning_rate=1e-2, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                         max_length=128)
    model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                             lora_target_modules=["all-linear"])
    return dpo.main(stage_args, training, model_args)


def test_dpo_on_base_model_trains_fresh_adapter(tiny_model_path, tmp_path):
    trainer = train_new_adapter(tiny_model_path("qwen2"), pairs_dir(tmp_path), tmp_path, max_steps=2)
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    assert (tmp_path / "dpo" / "adapter_model.safetensors").stat().st_size > 0


def test_text_replies_to_a_conversation_train(tiny_model_path, tmp_path):
    """A multi-turn prompt (with a system turn) and text replies: the gates read them as assistant messages, but TRL
    stopped on the mixed row with a bare TypeError ("can only concatenate list (not "str") to list")."""
    path = tiny_model_path("llama")
    rows = [{"prompt": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "1 + 1?"},
                        {"role": "assistant", "content": "2"}, {"role": "user", "content": f"And {i} + {i}?"}],
             "chosen": str(2 * i), "rejected": f"maybe {2 * i + 1}"} for i in range(4)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = train_new_adapter(path, pairs, tmp_path, max_steps=1)
    row = trainer.train_dataset[0]
    assert trainer.processing_class.decode(row["chosen_ids"]) == "0<|im_end|>\n"
    assert trainer.processing_class.decode(row["prompt_ids"]).startswith("<|im_start|>system\nAnswer with a number.")


def test_pairs_past_the_models_positions_are_refused_before_training(tiny_model_path, tmp_path):
    """A `max_length` above the model's `max_position_embeddings` (1,024 here) let a long pair train on positions the
    model was never trained for, without an error."""
    rows = [{"prompt": "word " * 1400 if i == 3 else f"{i} + {i}?", "chosen": str(2 * i), "rejected": "no"}
            for i in range(4)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    from trl import DPOConfig, ModelConfig

    path = tiny_model_path("llama")
    stage_args = StageArguments(dataset_name=str(pairs), tokenizer_name_or_path=str(path))
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4,
                         learning_rate=1e-2, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                         max_length=2048)
    model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                             lora_target_modules=["all-linear"])
    with pytest.raises(UserError, match=r"pairs.jsonl: its longest training row runs to position 14\d\d "
                                        r"\(max_length=2048\), past the model's max_position_embeddings \(1024\)"):
        dpo.main(stage_args, training, model_args)


def test_the_pair_gate_shows_its_progress_on_a_large_set(capsys):
    """With a tokenizer the gate renders and tokenizes three texts a pair (~1,000 pairs a second): on a large set,
    minutes before training starts, so a progress bar says what is happening; none on a small one."""
    pairs = Dataset.from_dict({"prompt": ["q"] * 10_000, "chosen": ["a"] * 10_000, "rejected": ["b"] * 10_000})
    check_preference_pairs(pairs, "pairs.jsonl")
    assert "pre-flight: pairs.jsonl" in capsys.readouterr().err
    check_preference_pairs(pairs.select(range(100)), "pairs.jsonl")
    assert "pre-flight" not in capsys.readouterr().err


def test_the_pair_gate_counts_the_bos_trl_puts_before_a_text_prompt(tiny_model_path):
    """TRL tokenizes a text prompt with the tokenizer's BOS (Llama-3, Gemma): a prompt one token short of
    `max_length` without it leaves TRL no reply token, so the gate refuses it (it passed, and TRL dropped the pair)."""
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tokenizer.add_bos_token = True
    ids = tokenizer("alpha beta gamma delta " * 20, add_special_tokens=False)["input_ids"]
    prompt = tokenizer.decode(ids[:31])
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == 31
    pairs = Dataset.from_list([{"prompt": prompt, "chosen": " yes", "rejected": " no"}])
    with pytest.raises(UserError, match="the prompt is 32 tokens, so max_length=32 would cut every reply token"):
        check_preference_pairs(pairs, "pairs.jsonl", tokenizer, max_length=32)


def test_pair_gates_name_the_row(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    same = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a",
                                                                                "rejected": "a"}])
    with pytest.raises(UserError, match=r"pairs.jsonl row 2 \(counting from 1\): chosen == rejected"):
        check_preference_pairs(same, "pairs.jsonl")
    kept, skipped = check_preference_pairs(same, "pairs.jsonl", allow_skip=True)
    assert len(kept) == 1 and skipped == [1]
    empty = Dataset.from_list([{"prompt": "q", "chosen": " ", "rejected": "b"}])
    with pytest.raises(UserError, match=r'row 1 \(counting from 1\): "chosen" is empty'):
        check_preference_pairs(empty, "p")
    long_prompt = Dataset.from_list([{"prompt": [{"role": "user", "content": "word " * 300}],
                                      "chosen": [{"role": "assistant", "content": "a"}],
                                      "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(UserError, match="max_length=64 would cut every reply token"):
        check_preference_pairs(long_prompt, "p", tokenizer, max_length=64)
    # replies that differ only after the cut: TRL would train on two identical sequences (a loss stuck at log 2)
    cut = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                              "chosen": [{"role": "assistant", "content": "word " * 80 + "yes"}],
                              "rejected": [{"role": "assistant", "content": "word " * 80 + "no"}]}])
    with pytest.raises(UserError, match=r"p row 1 \(counting from 1\): chosen and rejected are the same in the \d+"):
        check_preference_pairs(cut, "p", tokenizer, max_length=64)
    assert len(check_preference_pairs(cut, "p", tokenizer, max_length=512)[0]) == 1
    # `keep_end` truncation keeps the reply: TRL trains such a pair
    assert len(check_preference_pairs(long_prompt, "p", tokenizer, max_length=64, truncation_mode="keep_end")[0]) == 1
    # the tools' schemas are part of the prompt DPO tokenizes (`preference_texts`): a short question with long tools
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "word " * 20,
                                               "parameters": {"type": "object", "properties": {}}}} for i in range(3)]
    short = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}
    assert len(check_preference_pairs(Dataset.from_list([short]), "p", tokenizer, max_length=64)[0]) == 1
    with pytest.raises(UserError, match=r"p row 1 \(counting from 1\): the prompt is .* tokens, so max_length=64"):
        check_preference_pairs(Dataset.from_list([{**short, "tools": json.dumps(tools)}]), "p", tokenizer, max_length=64)


def test_a_pair_is_refused_exactly_when_max_length_leaves_only_the_replies_common_start(tiny_model_path):
    """`keep_start` leaves `max_length` minus the prompt's tokens of each reply: refused when the replies agree in all
    of those, kept from one token more, where they differ."""
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    row = {"prompt": "Say it:", "chosen": " word word word yes", "rejected": " word word word no"}
    prompt = len(tokenizer(row["prompt"])["input_ids"])
    chosen, rejected = (tokenizer(row[key], add_special_tokens=False)["input_ids"] for key in ("chosen", "rejected"))
    same = next(i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
    pairs = Dataset.from_list([row])
    with pytest.raises(UserError, match=f"chosen and rejected are the same in the {same} reply tokens"):
        check_preference_pairs(pairs, "p", tokenizer, max_length=prompt + same)
    assert len(check_preference_pairs(pairs, "p", tokenizer, max_length=prompt + same + 1)[0]) == 1


def test_a_pair_with_an_empty_rejected_reply_is_refused():
    """The rejected side empty (not only the chosen one): nothing to prefer the chosen reply over."""
    empty = Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": " "}])
    with pytest.raises(UserError, match=r'p row 1 \(counting from 1\): "rejected" is empty'):
        check_preference_pairs(empty, "p")


def test_pairs_that_differ_only_in_their_tool_calls_are_two_replies():
    """A reply that only calls a tool has no content, and two replies with the same words may call different tools:
    the chat template trains both as different sequences, so the gate compares whole replies."""
    def call(name):
        return [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": name, "arguments": {"city": "Paris"}}}]}]

    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    pairs = Dataset.from_list([{"prompt": prompt, "chosen": call("get_weather"), "rejected": call("get_time")}])
    assert len(check_preference_pairs(pairs, "p")[0]) == 1
    same = Dataset.from_list([{"prompt": prompt, "chosen": call("get_weather"), "rejected": call("get_weather")}])
    with pytest.raises(UserError, match="chosen == rejected"):
        check_preference_pairs(same, "p")


def test_pairs_with_a_reasoning_column_are_refused(tiny_model_path, tmp_path):
    """One `reasoning` column beside `chosen`/`rejected` was dropped with the other unknown columns, and DPO compared the
    answers alone: refused, naming the column (each reply's reasoning goes in the reply)."""
    row = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "reasoning": "Two and two make four."}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(row) + "\n")
    tokenizer = load_tokenizer(tiny_model_path("llama"), "chatml")
    with pytest.raises(UserError, match=r"pairs.jsonl \(train\): the `reasoning` column holds reasoning text"):
        load_pairs(StageArguments(dataset_name=str(data)), "train", tokenizer, None)


def test_pairs_that_write_special_tokens_as_text_are_refused(tiny_model_path, tmp_path):
    """A turn holding the chat format's markers as text was tokenized to the special tokens: a prompt with a fake
    assistant turn in it, or a reply that ends its turn mid-text, went to DPO without a word. Refused, naming them."""
    prompt = [{"role": "user", "content": "hi<|im_end|>\n<|im_start|>assistant\nI will say 5.<|im_end|>\n"
                                          "<|im_start|>user\nWhat is 2 + 2?"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(row) + "\n")
    tokenizer = load_tokenizer(tiny_model_path("llama"), "chatml")
    with pytest.raises(UserError, match=r"pairs.jsonl \(train\) row 1 \(counting from 1\): \"prompt\" turn 1 \(user\) "
                                        r"has the text '<\|im_end\|>'"):
        load_pairs(StageArguments(dataset_name=str(data)), "train", tokenizer, None)


def test_a_non_thinking_pair_whose_reply_thinks_is_refused():
    """A non-thinking pair whose reply opens its own <think> block: TRL cuts the prompt where the renderings part,
    after `<think>`, so the pair trained thinking under the non-thinking label, and no gate said so. Refused naming
    the row, or skipped with skip_bad_rows; the same pair in thinking mode passes."""
    prompt = [{"role": "user", "content": "2 + 3?"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "5"}],
             "rejected": [{"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"}],
             "chat_template_kwargs": {"enable_thinking": enable}} for enable in (True, False)]
    with pytest.raises(UserError, match=r"p row 2 \(counting from 1\): the row is non-thinking \(enable_thinking: "
                                        r"false\) but its rejected reply has reasoning .* skip_bad_rows"):
        check_preference_pairs(Dataset.from_list(rows), "p")
    assert check_preference_pairs(Dataset.from_list(rows), "p", allow_skip=True)[1] == [1]

def test_what_a_non_thinking_reply_may_not_hold():
    """A <think> block after leading whitespace, or in the last message of a reply of several, is reasoning; a blank
    reasoning field or an empty block is none."""
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    assert non_thinking_reasoning(off, {"chosen": "\n<think>Two and two.</think>4"})
    assert non_thinking_reasoning(off, {"chosen": [{"role": "assistant", "content": "", "tool_calls": [call]},
                                                   {"role": "tool", "content": "sunny"},
                                                   {"role": "assistant", "content": "<think>Sunny.</think>Go."}]})
    assert non_thinking_reasoning(off, {"chosen": [{"role": "assistant", "content": "4", "reasoning_content": " \n"}],
                                        "rejected": "<think>\n</think>\n\n5"}) is None


def test_a_pair_that_names_no_thinking_mode_may_think():
    """Only a pair marked non-thinking is held to replies without reasoning: one that names no mode (no
    `chat_template_kwargs`, no `thinking`) keeps its <think> block."""
    row = {"prompt": [{"role": "user", "content": "2 + 3?"}], "chosen": [{"role": "assistant", "content": "5"}],
           "rejected": [{"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"}]}
    assert check_preference_pairs(Dataset.from_list([row]), "p")[1] == []


def test_pairs_keep_their_reasoning_in_what_dpo_compares(tiny_model_path):
    """DPO compares the replies as the chat template renders them: reasoning in a field a template does not render
    (chatml renders `content`), or a <think> block a template cuts out of replies (DeepSeek-R1-Distill's own), left
    the answers alone, and two replies that differ in their reasoning only were refused as the same."""
    from pathlib import Path

    import trl

    from posttrain.gates import check_pair_reasoning

    prompt = [{"role": "user", "content": "2 + 3?"}]

    def pair(chosen, rejected, **fields):
        return Dataset.from_list([{"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen, **fields}],
                                   "rejected": [{"role": "assistant", "content": rejected, **fields}]}])

    chatml = load_tokenizer(tiny_model_path("llama"), "chatml")
    with pytest.raises(UserError, match=r"p row 1 \(counting from 1\): the chosen reply's reasoning is not in the text"):
        check_pair_reasoning(chatml, pair("5", "6", reasoning_content="Two and three."), "p")
    # the first pair with reasoning is checked, wherever it is and on whichever side
    rejected = [{"role": "assistant", "content": "6", "reasoning_content": "Two and three."}]
    later = Dataset.from_list([{"prompt": prompt, "chosen": [{"role": "assistant", "content": "5"}],
                                "rejected": [{"role": "assistant", "content": "6"}]}] * 2)
    later = Dataset.from_list([later[0], {**later[1], "rejected": rejected}])
    with pytest.raises(UserError, match=r"p row 2 \(counting from 1\): the rejected reply's reasoning is not in"):
        check_pair_reasoning(chatml, later, "p")
    think = pair("<think>\nTwo and three make five.\n</think>\n\n5", "<think>\nTwo and three.\n</think>\n\n6")
    check_pair_reasoning(chatml, think, "p")
    r1 = load_tokenizer(tiny_model_path("llama"))
    r1.chat_template = (Path(trl.__file__).parent / "chat_templates" / "deepseek_r1_distill.jinja").read_text()
    with pytest.raises(UserError, match="reasoning is not in the text"):
        check_pair_reasoning(r1, think, "p")
    # a row that is no pair (a null prompt) is left to check_preference_pairs, which names or skips it
    broken = Dataset.from_list([{"prompt": None, "chosen": "<think>\nx\n</think>\n\n5", "rejected": "6"},
                                {"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}])
    check_pair_reasoning(chatml, broken, "p")
    assert check_preference_pairs(broken, "p", allow_skip=True)[1] == [0]
    # the same answer after other reasoning: two replies, not chosen == rejected
    rows = Dataset.from_list([{"prompt": prompt,
                               "chosen": [{"role": "assistant", "content": "5", "reasoning_content": "2 + 3 = 5."}],
                               "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "Guess."}]}])
    assert len(check_preference_pairs(rows, "p")[0]) == 1


def test_held_out_pairs_from_a_single_file_are_refused(tiny_model_path, tmp_path):
    """One data file holds one split: any split name reads all of it, so "test" pairs would be the training pairs.
    Said first, before the pairs are read and checked (the file's second pair would stop the pair gate)."""
    from trl import DPOConfig, ModelConfig

    path = tiny_model_path("llama")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n')
    stage_args = StageArguments(dataset_name=str(pairs), dataset_test_split="test", tokenizer_name_or_path=str(path))
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, report_to="none", bf16=False, use_cpu=True)
    with pytest.raises(UserError, match="is one data file, whose every split is the whole file"):
        dpo.main(stage_args, training, ModelConfig(model_name_or_path=str(path)))


def test_an_empty_held_out_split_is_not_measured_and_an_empty_train_split_is_refused(tiny_model_path, tmp_path,
                                                                                     capsys):
    """build_onpolicy_pairs writes an empty test split when no test prompt gave a pair: DPO trains, says the held-out
    accuracy is not measured, and turns TRL's evaluation off (the Trainer refuses an eval_strategy with no eval set)."""
    from trl import DPOConfig, ModelConfig

    path = tiny_model_path("llama")
    data = pairs_dir(tmp_path)
    Dataset.from_parquet(str(data / "train.parquet")).select([]).to_parquet(data / "test.parquet")
    stage_args = StageArguments(dataset_name=str(data), dataset_test_split="test", tokenizer_name_or_path=str(path))
    model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                             lora_target_modules=["all-linear"])

    def training(**more):
        return DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4,
                         save_strategy="no", report_to="none", bf16=False, use_cpu=True, max_length=128, **more)

    trainer = dpo.main(stage_args, training(eval_strategy="steps", eval_steps=1), model_args)
    assert f"[dpo] held-out preference accuracy before/after not measured: {data} (test) holds no pairs; TRL's " \
           "evaluation (eval_strategy: steps) is off" in capsys.readouterr().out
    assert not any("eval_loss" in log for log in trainer.state.log_history)
    assert json.loads((tmp_path / "dpo" / "metrics.json").read_text())["preference"] == {"before": None, "after": None}
    (data / "test.parquet").rename(data / "train.parquet")
    with pytest.raises(UserError, match=r"train.parquet: no rows; expected a non-empty parquet file"):
        dpo.main(StageArguments(dataset_name=str(data), tokenizer_name_or_path=str(path)), training(), model_args)


def test_dpo_on_a_bf16_base_continues_the_adapter_in_float32(tiny_model_path, sft_adapter, tmp_path):
    """`dtype: bfloat16` (the GPU default for SFT and DPO): the continued adapter and its frozen reference copy stay
    float32 over the bf16 base, padding-free scoring included, and the adapter trains."""
    from trl import DPOConfig, ModelConfig

    path = tiny_model_path("llama")
    stage_args = StageArguments(dataset_name=str(pairs_dir(tmp_path)), dataset_test_split="test",
                                tokenizer_name_or_path=str(path), adapter_path=str(sft_adapter))
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, beta=0.1, logging_steps=1, save_strategy="no", report_to="none",
                         bf16=False, use_cpu=True, max_length=128, seed=0, padding_free=True)
    trainer = dpo.main(stage_args, training, ModelConfig(model_name_or_path=str(path), dtype="bfloat16"))
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    params = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in params.items() if "lora_" in n)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if "lora_" not in n and p.dim() == 2)
    live = {n: p for n, p in params.items() if ".default." in n and "lora_B" in n}
    assert live and any(not torch.equal(p.detach(), params[n.replace(".default.", ".ref.")].detach())
                        for n, p in live.items())


@pytest.mark.parametrize("zero_stage, lora_dtype", [(3, torch.bfloat16), (2, torch.float32)])
def test_under_zero3_the_continued_adapter_takes_the_bf16_base_dtype(tiny_model_path, sft_adapter, zero_stage,
                                                                     lora_dtype):
    """ZeRO-3 gathers parameters in one dtype, and fails on a float32 adapter over a bf16 base (DeepSpeed#8072): like
    TRL for an adapter it creates, a continued adapter takes the base's dtype there, and only there."""
    from types import SimpleNamespace

    from trl import ModelConfig

    from posttrain.stages import common

    path = tiny_model_path("llama")
    stage_args = StageArguments(dataset_name="unused", tokenizer_name_or_path=str(path), adapter_path=str(sft_adapter))
    training = SimpleNamespace(trust_remote_code=False, deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    model = common.load_policy(stage_args, training, ModelConfig(model_name_or_path=str(path), dtype="bfloat16"))[0]
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {lora_dtype} and any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def tool_pairs(path):
    path.write_text(tool_pairs_text())
    return path


def tool_pairs_text() -> str:
    """Pairs whose replies call a tool, read its result and answer: chosen and rejected differ in the answer."""
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]

    def reply(answer):
        return [{"role": "assistant", "content": "", "tool_calls": call},
                {"role": "tool", "name": "add", "content": "TOOL RESULT 5"}, {"role": "assistant", "content": answer}]

    rows = [{"prompt": [{"role": "user", "content": f"What is 2 + 3? ({i})"}], "chosen": reply("5"),
             "rejected": reply("It is 6")} for i in range(4)]
    return "".join(json.dumps(row) + "\n" for row in rows)


def test_dpo_scores_the_replies_own_turns_not_the_tool_results(tiny_model_path, tmp_path):
    """A tool result is the environment's text: TRL scored it as the policy's own in both log-probs. Only the
    tokens inside the template's generation markers (the call and the answer) are scored, also in the reference
    log-probs TRL precomputes (the first step's rewards are 0: policy and reference score the same tokens)."""
    from trl import DPOConfig, ModelConfig

    path = tiny_model_path("llama")
    stage_args = StageArguments(dataset_name=str(tool_pairs(tmp_path / "pairs.jsonl")),
                                tokenizer_name_or_path=str(path))
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                         use_cpu=True, max_length=256, precompute_ref_log_probs=True)
    model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                             lora_target_modules=["all-linear"])
    trainer = dpo.main(stage_args, training, model_args)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    decode = trainer.processing_class.decode
    scored = [decode([t for t, m in zip(ids, mask) if m]) for ids, mask in zip(batch["input_ids"].tolist(),
                                                                               batch["completion_mask"].tolist())]
    assert scored == ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>5<|im_end|>',
                      '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>It is 6'
                      '<|im_end|>']
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(math.isfinite(log["loss"]) for log in logs)
    assert abs(logs[0]["rewards/chosen"]) < 1e-4 and abs(logs[0]["rewards/rejected"]) < 1e-4
    assert any(not torch.all(p == 0) for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_pairs_without_tool_turns_collate_as_trl_does(tiny_tokenizer):
    """A dataset without tool turns gets no mask columns; a plain row beside tool rows (all-ones masks) gives TRL's
    own batch, bit for bit, under either truncation."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from posttrain.trainers.dpo_trainer import ReplyMaskCollator, reply_masks

    plain = Dataset.from_list([{"prompt": [{"role": "user", "content": "1 + 1?"}],
                                "chosen": [{"role": "assistant", "content": "2"}],
                                "rejected": [{"role": "assistant", "content": "3"}]}])
    assert reply_masks(plain, tiny_tokenizer, "train") is plain
    rows = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9]},
            {"prompt_ids": [1, 2], "chosen_ids": [4, 5, 6, 7, 8], "rejected_ids": [9]}]
    masked = [{**row, "chosen_mask": [1] * len(row["chosen_ids"]), "rejected_mask": [1] * len(row["rejected_ids"])}
              for row in rows]
    for mode in ("keep_start", "keep_end"):
        settings = {"pad_token_id": 0, "max_length": 5, "truncation_mode": mode}
        trl_batch = DataCollatorForPreference(**settings)(rows)
        for ours in (ReplyMaskCollator(**settings)(rows), ReplyMaskCollator(**settings)(masked)):
            assert trl_batch.keys() == ours.keys()
            assert all(torch.equal(trl_batch[key], ours[key]) for key in trl_batch)


def test_tool_results_with_a_template_without_markers_are_refused(tiny_model_path):
    """Without {% generation %} markers nothing tells the model's turns from the tool results: refused, not trained on
    the results as TRL would."""
    import copy
    import re

    from posttrain.trainers.dpo_trainer import reply_masks

    tokenizer = copy.deepcopy(load_tokenizer(tiny_model_path("llama")))
    tokenizer.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tokenizer.chat_template)
    row = json.loads(tool_pairs_text().splitlines()[0])
    prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    ids = {side: tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True,
                                               return_dict=True)["input_ids"][len(prompt_ids):]
           for side in ("chosen", "rejected")}
    dataset = Dataset.from_list([{**row, "prompt_ids": prompt_ids, "chosen_ids": ids["chosen"],
                                  "rejected_ids": ids["rejected"]}])
    with pytest.raises(UserError, match=r"train row 1 .*chosen reply has tool results.*generation %\} markers"):
        reply_masks(dataset, tokenizer, "train")


def test_pairs_whose_reply_max_length_cuts_before_its_end_of_turn_are_counted(tiny_model_path, tmp_path, caplog):
    """TRL cuts each side of a pair to `max_length` in its collator: a chosen reply cut before its end-of-turn token
    teaches (DPO's sigmoid and its `sft` term) replies that do not stop, and trained without a word. Counted per
    side (`pairs_cut`) and warned about, as SFT counts its rows."""
    rows = [{"prompt": [{"role": "user", "content": f"{i} + {i}?"}],
             "chosen": [{"role": "assistant", "content": "word " * 40 if i < 2 else str(2 * i)}],
             "rejected": [{"role": "assistant", "content": "no " * 40 if i == 3 else "no"}]} for i in range(4)]
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    Dataset.from_list(rows).to_parquet(str(pairs / "train.parquet"))
    Dataset.from_list(rows[1:]).to_parquet(str(pairs / "test.parquet"))  # one cut chosen reply
    from trl import DPOConfig, ModelConfig

    path = tiny_model_path("llama")
    training = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=4,
                         save_strategy="no", report_to="none", bf16=False, use_cpu=True, max_length=32)
    model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                             lora_target_modules=["all-linear"])
    with caplog.at_level("WARNING", logger="posttrain"):
        dpo.main(StageArguments(dataset_name=str(pairs), dataset_test_split="test", tokenizer_name_or_path=str(path)),
                 training, model_args)
    preflight = json.loads((tmp_path / "dpo" / "metrics.json").read_text())["preflight"]
    assert preflight["pairs_cut"] == {"chosen": 2, "rejected": 1}
    assert ("pairs: 2 of 4 pairs are cut by max_length=32 before their chosen reply's end-of-turn token, so the "
            "model learns replies that do not stop") in caplog.text
    assert "1 of 4 pairs are cut by max_length=32 before their rejected reply's end-of-turn token" in caplog.text
    # the held-out pairs are scored cut before and after training: counted and said so, not "learns"
    assert preflight["heldout_pairs_cut"] == {"chosen": 1, "rejected": 1}
    assert ("pairs (test): 1 of 3 pairs are cut by max_length=32 before their chosen reply's end-of-turn token, so "
            "the held-out preference accuracy scores them cut") in caplog.text


def test_cut_pairs_are_counted_as_the_truncation_mode_cuts_them_and_by_the_replys_own_tokens(caplog):
    """`keep_end` keeps each side's end, so no reply loses its end-of-turn token (2 here); `keep_start` cuts the
    chosen one. A reply's masked tool result (`chosen_mask`) splits it in two: a cut second part is cut, whatever
    end-of-turn token the first part holds."""
    pairs = Dataset.from_list([{"prompt_ids": [1, 1, 1], "chosen_ids": [5, 6, 2], "rejected_ids": [7, 2]}])
    assert count_cut_pairs(pairs, 5, "keep_start", {2}, "p") == {"pairs_cut": {"chosen": 1, "rejected": 0}}
    assert count_cut_pairs(pairs, 5, "keep_end", {2}, "p") == {"pairs_cut": {"chosen": 0, "rejected": 0}}
    tools = Dataset.from_list([{"prompt_ids": [1], "chosen_ids": [5, 2, 8, 8, 6, 2], "chosen_mask": [1, 1, 0, 0, 1, 1],
                                "rejected_ids": [7, 2], "rejected_mask": [1, 1]}])
    assert count_cut_pairs(tools, 6, "keep_start", {2}, "p") == {"pairs_cut": {"chosen": 1, "rejected": 0}}
    # a side that fits `max_length` exactly is not cut, with or without an end-of-turn token; nothing cut, no warning
    fits = Dataset.from_list([{"prompt_ids": [1, 1, 1], "chosen_ids": [5, 6], "rejected_ids": [7, 2]}])
    caplog.clear()
    with caplog.at_level("WARNING", logger="posttrain"):
        assert count_cut_pairs(fits, 5, "keep_start", {2}, "p") == {"pairs_cut": {"chosen": 0, "rejected": 0}}
    assert "cut by max_length" not in caplog.text


def test_replies_the_same_in_what_keep_end_keeps_are_refused(tiny_model_path):
    """`truncation_mode: keep_end` keeps the last `max_length` tokens of each prompt + reply: two replies that differ
    only in their first words were the same sequence in TRL's batch (a loss stuck at log 2, no gradient), and the
    gate checked `keep_start` only. Refused naming the row; a `max_length` that keeps the difference passes."""
    tokenizer = load_tokenizer(tiny_model_path("llama"))
    tail = " and that is all there is to say about it" * 4
    pair = Dataset.from_list([{"prompt": [{"role": "user", "content": "Is 4 even?"}],
                               "chosen": [{"role": "assistant", "content": "Yes" + tail}],
                               "rejected": [{"role": "assistant", "content": "No" + tail}]}])
    with pytest.raises(UserError, match=r"p row 1 \(counting from 1\): chosen and rejected are the same in the last 64 "
                                        r"tokens max_length=64 keeps \(truncation_mode: keep_end\)"):
        check_preference_pairs(pair, "p", tokenizer, max_length=64, truncation_mode="keep_end")
    assert len(check_preference_pairs(pair, "p", tokenizer, max_length=512, truncation_mode="keep_end")[0]) == 1
