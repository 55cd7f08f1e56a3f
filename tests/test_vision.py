"""Vision-language path on tiny VLMs: each stage trains LoRA on the language tower with images; gates and data errors.

One SFT -> DPO -> UPO chain per tiny VLM (LLaVA with its projector in `lora_modules_to_save`; Qwen2-VL and
ERNIE-4.5-VL, whose MoE layer routes tokens to text or vision experts, with the whole vision side frozen), a few steps
each, plus the pre-flight gates, ERNIE-4.5-VL's routing where TRL does not lay it out, the data-prep checks, and
`recipes/tiny/vision.yaml` through the real CLI. That run starts in a background process when the module starts, so on
2 cores it runs beside the in-process tests (about 45 s either way) instead of after them; the last test waits for it.
"""

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from posttrain import gates
from posttrain.configs import StageArguments
from posttrain.data import load_split
from posttrain.errors import UserError
from posttrain.models import load_model, load_tokenizer, vision

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["llava", "qwen2_vl", "ernie4_5_vl"]
# LLaVA trains its projector in SFT (then frozen); Qwen2-VL and ERNIE-4.5-VL keep their vision side frozen throughout
MODULES_TO_SAVE = {"llava": ["multi_modal_projector"], "qwen2_vl": None, "ernie4_5_vl": None}


@pytest.fixture(scope="module")
def tiny_vision_run(tmp_path_factory):
    """`posttrain run recipes/tiny/vision.yaml` in a subprocess, started now, finished by `test_tiny_vision_recipe`."""
    cwd = tmp_path_factory.mktemp("cli")
    process = subprocess.Popen([sys.executable, "-m", "posttrain", "run", str(ROOT / "recipes" / "tiny" / "vision.yaml")],
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"}, start_new_session=True)
    yield cwd, process
    if process.poll() is None:  # e.g. only some tests were selected: do not leave it running
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


pytestmark = pytest.mark.usefixtures("tiny_vision_run")


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    """easy-VQA tasks (sft / prompts / test) and image preference pairs (train / test) built from them."""
    from data_prep.build_onpolicy_pairs import image_pairs_dataset as to_dataset
    from data_prep.build_vqa_tasks import main

    out = tmp_path_factory.mktemp("vqa")
    assert main(["--output_dir", str(out / "tasks"), "--n_train", "24", "--n_test", "4"]) == 0
    rows = vision.as_rows(load_split(out / "tasks", "prompts"))
    pairs = [{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["completion"]}],
              "rejected": [{"role": "assistant", "content": "purple"}], "images": r["images"],
              "thinking": r["thinking"], "domain": r["domain"], "answer": r["answer"], "chosen_reward": 1.0,
              "rejected_reward": 0.0} for r in rows]
    (out / "pairs").mkdir()
    to_dataset(pairs[:8]).to_parquet(str(out / "pairs" / "train.parquet"))
    to_dataset(pairs[8:12]).to_parquet(str(out / "pairs" / "test.parquet"))
    return out


def stage_configs(config_cls, arch, tiny_model_path, out, data, split, adapter=None, test_split=None, **overrides):
    from trl import ModelConfig

    path = tiny_model_path(arch)
    stage_args = StageArguments(dataset_name=str(data), dataset_train_split=split, dataset_test_split=test_split,
                                max_train_samples=16,
                                tokenizer_name_or_path=str(path), adapter_path=adapter and str(adapter),
                                eval_dataset=str(data.parent / "tasks"), eval_limit=4, eval_max_new_tokens=4)
    training = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True, seed=0)
    model_args = ModelConfig(model_name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                             lora_target_modules=["all-linear"], lora_modules_to_save=overrides.pop("save", None))
    return stage_args, config_cls(**{**training, **overrides}), model_args


def vision_weights(model) -> dict:
    """The vision side's weights as the model uses them (the adapter's trained copy where there is one)."""
    names = vision.vision_modules(model)
    return {n.replace(".modules_to_save.default", "").removeprefix("base_model.model."): p.detach().clone()
            for n, p in model.named_parameters()
            if any(f".{m}." in n for m in names) and ".modules_to_save.ref." not in n and ".original_module." not in n}


def losses(trainer, key="loss"):
    values = [log[key] for log in trainer.state.log_history if key in log]
    assert values and all(math.isfinite(v) for v in values), f"{key}: {values}"
    return values


def lora_b(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B.default" in n}


@pytest.fixture(scope="module")
def chain(vqa, tiny_model_path, tmp_path_factory):
    """Run sft -> dpo -> upo for an architecture once; tests look at the trainers and the saved stages."""
    runs = {}

    def run(arch):
        if arch not in runs:
            runs[arch] = _chain(arch, vqa, tiny_model_path, tmp_path_factory.mktemp(arch))
        return runs[arch]

    return run


def _chain(arch, vqa, tiny_model_path, out):
    from trl import DPOConfig, SFTConfig

    from posttrain.data import completion_text
    from posttrain.rewards import REWARDS
    from posttrain.stages import dpo, sft, upo
    from posttrain.trainers import UPOConfig

    base = vision_weights(load_model(tiny_model_path(arch)))
    result = {"base": base}
    result["sft"] = sft.main(*stage_configs(SFTConfig, arch, tiny_model_path, out / "sft", vqa / "tasks", "sft",
                                            save=MODULES_TO_SAVE[arch], max_length=160))
    result["sft_vision"] = vision_weights(result["sft"].model)
    result["dpo"] = dpo.main(*stage_configs(DPOConfig, arch, tiny_model_path, out / "dpo", vqa / "pairs", "train",
                                            adapter=out / "sft", test_split="test", max_length=160))
    # a random tiny model is never right, and its rollouts all hit max length: reward their variety so groups differ
    REWARDS["variety"] = lambda completions, **kw: [len(set(completion_text(c))) / 10 for c in completions]
    try:
        result["upo"] = upo.main(*stage_configs(
            UPOConfig, arch, tiny_model_path, out / "upo", vqa / "tasks", "prompts", adapter=out / "dpo",
            rewards={"accuracy": 1.0, "variety": 1.0}, upo_lambda=0.5, upo_margin=0.0, num_generations=4,
            max_completion_length=6, chat_template_kwargs={"enable_thinking": False}), upo.CurriculumArguments())
    finally:
        del REWARDS["variety"]
    result["dirs"] = {stage: out / stage for stage in ("sft", "dpo", "upo")}
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_trains_language_lora_with_images(arch, chain, vqa):
    run = chain(arch)
    trainer = run["sft"]
    losses(trainer)
    model = trainer.model
    assert any(p.abs().sum() > 0 for p in lora_b(model).values()), "LoRA B starts at zero and must have moved"
    names = vision.vision_modules(model)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n and any(f".{m}." in n for m in names)], \
        "LoRA must stay out of the vision tower and projector"
    trained = [k for k in run["base"] if not torch.equal(run["base"][k], run["sft_vision"][k])]
    if MODULES_TO_SAVE[arch]:  # listed in lora_modules_to_save: trained in full, saved in the adapter
        assert trained and all("multi_modal_projector" in k for k in trained)
        saved = load_file(run["dirs"]["sft"] / "adapter_model.safetensors")
        assert any("multi_modal_projector" in k for k in saved)
    else:
        assert not trained, f"vision weights changed: {trained[:3]}"
    metrics = json.loads((run["dirs"]["sft"] / "metrics.json").read_text())
    assert metrics["adapter"]["reloads_equal"] and metrics["preflight"]["image_tokens"] > 0
    evaluation = metrics["eval"]
    assert {"accuracy", "format", "by_group", "samples"} <= set(evaluation)
    assert {"mode/thinking", "mode/non_thinking"} <= set(evaluation["by_group"])
    from posttrain.evaluate import load_rows

    questions = [next(part["text"] for part in row["prompt"][-1]["content"] if part["type"] == "text")
                 for row in load_rows(str(vqa / "tasks"), "test")]
    assert [s["prompt"] for s in evaluation["samples"]] == questions[:len(evaluation["samples"])], \
        "a sample shows its question's text, without the image part"


def test_sft_with_accumulation_trains_what_one_batch_trains(vqa, tiny_model_path, tmp_path):
    """4 rows in one batch and 2 x 2 accumulated rows train the same step, also on a VLM that declares its own loss
    deaf to `num_items_in_batch` (transformers then leaves the step's token count out, and each micro-batch's loss
    was its own mean: the loss moved by 0.03 and weights by 2 x the learning rate)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from trl import SFTConfig

    from posttrain.stages import sft

    arch = "ernie4_5_vl"
    config = AutoConfig.from_pretrained(tiny_model_path(arch))
    assert AutoModelForImageTextToText._model_mapping[type(config)].accepts_loss_kwargs is False
    saved, logged = {}, {}
    for batch, steps in ((4, 1), (2, 2)):
        stage_args, training, model_args = stage_configs(SFTConfig, arch, tiny_model_path, tmp_path / str(batch),
                                                         vqa / "tasks", "sft", max_length=160, max_steps=1,
                                                         per_device_train_batch_size=batch,
                                                         gradient_accumulation_steps=steps)
        stage_args.eval_dataset = None
        logged[batch] = losses(sft.main(stage_args, training, model_args))
        saved[batch] = load_file(tmp_path / str(batch) / "adapter_model.safetensors")
    assert logged[4] == pytest.approx(logged[2], abs=1e-5)
    for name, tensor in saved[4].items():  # to the MoE load-balancing loss, a mean over each micro-batch's tokens
        torch.testing.assert_close(saved[2][name], tensor, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_and_upo_continue_the_adapter_with_vision_frozen(arch, chain):
    run = chain(arch)
    losses(run["dpo"])
    losses(run["upo"], "upo/dpo_loss")  # the DPO term ran on online image pairs
    assert any(log.get("upo/pairs_online", 0) > 0 for log in run["upo"].state.log_history)
    saved = {stage: load_file(run["dirs"][stage] / "adapter_model.safetensors") for stage in ("sft", "dpo", "upo")}
    for stage, previous in (("dpo", "sft"), ("upo", "dpo")):
        changed = [k for k in saved[stage] if "lora_B" in k and not torch.equal(saved[stage][k], saved[previous][k])]
        assert changed, f"{stage} did not move the LoRA adapter"
    for stage in ("dpo", "upo"):  # vision side: exactly as SFT left it (trained copy or base weights)
        after = vision_weights(run[stage].model)
        assert all(torch.equal(after[k], run["sft_vision"][k]) for k in run["sft_vision"]), f"{stage} moved vision"
    metrics = json.loads((run["dirs"]["dpo"] / "metrics.json").read_text())
    assert metrics["preference"]["before"]["n"] == 4 and "mode/non_thinking" in metrics["eval"]["by_group"]
    if MODULES_TO_SAVE[arch]:
        assert metrics["preflight"]["frozen_modules"] == ["multi_modal_projector"]


def test_upo_image_marks_sit_on_the_image_tokens_of_every_prompt(chain, vqa, tiny_model_path, tmp_path, monkeypatch):
    """GRPO left-pads the prompt ids but took the image-token marks (`mm_token_type_ids`) from the processor, which
    pads right: with prompts of several lengths in a generation batch the marks missed the image tokens of the shorter
    ones, and Qwen-VL's rotary positions were wrong (or a shape mismatch stopped training)."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from posttrain.stages import upo
    from posttrain.trainers import UPOConfig

    rows = {"checked": 0, "misaligned": 0}
    rope_index = modeling_qwen2_vl.Qwen2VLModel.get_rope_index

    def checking(self, input_ids, mm_token_type_ids, *args, **kwargs):
        marked, tokens = mm_token_type_ids == 1, input_ids == self.config.image_token_id
        rows["checked"] += len(input_ids)
        rows["misaligned"] += int((marked != tokens).any(dim=1).sum())
        return rope_index(self, input_ids, mm_token_type_ids, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen2_vl.Qwen2VLModel, "get_rope_index", checking)
    upo.main(*stage_configs(UPOConfig, "qwen2_vl", tiny_model_path, tmp_path / "upo", vqa / "tasks", "prompts",
                            adapter=chain("qwen2_vl")["dirs"]["dpo"], rewards={"accuracy": 1.0}, upo_lambda=0.0,
                            num_generations=4, per_device_train_batch_size=8, max_steps=1, max_completion_length=4,
                            chat_template_kwargs={"enable_thinking": False}), upo.CurriculumArguments())
    assert rows["checked"] > 0 and rows["misaligned"] == 0, rows


def test_a_continued_stage_with_loraplus_keeps_it_beside_frozen_vision(chain, vqa, tiny_model_path, tmp_path):
    """Freezing the vision side builds the optimizer before `train` would set LoRA+: it is set first, so the LoRA B
    matrices get their higher rate and the frozen projector stays out of the optimizer."""
    from trl import DPOConfig

    from posttrain.stages import dpo

    stage_args, training, model_args = stage_configs(DPOConfig, "llava", tiny_model_path, tmp_path / "dpo",
                                                     vqa / "pairs", "train", adapter=chain("llava")["dirs"]["sft"],
                                                     max_length=160, max_steps=1)
    stage_args.loraplus_lr_ratio, stage_args.eval_dataset = 16.0, None
    trainer = dpo.main(stage_args, training, model_args)
    assert 16 * training.learning_rate in [group["initial_lr"] for group in trainer.optimizer.param_groups]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not [n for n, p in trainer.model.named_parameters() if "modules_to_save" in n and id(p) in optimized]


def test_a_module_to_save_the_continued_adapter_lacks_is_refused(chain, vqa, tiny_model_path, tmp_path):
    """A continued adapter keeps its own config: a module listed in `lora_modules_to_save` only now would stay frozen
    while the stage says it trains it."""
    from trl import DPOConfig

    from posttrain.stages import dpo

    configs = stage_configs(DPOConfig, "qwen2_vl", tiny_model_path, tmp_path / "dpo", vqa / "pairs", "train",
                            adapter=chain("qwen2_vl")["dirs"]["sft"], max_length=160, max_steps=1, save=["visual"])
    with pytest.raises(UserError, match="lora_modules_to_save lists visual, but this stage continues an adapter"):
        dpo.main(*configs)


def test_image_prompts_written_as_text_are_evaluated_with_their_images(vqa, tiny_model_path, tmp_path):
    """TRL's vision format allows a prompt whose contents are strings beside an `images` column (its collators put
    the images before the first user turn); evaluation, the DPO held-out check and offline UPO pairs place them the
    same way (they rendered no image placeholder, and the processor refused the images)."""
    from posttrain.evaluate import evaluate, load_rows
    from posttrain.trainers.upo_pairs import _image_prompt

    def as_text(prompt):
        return [{**m, "content": " ".join(p["text"] for p in m["content"] if p["type"] == "text")} for m in prompt]

    tasks = load_split(vqa / "tasks", "test")
    (tmp_path / "text").mkdir()
    tasks.map(lambda row: {"prompt": as_text(row["prompt"])}).to_parquet(str(tmp_path / "text" / "test.parquet"))
    rows = load_rows(str(tmp_path / "text"), "test")
    assert isinstance(rows[0]["prompt"][0]["content"], list), "the image part is placed"
    path = tiny_model_path("llava")
    processor = load_tokenizer(path)
    assert evaluate(load_model(path), processor, rows[:2], max_new_tokens=2, samples=0)["n"] == 2
    prompt_ids, _ = _image_prompt(processor, as_text(tasks[0]["prompt"]), False, rows[0]["images"])
    assert prompt_ids.count(processor.image_token_id) > 0


def test_upo_heldout_image_paths_are_read_against_the_data_folder(vqa, tiny_model_path, tmp_path, monkeypatch):
    """Relative image paths of UPO's held-out prompts (GRPO's evaluation) are read against the dataset's folder, as
    its training prompts' are; they were read against the working directory ("images[0] red.png: not found")."""
    from types import SimpleNamespace

    from datasets import Dataset

    from posttrain.stages import upo

    data = tmp_path / "data"
    data.mkdir()
    write_png(data / "red.png")
    rows = load_split(vqa / "tasks", "test").remove_columns("images").to_list()
    Dataset.from_list([{**row, "images": ["red.png"]} for row in rows]).to_parquet(str(data / "test.parquet"))
    monkeypatch.chdir(tmp_path)
    stage_args = StageArguments(dataset_name=str(data), dataset_test_split="test")
    # not a UPOConfig: making one resets accelerate's state, which the module's chained trainers still use
    training_args = SimpleNamespace(eval_strategy="steps", rewards={"accuracy": 1.0}, chat_template_kwargs=None)
    prompts = upo.heldout_prompts(stage_args, training_args, True, load_tokenizer(tiny_model_path("llava")))
    assert len(prompts) == len(rows) and prompts[0]["images"][0].size == (16, 16)


def test_a_merged_vlm_reloads_with_its_image_text_to_text_class(tiny_model_path, tmp_path):
    """The export's reload check and the card's code load a merged VLM with its image-text-to-text class (LLaVA's
    config is not a causal LM's: the export failed after the merge)."""
    from peft import LoraConfig, get_peft_model

    from posttrain.export import load_merged_checked, save_tokenizer
    from posttrain.model_card import snippet

    path = tiny_model_path("llava")
    model = get_peft_model(load_model(path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.merge_and_unload().save_pretrained(tmp_path)
    save_tokenizer(str(path), tmp_path)
    merged, checks = load_merged_checked(tmp_path, "float32")
    assert checks["reloads_clean"] and type(merged).__name__ == "LlavaForConditionalGeneration"
    code = snippet("tiny:llava", str(tmp_path), merged=True, vision=True)
    assert "AutoModelForImageTextToText.from_pretrained(" in code and "AutoModelForCausalLM" not in code
    from posttrain.model_card import _metadata

    assert "pipeline_tag: image-text-to-text" in _metadata("tiny:llava", True, ["sft"], [], "apache-2.0", vision=True)


def image_prompt(text, image=None):
    return [{"role": "user", "content": [{"type": "image", **({"image": image} if image else {})},
                                         {"type": "text", "text": text}]}]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_ernie_routing_covers_the_reply(kind, tiny_model_path):
    """TRL's vision collators leave ERNIE-4.5-VL's `moe_mm_token_type_ids` at the prompt's length, and the gate stops
    such a batch; the collator the stages swap in lays it over the whole sequence: vision on the image tokens and
    their start/end tokens, text (0) over the reply."""
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from posttrain.moe_routing import route_collator

    path = tiny_model_path("ernie4_5_vl")
    processor, model = load_tokenizer(path), load_model(path)
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    prompts = [image_prompt("What color is it?"), image_prompt("Color?")]  # different lengths: flushed left
    if kind == "sft":
        rows = [{"prompt": p, "completion": [{"role": "assistant", "content": "red"}], "images": [image]}
                for p in prompts]
        trainer = SimpleNamespace(processing_class=processor,
                                  data_collator=DataCollatorForVisionLanguageModeling(processor, max_length=64,
                                                                                      completion_only_loss=True))
    else:
        rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": "red"}],
                 "rejected": [{"role": "assistant", "content": "a blue one"}], "images": [image]} for p in prompts]
        trainer = SimpleNamespace(processing_class=processor,
                                  data_collator=DataCollatorForVisionPreference(processor, max_length=64))
    plain = trainer.data_collator(copy.deepcopy(rows))
    with pytest.raises(UserError, match="`moe_mm_token_type_ids` covers"):
        gates.check_processor_matches_model(processor, model, plain)

    route_collator(trainer)
    assert trainer.data_collator.max_length == 64  # TRL's settings kept
    batch = trainer.data_collator(copy.deepcopy(rows))
    ids, routing = batch["input_ids"], batch["moe_mm_token_type_ids"]
    vision_ids = [processor.image_token_id, processor.image_start_token_id, processor.image_end_token_id]
    assert routing.shape == ids.shape and torch.equal(routing.bool(), torch.isin(ids, torch.tensor(vision_ids)))
    reply = batch["completion_mask"] if kind == "dpo" else batch["labels"] != -100
    assert reply.any() and not routing[reply.bool()].any()
    gates.check_processor_matches_model(processor, model, batch)  # and the batch runs through the model


def test_upo_routes_ernie_tokens_by_modality(chain):
    """GRPO neither passes `moe_mm_token_type_ids` to the model nor extends it over the completion, and ERNIE-4.5-VL's
    processor cannot tokenize GRPO's unpadded prompts of different lengths; UPO does both for every forward."""
    from trl import GRPOTrainer

    trainer = chain("ernie4_5_vl")["upo"]
    processor, image = trainer.processing_class, Image.new("RGB", (32, 32), (0, 0, 255))
    prompts = [image_prompt("What color is it?", image), image_prompt("Color?", image)]
    with pytest.raises(ValueError, match="inhomogeneous"):  # transformers 5.23; the override can go once this passes
        GRPOTrainer._tokenize_prompts(trainer, prompts)
    prompt_ids, images, fields = trainer._tokenize_prompts(prompts)
    assert len(images) == 2 and [len(r) for r in fields["moe_mm_token_type_ids"]] == [len(r) for r in prompt_ids]

    texts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    inputs = processor(text=texts, images=[[image]] * 2, padding=True, return_tensors="pt")
    reply = torch.full((2, 3), processor.tokenizer.convert_tokens_to_ids("a"))
    input_ids = torch.cat([inputs["input_ids"], reply], dim=1)
    seen = []
    base = trainer.model.get_base_model()
    hook = base.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("moe_mm_token_type_ids")),
                                          with_kwargs=True)
    try:
        with torch.no_grad():  # as GRPO's reference pass calls it: the processor's routing, prompt only
            trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, torch.ones_like(input_ids), 3, pixel_values=inputs["pixel_values"],
                image_grid_thw=inputs["image_grid_thw"], num_images=[1, 1],
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(reply)], dim=1),
                moe_mm_token_type_ids=inputs["moe_mm_token_type_ids"])
    finally:
        hook.remove()
    expected = torch.cat([inputs["moe_mm_token_type_ids"], torch.zeros_like(reply)], dim=1)
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def test_llava_around_a_causal_lm(tiny_model_path):
    """`llava:<model>` keeps the language model's weights and tokenizer and adds a fresh vision tower + projector."""
    from posttrain.models import resolve_model

    lm = load_model(tiny_model_path("llama"))
    path = resolve_model("llava:tiny:llama")
    model, processor = load_model(path), load_tokenizer(path)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and vision.vision_modules(model) == [
        "vision_tower", "multi_modal_projector"]
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[name], tensor), name
    assert processor.image_token_id == model.config.image_token_id
    tokens = processor(text=["<image>"], images=[[Image.new("RGB", (64, 64))]])["input_ids"][0]
    assert len(tokens) == 4  # 64 px in 32 px patches


def test_upo_image_inputs_follow_their_rows():
    from posttrain.trainers.upo_pairs import select_images

    llava = {"pixel_values": torch.arange(3.0).view(3, 1, 1, 1), "num_images": [1, 0, 2]}
    picked = select_images(llava, [2, 0, 2])
    assert picked["num_images"] == [2, 1, 2] and picked["pixel_values"].flatten().tolist() == [1, 2, 0, 1, 2]
    qwen = {"pixel_values": torch.arange(10.0).view(10, 1), "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 3]]),
            "num_images": [1, 1], "mm_token_type_ids": torch.zeros(2, 5)}
    picked = select_images(qwen, [1])
    assert picked["pixel_values"].flatten().tolist() == [4, 5, 6, 7, 8, 9]
    assert picked["image_grid_thw"].tolist() == [[1, 2, 3]] and picked["typed"] == ["mm_token_type_ids"]
    assert select_images({"prompt_ids": torch.ones(2, 3)}, [0]) == {}


def test_gate_truncation_cuts_image_tokens(vqa, tiny_model_path, tmp_path):
    from trl import SFTConfig

    from posttrain.stages import sft

    # LLaVA's 16 image tokens start after ~5 tokens: max_length 12 cuts them
    configs = stage_configs(SFTConfig, "llava", tiny_model_path, tmp_path, vqa / "tasks", "sft", max_length=12)
    with pytest.raises(UserError, match=r"max_length=12 cuts \d+ of its 16 image tokens .*Raise max_length to at least"):
        sft.main(*configs)


def test_gate_image_tokens_counts_rows_that_max_length_leaves_nothing_to_train(caplog):
    """TRL cuts image rows in its collator, batch by batch: a reply behind a long question trained nothing, and a DPO
    pair cut to no reply (or to the same one) kept its loss at log 2, without a word. Stand-in collators."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    def padded(seqs):
        width = max(map(len, seqs))
        return torch.tensor([s + [0] * (width - len(s)) for s in seqs])

    @dataclasses.dataclass
    class SFTCollator:  # labels on the reply (-100 on the prompt); cuts at max_length
        max_length: int | None

        def __call__(self, rows):
            cut = slice(self.max_length)
            return {"input_ids": padded([(r["prompt"] + r["reply"])[cut] for r in rows]),
                    "labels": padded([([-100] * len(r["prompt"]) + r["reply"])[cut] for r in rows])}

    @dataclasses.dataclass
    class PairCollator:  # TRL's layout: chosen rows, then rejected rows, with a completion mask
        max_length: int | None

        def __call__(self, rows):
            cut = slice(self.max_length)
            seqs = [(r["prompt"] + r[side])[cut] for side in ("chosen", "rejected") for r in rows]
            masks = [([0] * len(r["prompt"]) + [1] * len(r[side]))[cut] for side in ("chosen", "rejected") for r in rows]
            return {"input_ids": padded(seqs), "completion_mask": padded(masks)}

    image = [9, 9]
    rows = [{"prompt": [1, *image, 3], "reply": [5, 2]}, {"prompt": [1, *image, 3, 3, 3, 3, 3], "reply": [5, 2]}]
    trainer = SimpleNamespace(data_collator=SFTCollator(max_length=8), train_dataset=rows)
    with caplog.at_level("WARNING", logger="posttrain"):
        assert gates.check_image_tokens(trainer, image_token_id=9)["rows_untrained"] == 1
    assert "1 of 2 image rows checked train nothing within max_length=8 (rows 2, counting from 1)" in caplog.text
    pairs = [{"prompt": [1, *image, 3], "chosen": [5, 2], "rejected": [6, 2]},
             {"prompt": [1, *image, 3, 3, 3, 3, 3], "chosen": [5, 2], "rejected": [6, 2]},  # no reply token left
             {"prompt": [1, *image, 3, 3, 3, 3], "chosen": [5, 5, 2], "rejected": [5, 6, 2]}]  # the same once cut
    trainer = SimpleNamespace(data_collator=PairCollator(max_length=8), train_dataset=pairs)
    assert gates.check_image_tokens(trainer, image_token_id=9, rows=[0, 3, 4])["rows_untrained"] == 2
    assert "(rows 4, 5, counting from 1)" in caplog.text
    trainer.data_collator.max_length = 16
    assert gates.check_image_tokens(trainer, image_token_id=9)["rows_untrained"] == 0


def test_gate_image_tokens_counts_replies_that_max_length_cuts_before_their_end_of_turn(caplog):
    """A text row whose reply `max_length` cuts before its end-of-turn token is counted (`rows_cut`) and warned about;
    an image row, which TRL cuts in its collator, trained on a reply that never stops without a word. A stand-in
    collator, right-padded as TRL's: end-of-turn id 2, image token 9."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    @dataclasses.dataclass
    class Collator:  # labels on the reply (-100 on the prompt and the padding); cuts at max_length
        max_length: int | None

        def __call__(self, rows):
            seqs = [(r["prompt"] + r["reply"])[:self.max_length] for r in rows]
            labels = [([-100] * len(r["prompt"]) + r["reply"])[:self.max_length] for r in rows]
            width = max(map(len, seqs))
            return {"input_ids": torch.tensor([s + [0] * (width - len(s)) for s in seqs]),
                    "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                    "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}

    rows = [{"prompt": [1, 9, 9, 3], "reply": [5, 2]},  # fits
            {"prompt": [1, 9, 9, 3], "reply": [5, 6, 2]},  # cut before its end-of-turn token
            {"prompt": [1, 9, 9, 3], "reply": [5, 2, 7]},  # cut after it (a newline): the model still learns to stop
            {"prompt": [1, 9, 9, 3], "reply": [5, 6]}]  # no end-of-turn token, but not cut: max_length is not the cause
    trainer = SimpleNamespace(data_collator=Collator(max_length=6), train_dataset=rows)
    with caplog.at_level("WARNING", logger="posttrain"):
        record = gates.check_image_tokens(trainer, image_token_id=9, end_of_turn={2}, name="vqa")
    assert record["rows_cut"] == 1 and record["rows_untrained"] == 0
    assert ("vqa: 1 of 4 rows are cut by max_length=6 before their reply's end-of-turn token, so the model learns "
            "replies that do not stop") in caplog.text


def test_gate_image_tokens_counts_pairs_whose_reply_max_length_cuts_before_its_end_of_turn(caplog):
    """The same for DPO's image pairs, which TRL's vision collator cuts as one batch of the chosen rows, then the
    rejected ones, scoring the reply tokens of `completion_mask`: counted per side (`pairs_cut`). A stand-in collator,
    right-padded as TRL's: end-of-turn id 2, image token 9."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    @dataclasses.dataclass
    class Collator:
        max_length: int | None

        def __call__(self, rows):
            seqs = [(r["prompt"] + r[side])[:self.max_length] for side in ("chosen", "rejected") for r in rows]
            masks = [([0] * len(r["prompt"]) + [1] * len(r[side]))[:self.max_length]
                     for side in ("chosen", "rejected") for r in rows]
            width = max(map(len, seqs))
            return {"input_ids": torch.tensor([s + [0] * (width - len(s)) for s in seqs]),
                    "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
                    "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks])}

    rows = [{"prompt": [1, 9, 9, 3], "chosen": [5, 6, 2], "rejected": [5, 2]},  # chosen cut before its end
            {"prompt": [1, 9, 9, 3], "chosen": [5, 2, 7], "rejected": [4, 2]},  # cut after it: still stops
            {"prompt": [1, 9, 9, 3], "chosen": [5, 2], "rejected": [4, 4, 2]}]  # rejected cut
    trainer = SimpleNamespace(data_collator=Collator(max_length=6), train_dataset=rows)
    with caplog.at_level("WARNING", logger="posttrain"):
        record = gates.check_image_tokens(trainer, image_token_id=9, end_of_turn={2}, name="vqa")
    assert record["pairs_cut"] == {"chosen": 1, "rejected": 1} and "rows_cut" not in record
    assert ("vqa: 1 of 3 pairs are cut by max_length=6 before their chosen reply's end-of-turn token, so the model "
            "learns replies that do not stop") in caplog.text
    assert "vqa: 1 of 3 pairs are cut by max_length=6 before their rejected reply's end-of-turn token" in caplog.text


def test_sft_counts_image_rows_cut_before_their_end_of_turn(vqa, tiny_model_path, tmp_path, caplog):
    """The same through the SFT stage on a tiny LLaVA: the longest rows go last, where `check_collated_labels`
    (the first 8 rows) does not see them, and max_length=70 cuts the replies of the 3 longest (80, 80 and 96 tokens)."""
    import shutil

    import pyarrow.parquet as pq
    from trl import SFTConfig

    from posttrain.stages import sft

    data = tmp_path / "tasks"
    shutil.copytree(vqa / "tasks", data)
    table = pq.read_table(data / "sft.parquet")
    messages = table["messages"].to_pylist()
    pq.write_table(table.take(sorted(range(len(messages)), key=lambda i: len(str(messages[i])))), data / "sft.parquet")
    configs = stage_configs(SFTConfig, "llava", tiny_model_path, tmp_path / "out", data, "sft", max_length=70,
                            max_steps=1)
    with caplog.at_level("WARNING", logger="posttrain"):
        sft.main(*configs)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["preflight"]["rows_cut"] == 3
    assert "3 of 16 rows are cut by max_length=70 before their reply's end-of-turn token" in caplog.text


def test_dpo_counts_image_pairs_cut_before_their_end_of_turn(vqa, tiny_model_path, tmp_path, caplog):
    """The same through the DPO stage on a tiny LLaVA: max_length=70 cuts the chosen replies of 2 of the 8 pairs and
    the rejected reply of 1 (behind a long prompt) before their end-of-turn token."""
    from trl import DPOConfig

    from posttrain.stages import dpo

    configs = stage_configs(DPOConfig, "llava", tiny_model_path, tmp_path / "out", vqa / "pairs", "train",
                            max_length=70, max_steps=1)
    with caplog.at_level("WARNING", logger="posttrain"):
        dpo.main(*configs)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["preflight"]["pairs_cut"] == \
        {"chosen": 2, "rejected": 1}
    assert "2 of 8 pairs are cut by max_length=70 before their chosen reply's end-of-turn token" in caplog.text


def test_gate_images_per_placeholder():
    from datasets import Dataset, Features, Json, List, Value

    image = {"type": "image"}
    rows = [{"messages": [{"role": "user", "content": [image, {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": "a"}], "images": ["a.png"]},
            {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "q"}]},
                          {"role": "assistant", "content": "a"}], "images": ["a.png", "b.png"]}]
    features = Features({"messages": List(Json()), "images": List(Value("string"))})
    with pytest.raises(UserError, match=r"vqa.jsonl row 2 \(counting from 1\): 2 image\(s\) for 1 image placeholder"):
        gates.check_image_slots(Dataset.from_list(rows, features=features), "vqa.jsonl")
    marked = [{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
               "images": ["a.png"]}]  # LLaMA-Factory's markers, not converted by data_prep
    with pytest.raises(UserError, match=r"vqa.jsonl row 1 \(counting from 1\): 1 literal '<image>' marker"):
        gates.check_image_slots(Dataset.from_list(marked), "vqa.jsonl")


def test_gate_images_given_as_one_string_instead_of_a_list():
    from datasets import Dataset

    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    rows = Dataset.from_list([{"prompt": turn, "images": "img/red.png"}])
    with pytest.raises(UserError, match=r"vqa.jsonl row 1 \(counting from 1\): \"images\" is one string "
                                        r"\('img/red.png'\); expected a list of images"):
        gates.check_image_slots(rows, "vqa.jsonl")


def test_gate_images_without_a_placeholder_in_structured_turns_and_markers_in_text_rows():
    """A row whose turns are lists of parts has a slot for each image: an image with none is refused (TRL places
    images at the start only for rows of plain-string turns). A text row (no images) may write `<image>` as text."""
    from datasets import Dataset, Features, Json, List, Value

    features = Features({"messages": List(Json()), "images": List(Value("string"))})
    parts = [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]
    with pytest.raises(UserError, match=r"vqa.jsonl row 1 \(counting from 1\): 1 image\(s\) for 0 image placeholder"):
        gates.check_image_slots(Dataset.from_list([{"messages": parts, "images": ["a.png"]}], features), "vqa.jsonl")
    text = [{"role": "user", "content": "what does <image> do in LLaMA-Factory?"}, {"role": "assistant", "content": "a"}]
    gates.check_image_slots(Dataset.from_list([{"messages": text, "images": []}], features), "vqa.jsonl")


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_special_token_text_in_image_rows(arch, tiny_model_path):
    """Image rows pass the special-token gate too, less the processor's image placeholders (`<image>`, Qwen2-VL's
    `<|vision_start|>`, ERNIE-VL's `<|IMAGE_START|>`, ...): written as text those are image slots, which
    `check_image_slots` counts and names."""
    from datasets import Dataset, Features, Json, List, Value

    processor = load_tokenizer(tiny_model_path(arch))
    placeholders = sorted(gates.image_tokens(processor) & gates.control_tokens(processor))
    assert placeholders and "<|im_end|>" not in placeholders  # the case: the template writes image tokens

    def row(reply):
        return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                             {"role": "user", "content": f"Are {' '.join(placeholders)} images?"},
                             {"role": "assistant", "content": reply}], "images": ["a.png"]}

    features = Features({"messages": List(Json()), "images": List(Value("string"))})
    rows = Dataset.from_list([row("Yes."), row("Yes.<|im_end|> then more")], features=features)
    with pytest.raises(UserError, match=r"vqa.jsonl row 2 \(counting from 1\): \"messages\" turn 3 \(assistant\) "
                                        r"has the text '<\|im_end\|>'.* \(1 of 2 rows"):
        gates.check_special_token_text(processor, rows, "vqa.jsonl")
    prompts = Dataset.from_list([{"prompt": row("")["messages"][1:2]}])  # evaluation's prompts, their images aside
    gates.check_special_token_text(processor, prompts, "vqa.jsonl", images=True)
    with pytest.raises(UserError, match=r"turn 1 \(user\) has the text '<"):  # text rows: no image, no slot
        gates.check_special_token_text(processor, prompts, "vqa.jsonl")


def test_special_token_text_in_an_image_reply_stops_sft(vqa, tiny_model_path, tmp_path):
    from trl import SFTConfig

    from posttrain.stages import sft

    def end_early(row, index):
        return {"messages": row["messages"][:-1] + [{"role": "assistant", "content": "red<|im_end|>"}]} if index == 2 \
            else {}

    data = tmp_path / "data"
    load_split(vqa / "tasks", "sft").map(end_early, with_indices=True).to_parquet(str(data / "sft.parquet"))
    configs = stage_configs(SFTConfig, "llava", tiny_model_path, tmp_path / "out", data, "sft")
    with pytest.raises(UserError, match=r"row 3 \(counting from 1\): \"messages\" turn \d \(assistant\) has the text "
                                        r"'<\|im_end\|>'"):
        sft.main(*configs)


def with_bad_image_row(dataset, kind: str, bad: int = 2):
    """`dataset` with row `bad`'s (counting from 1) prompt holding two image parts for its one image ("slots"), or
    LLaMA-Factory's literal `<image>` marker in its text beside its image ("marker"), which the special-token gate
    leaves to the image one."""
    def change(row, index):
        if index != bad - 1:
            return {}
        if kind == "marker":
            return {"prompt": [{"role": "user", "content": "<image>What color is the shape?"}]}
        return {"prompt": [{**row["prompt"][0], "content": [{"type": "image"}, *row["prompt"][0]["content"]]}]}

    return dataset.map(change, with_indices=True)


IMAGE_ROW_ERRORS = {"slots": r"\(counting from 1\): 1 image\(s\) for 2 image placeholder",
                    "marker": r"\(counting from 1\): 1 literal '<image>' marker"}


def test_a_missing_image_of_an_sft_heldout_row_names_the_split(tiny_model_path, tmp_path):
    """SFT's held-out image rows (TRL's eval loss) named a missing image in the dataset without its split, as if the
    training rows held it; named with "(test)", as the other stages and SFT's own text gates name it."""
    from types import SimpleNamespace

    from datasets import Dataset

    from posttrain.stages import sft

    write_png(tmp_path / "red.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    rows = [{"messages": messages, "images": ["red.png"]}, {"messages": messages, "images": ["missing.png"]}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "test.parquet"))
    stage_args = StageArguments(dataset_name=str(tmp_path), dataset_test_split="test")
    training_args = SimpleNamespace(eval_strategy="steps", assistant_only_loss=False, dataset_text_field="text",
                                    remove_unused_columns=True)
    with pytest.raises(UserError, match=r"\(test\) row 2 \(counting from 1\): images\[0\] .*missing.png: not found"):
        sft.heldout_rows(stage_args, training_args, True, load_tokenizer(tiny_model_path("llava")))


@pytest.mark.parametrize("split", ["train", "test"])
def test_dpo_stage_gates_image_slots(split, vqa, tiny_model_path, tmp_path):
    """DPO runs the image gate on its training and held-out pairs: one image per placeholder, named by split and row,
    before the first step (not TRL's "Number of images provided" from the collator)."""
    from trl import DPOConfig

    from posttrain.stages import dpo

    data = tmp_path / "pairs"
    for part in ("train", "test"):
        pairs = load_split(vqa / "pairs", part)
        (with_bad_image_row(pairs, "slots") if part == split else pairs).to_parquet(str(data / f"{part}.parquet"))
    configs = stage_configs(DPOConfig, "llava", tiny_model_path, tmp_path / "out", data, "train", test_split="test",
                            max_length=160)
    with pytest.raises(UserError, match=rf"pairs \({split}\) row 2 {IMAGE_ROW_ERRORS['slots']}"):
        dpo.main(*configs)


@pytest.mark.parametrize("where,kind", [("prompts", "slots"), ("test", "slots"), ("test", "marker"),
                                        ("offline", "slots"), ("offline", "marker")])
def test_upo_stage_gates_image_slots(where, kind, vqa, tiny_model_path, tmp_path):
    """UPO runs the image gate on its training prompts, its held-out prompts (GRPO's evaluation) and its offline
    pairs, naming the set and row before the first step. Without it the held-out row stopped the first evaluation
    with TRL's "Number of images provided (1) does not match number of image placeholders (2)", the offline pair
    the trainer's construction with the processor's count of image tokens, and a literal `<image>` under Qwen2-VL
    (whose placeholder is another token) was read as text."""
    from posttrain.stages import upo
    from posttrain.trainers import UPOConfig

    data, offline = tmp_path / "data", tmp_path / "pairs"
    bad = 1 if where == "test" else 2  # a row of the thinking mode the stage keeps: those are the ones evaluated
    for split in ("prompts", "test"):
        prompts = load_split(vqa / "tasks", split)
        prompts = with_bad_image_row(prompts, kind, bad) if split == where else prompts
        prompts.to_parquet(str(data / f"{split}.parquet"))
    pairs = load_split(vqa / "pairs", "train")
    (with_bad_image_row(pairs, kind) if where == "offline" else pairs).to_parquet(str(offline / "train.parquet"))
    configs = stage_configs(UPOConfig, "llava", tiny_model_path, tmp_path / "out", data, "prompts", test_split="test",
                            rewards={"accuracy": 1.0}, num_generations=4, max_completion_length=6,
                            chat_template_kwargs={"enable_thinking": False}, eval_strategy="steps", eval_steps=1,
                            upo_mode="both", upo_offline_dataset=str(offline))
    name = {"prompts": "data", "test": r"data \(test\)", "offline": r"pairs \(train\)"}[where]
    with pytest.raises(UserError, match=rf"pre-flight: .*{name} row {bad} {IMAGE_ROW_ERRORS[kind]}"):
        upo.main(*configs, upo.CurriculumArguments())


def test_one_image_a_row_formats_load_as_lists_of_images(tmp_path):
    """TRL's `image` column, and one `datasets.Image` per row in `images`: a list of one image, counted as one."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    red = str(tmp_path / write_png(tmp_path / "red.png"))
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    for column in ("image", "images"):
        Dataset.from_dict({"prompt": [turn], column: [red]}).cast_column(column, ImageFeature()).to_parquet(
            str(tmp_path / f"{column}.parquet"))
        rows = load_split(str(tmp_path / f"{column}.parquet"))
        assert rows.column_names == ["prompt", "images"] and rows[0]["images"][0].size == (16, 16)
        gates.check_image_slots(rows, column)
    (tmp_path / "image.jsonl").write_text(json.dumps({"prompt": turn, "image": "red.png"}) + "\n")
    rows = load_split(str(tmp_path / "image.jsonl"))
    assert rows[0]["images"] == ["red.png"]
    assert vision.decode_images(rows, tmp_path)[0]["images"][0].size == (16, 16)


def test_gate_processor_from_another_model(tiny_model_path):
    model = load_model(tiny_model_path("llava"))
    llava, qwen = load_tokenizer(tiny_model_path("llava")), load_tokenizer(tiny_model_path("qwen2_vl"))
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    text = llava.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
                                     tokenize=False, add_generation_prompt=True)
    with pytest.raises(UserError, match="processor belongs to another model"):
        gates.check_processor_matches_model(qwen, model, {})
    batch = llava(text=[text], images=[[image]], return_tensors="pt")
    short = {**batch, "token_type_ids": batch["input_ids"][:, :-1]}  # a collator that leaves it at the prompt's length
    with pytest.raises(UserError, match=r"`token_type_ids` covers \d+ positions of \d+ tokens"):
        gates.check_processor_matches_model(llava, model, short)
    llava.patch_size = 16  # a processor that writes 4 image tokens where the vision tower makes 16 features
    batch = llava(text=[text], images=[[image]], return_tensors="pt")
    with pytest.raises(UserError, match="disagree on how many tokens an image takes"):
        gates.check_processor_matches_model(llava, model, batch)


def write_png(path, color=(255, 0, 0)):
    Image.new("RGB", (16, 16), color).save(path)
    return path.name


def test_broken_or_missing_image_is_named(tmp_path):
    from data_prep.build_vqa_tasks import main

    good = write_png(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"image": good, "question": "What color?", "answer": "red"},
            {"image": "broken.png", "question": "What color?", "answer": "red"}]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--source", str(tmp_path / "vqa.jsonl"), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(UserError, match=r'vqa.jsonl:2: "images\[0\]" does not decode as an image'):
        main(args)
    rows[1]["image"] = "missing.png"
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match=r'vqa.jsonl:2: "images\[0\]" file not found: .*missing.png'):
        main(args)



def test_image_pairs_whose_replies_hold_tool_results_are_refused(tmp_path):
    """TRL tokenizes image pairs in its collator, where the text pairs' tool-result masks do not reach: their tool
    results would be scored as the model's own tokens. Refused, naming the row."""
    from posttrain.stages.pairs import load_pairs

    image = write_png(tmp_path / "red.png")
    call = [{"type": "function", "function": {"name": "color", "arguments": {}}}]

    def reply(answer):
        return [{"role": "assistant", "content": "", "tool_calls": call},
                {"role": "tool", "name": "color", "content": "red"}, {"role": "assistant", "content": answer}]

    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    rows = [{"images": [image], "prompt": prompt, "chosen": [{"role": "assistant", "content": "red"}],
             "rejected": [{"role": "assistant", "content": "blue"}]},
            {"images": [image], "prompt": prompt, "chosen": reply("red"), "rejected": reply("blue")}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    stage_args = StageArguments(dataset_name=str(tmp_path / "pairs.jsonl"))
    with pytest.raises(UserError, match=r"pairs.jsonl \(train\) row 2 .*images whose replies hold tool results"):
        load_pairs(stage_args, "train", None, None)


def test_decode_images_resolves_against_the_data_folder_and_names_bad_rows(tmp_path, monkeypatch):
    from datasets import Dataset, List
    from datasets import Image as ImageFeature

    monkeypatch.chdir(tmp_path.parent)  # relative paths must not resolve against the current directory
    good = write_png(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = vision.decode_images(Dataset.from_dict({"images": [[good], []]}), data_dir=tmp_path)
    assert rows[0]["images"][0].size == (16, 16) and rows[1]["images"] == []
    with pytest.raises(UserError, match=r"train.jsonl row 2 \(counting from 1\): images\[0\] .*missing.png: not"):
        vision.decode_images(Dataset.from_dict({"images": [[good], ["missing.png"]]}), tmp_path, "train.jsonl")
    with pytest.raises(UserError, match=r"row 1 \(counting from 1\): images\[1\] .*broken.png: does not decode"):
        vision.decode_images(Dataset.from_dict({"images": [[good, "broken.png"]]}), tmp_path)
    # one Image() per row instead of a list of them
    single = Dataset.from_dict({"images": [str(tmp_path / good)]}).cast_column("images", ImageFeature())
    assert vision.decode_images(single)[0]["images"][0].size == (16, 16)
    # images stored in the data (parquet written by `datasets`), broken bytes in row 2: named, not PIL's error later
    stored = Dataset.from_dict({"images": [[{"bytes": (tmp_path / good).read_bytes(), "path": None}],
                                           [{"bytes": b"not an image", "path": None}]]})
    stored = stored.cast_column("images", List(ImageFeature()))
    with pytest.raises(UserError, match=r"vqa row 2 \(counting from 1\): images\[0\] \(stored in the data\): does not"):
        vision.decode_images(stored, name="vqa")


def test_stored_images_given_by_relative_path_are_read_against_the_data_folder(tmp_path, monkeypatch):
    """`to_parquet` of a `datasets.Image` column of files given by relative path keeps the path alone, no bytes: it is
    read against the parquet's folder, as a path written as text is, and a missing one is named by its row."""
    from datasets import Dataset, List
    from datasets import Image as ImageFeature

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "img").mkdir(parents=True)
    write_png(tmp_path / "data" / "img" / "red.png")
    write_png(tmp_path / "data" / "img" / "gone.png")
    rows = Dataset.from_dict({"images": [["img/red.png"], ["img/gone.png"]]})
    monkeypatch.chdir(tmp_path / "data")
    rows.cast_column("images", List(ImageFeature())).to_parquet("train.parquet")
    (tmp_path / "data" / "img" / "gone.png").unlink()
    monkeypatch.chdir(tmp_path)  # training runs from elsewhere
    loaded = load_split(str(tmp_path / "data"), "train")
    assert loaded[0]["images"][0].size == (16, 16)
    with pytest.raises(UserError, match=r"train row 2 \(counting from 1\): images\[0\] .*data/img/gone.png: not found"):
        vision.decode_images(loaded.cast_column("images", List(ImageFeature(decode=False))), name="train")


def test_a_missing_image_of_an_offline_pair_is_named_by_its_line_after_skipped_pairs(tiny_model_path, tmp_path):
    """With `skip_bad_rows` the pre-flight drops bad offline pairs; a missing image of a later pair was named by its
    place among the kept pairs ("row 2" for the file's line 3). Named by its own line."""
    from types import SimpleNamespace

    from datasets import Dataset

    from posttrain.stages.upo import preflight_data
    from posttrain.trainers.upo_pairs import load_offline_pairs

    image = write_png(tmp_path / "red.png")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]

    def pair(chosen, rejected, image):
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}], "images": [image]}

    rows = [pair("same", "same", image), pair("red", "blue", image), pair("red", "blue", "missing.png")]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    processor = load_tokenizer(tiny_model_path("llava"))
    stage_args = SimpleNamespace(preflight=True, skip_bad_rows=True, dataset_name="prompts")
    training_args = SimpleNamespace(rewards={"accuracy": 1.0}, upo_mode="offline",
                                    upo_offline_dataset=str(tmp_path / "pairs.jsonl"))
    prompts = Dataset.from_list([{"prompt": "What is 2 + 2?", "answer": "4"}])
    _, kept, record = preflight_data(prompts, stage_args, training_args, processor)
    assert record["offline_pairs_skipped"] == 1  # line 1: chosen == rejected
    with pytest.raises(UserError, match=r"pairs.jsonl row 3 \(counting from 1\): images\[0\] .*missing.png: not found"):
        load_offline_pairs(str(tmp_path / "pairs.jsonl"), processor, 8, processor=processor, dataset=kept)


def test_a_broken_stored_image_in_dpo_pairs_is_named(vqa, tiny_model_path, tmp_path):
    """A broken image stored in a pair's parquet row is an error naming the row before training: the pair gates and
    the reply-format check read the pairs without decoding their images (PIL's "cannot identify image file" named
    no row), and `vision.decode_images` checks stored images as it checks image files."""
    from datasets import Image as ImageFeature
    from datasets import List

    from posttrain.stages.pairs import load_pairs

    def break_first(row, index):
        return {"images": [{"bytes": b"not an image", "path": None}]} if index == 0 else {}

    pairs = load_split(vqa / "pairs", "train").cast_column("images", List(ImageFeature(decode=False)))
    pairs = pairs.map(break_first, with_indices=True).cast_column("images", List(ImageFeature()))  # as data_prep's
    pairs.to_parquet(str(tmp_path / "pairs" / "train.parquet"))
    stage_args = StageArguments(dataset_name=str(tmp_path / "pairs"))
    with pytest.raises(UserError, match=r"pairs \(train\) row 1 \(counting from 1\): images\[0\] \(stored in the data\)"):
        load_pairs(stage_args, "train", load_tokenizer(tiny_model_path("llava")), None)


def test_processor_class_from_preprocessor_config(tiny_model_path, tmp_path):
    """Hub repos such as Qwen/Qwen2.5-VL-3B-Instruct name the processor only in preprocessor_config.json; without
    torchvision, AutoProcessor would then need the video processor it cannot build."""
    import shutil

    folder = shutil.copytree(tiny_model_path("qwen2_5_vl"), tmp_path / "hub_like")
    saved = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").unlink()
    preprocessor = {**saved["image_processor"], "processor_class": saved["processor_class"]}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    processor = vision.load_processor(folder)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.tokenizer is not None
    # a tokenizer folder (no config.json: a stage's own, or --tokenizer) laid out so loads as the processor too
    (folder / "config.json").unlink()
    from posttrain.models.load import load_tokenizer

    assert type(load_tokenizer(folder)).__name__ == "Qwen2_5_VLProcessor"

def test_evaluation_image_rows_pass_the_image_gates(vqa, tmp_path, monkeypatch):
    """The held-out evaluation's image rows (`eval.dataset`: before the first stage and after each) pass the stages'
    image gates: relative image paths are read in the data's folder (they were read in the working directory), and a
    row with an image placeholder too many is named (it was the processor's "The total number of <image> tokens in
    the prompts should be the same as the number of images passed")."""
    from datasets import Dataset

    from posttrain.evaluate import load_rows

    rows = load_split(vqa / "tasks", "test").remove_columns("images").to_list()
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder in (good, bad):
        folder.mkdir()
        write_png(folder / "red.png")
        Dataset.from_list([{**row, "images": ["red.png"]} for row in rows]).to_parquet(str(folder / "test.parquet"))
        rows[1]["prompt"][0]["content"].insert(0, {"type": "image"})  # for `bad`
    monkeypatch.chdir(tmp_path)
    assert load_rows(str(good), "test")[0]["images"][0].size == (16, 16)
    with pytest.raises(UserError, match=r"bad \(test\) row 2 \(counting from 1\): 1 image\(s\) for 2 image placeholder"):
        load_rows(str(bad), "test")

def test_vqa_rows_import_with_reasoning(tmp_path):
    from data_prep.build_vqa_tasks import main

    rows = [{"image": write_png(tmp_path / "red.png"), "question": "What color is it?", "answer": "red",
             "reasoning": "It is all red."},
            {"images": [write_png(tmp_path / "blue.png", (0, 0, 255))], "question": "And this one?", "answer": "blue"}]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["--source", str(tmp_path / "vqa.jsonl"), "--output_dir", str(tmp_path / "out"),
                 "--test_every", "1000"]) == 0
    sft = vision.as_rows(load_split(tmp_path / "out", "sft"))
    by_answer = {r["messages"][-1]["content"].rsplit("\n", 1)[-1]: r for r in sft}
    assert by_answer["red"]["thinking"] and by_answer["red"]["messages"][-1]["content"].startswith("<think>\nIt is")
    assert not by_answer["blue"]["thinking"]
    assert by_answer["blue"]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "And this one?"}]
    assert by_answer["blue"]["images"][0].getpixel((0, 0)) == (0, 0, 255)  # embedded, decoded
    assert json.loads((tmp_path / "out" / "card.json").read_text())["sources"][0]["path"].endswith("vqa.jsonl")


def test_vqa_card_counts_the_rows_read_before_sampling(tmp_path):
    """A source file of 3 rows sampled down to 1 training task: the card reads 3 rows and keeps 1, as the other data
    jobs' cards count what they read, not what they wrote."""
    from data_prep.build_vqa_tasks import main

    rows = [{"image": write_png(tmp_path / f"{i}.png", (80 * i, 0, 0)), "question": f"Which {i}?", "answer": "red"}
            for i in range(3)]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["--source", str(tmp_path / "vqa.jsonl"), "--output_dir", str(tmp_path / "out"), "--n_train", "1",
                 "--test_every", "1000"]) == 0
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert (card["sources"][0]["rows_read"], card["sources"][0]["rows_kept"]) == (3, 1)
    assert [(c["before"], c["after"]) for c in card["counts"]] == [(3, 1), (3, 1), (0, 0)]


def test_erniekit_vl_rows(tmp_path):
    from data_prep.formats import Options, detect, from_erniekit_vl
    from data_prep.messages import RowError

    red = write_png(tmp_path / "red.png")
    row = {"image_info": [{"image_url": red, "matched_text_index": 1}],
           "text_info": [{"text": "Look:", "tag": "mask"}, {"text": "what color?", "tag": "mask"},
                         {"text": "<think>It is red.</think>red", "tag": "no_mask"}]}
    assert detect(row) == "erniekit_vl"
    record = from_erniekit_vl(row, Options(base_dir=tmp_path))
    assert record["messages"][0]["content"] == [{"type": "text", "text": "Look:"}, {"type": "image"},
                                                {"type": "text", "text": "what color?"}]
    assert record["messages"][1]["content"] == "<think>\nIt is red.\n</think>\n\nred" and record["thinking"]
    assert record["images"] == [str((tmp_path / "red.png").resolve())]
    row["image_info"][0]["matched_text_index"] = 2
    with pytest.raises(RowError, match="points at a no_mask"):
        from_erniekit_vl(row, Options(base_dir=tmp_path))


def test_easy_vqa_tasks_think_consistently(vqa):
    from posttrain.data import load_split
    from posttrain.rewards import REWARDS

    rows = load_split(vqa / "tasks", "prompts").select_columns(["answer", "completion", "thinking", "domain"])
    rows = rows.to_list()
    assert {r["domain"] for r in rows} == {"color", "shape", "yes_no"} and any(r["thinking"] for r in rows)
    replies = [r["completion"] for r in rows]
    columns = {"answer": [r["answer"] for r in rows], "thinking": [r["thinking"] for r in rows]}
    assert REWARDS["accuracy"](replies, **columns) == [1.0] * len(rows)  # reference replies score full marks
    assert REWARDS["think_format"](replies, **columns) == [1.0] * len(rows)
    card = json.loads((vqa / "tasks" / "card.json").read_text())
    assert card["sources"][0]["license"] == "mit" and "Victor Zhou" in card["sources"][0]["notes"]


def test_tiny_vision_recipe(tiny_vision_run, check_evaluation):
    """The tiny vision recipe end to end through the CLI: data jobs, base eval, sft (on image and text rows) -> dpo ->
    upo, all with images."""
    cwd, process = tiny_vision_run
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    run = cwd / "outputs" / "tiny-vision"
    assert json.loads((run / "run.json").read_text())["steps"]["run"]["status"] == "done"
    assert "easy-vqa" in (run / "data" / "vqa" / "README.md").read_text()
    mix = json.loads((run / "data" / "sft_mix" / "card.json").read_text())  # SFT's rows: both kinds, images embedded
    assert [(s["name"], s["rows_kept"]) for s in mix["sources"]] == [("vqa", 48), ("text", 16)]
    for stage in ("base", "sft", "dpo", "upo"):
        evaluation = json.loads((run / stage / "metrics.json").read_text())["eval"]
        check_evaluation(evaluation, 8)
        assert {"mode/thinking", "mode/non_thinking"} <= set(evaluation["by_group"]) and evaluation["samples"]
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert all(math.isfinite(log["loss"]) for log in sft["log_history"] if "loss" in log)
    upo = json.loads((run / "upo" / "metrics.json").read_text())
    assert any("upo/dpo_loss" in log for log in upo["log_history"])
    steps = [log for log in upo["log_history"] if "upo/pairs_online" in log]  # online image pairs, not offline alone
    assert steps and all(log["frac_reward_zero_std"] < 1 and log["upo/pairs_online"] > 0 for log in steps)
    adapters = {s: load_file(run / s / "adapter_model.safetensors") for s in ("sft", "dpo", "upo")}
    tower = [k for k in adapters["sft"] if "vision_tower" in k or "multi_modal_projector" in k]
    assert tower, "the SFT adapter carries the vision tower and projector it trained (lora_modules_to_save)"
    for stage, previous in (("dpo", "sft"), ("upo", "dpo")):
        assert all(torch.equal(adapters[stage][k], adapters["sft"][k]) for k in tower), f"{stage} moved vision"
        assert any(not torch.equal(adapters[stage][k], adapters[previous][k]) for k in adapters[stage] if "lora_B" in k)
        assert json.loads((run / stage / "lineage.json").read_text())["previous_stage"] == previous
    assert (run / "data" / "pairs" / "train.parquet").is_file()
    assert "held-out accuracy: base" in output
    # `posttrain chat` with a vision run's stage: text turns through the processor's tokenizer
    chat = subprocess.run([sys.executable, "-m", "posttrain", "chat", str(run), "--max-new-tokens", "3"],
                          input="what colour?\n", capture_output=True, text=True, cwd=cwd, timeout=120)
    assert chat.returncode == 0 and chat.stdout.startswith("assistant> "), chat.stdout + chat.stderr[-2000:]


def test_gate_image_tokens_checks_every_row_up_to_its_limit():
    """One long row late in the set (many images, a long question) is found before training, not when its batch
    comes; past `limit` rows the record says how many were checked. A stand-in collator: no processor needed."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    @dataclasses.dataclass
    class Collator:  # pads like TRL's; cuts at max_length
        max_length: int | None

        def __call__(self, rows):
            ids = [row["ids"][:self.max_length] if self.max_length else row["ids"] for row in rows]
            width = max(map(len, ids))
            return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                    "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}

    rows = [{"ids": [1, 9, 9, 2]}] * 20 + [{"ids": [1] * 7 + [9, 9, 2]}]  # image token 9; row 21 is cut at 8
    trainer = SimpleNamespace(data_collator=Collator(max_length=8), train_dataset=rows)
    with pytest.raises(UserError, match=r"row 21 \(counting from 1\): max_length=8 cuts 1 of its 2 image tokens"):
        gates.check_image_tokens(trainer, image_token_id=9)
    # beyond `limit` rows the record says how many were checked
    assert gates.check_image_tokens(trainer, image_token_id=9, limit=20) == {
        "image_tokens": 40, "image_rows_checked": "the first 20 of 21", "max_length": 8, "rows_untrained": 0}
    # DPO's pre-flight skipped two bad pairs before it (`skip_bad_rows`): the error names the row in the file
    from datasets import Dataset

    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 23
    pairs[1], pairs[4] = {"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "", "rejected": "b"}
    kept, skipped = gates.check_preference_pairs(Dataset.from_list(pairs), "pairs.jsonl", allow_skip=True)
    assert skipped == [1, 4] and len(kept) == 21
    with pytest.raises(UserError, match=r"row 23 \(counting from 1\): max_length=8"):
        gates.check_image_tokens(trainer, image_token_id=9, rows=gates.kept_rows(23, skipped))


def test_a_curriculum_phases_own_image_file_is_read_against_its_folder(tiny_model_path, tmp_path, upo_prompts_given):
    """A UPO phase with its own image file: its relative image paths were read against the main prompts' folder
    ("main/red.png: not found"), and a row with more images than placeholders was named by its place among all the
    phases' prompts, in the main file. Each file is read against its own folder, its rows named in it."""
    from datasets import Dataset

    from posttrain.stages import upo
    from posttrain.trainers import UPOConfig

    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    for folder, image, color in (("main", "blue.png", (0, 0, 255)), ("logic", "red.png", (255, 0, 0))):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / image, color)
        rows = [{"prompt": prompt, "answer": "red", "domain": "color", "thinking": False, "images": [image]}] * 2
        Dataset.from_list(rows).to_parquet(str(tmp_path / folder / "train.parquet"))
    configs = stage_configs(UPOConfig, "llava", tiny_model_path, tmp_path / "out", tmp_path / "main", "train",
                            rewards={"accuracy": 1.0}, num_generations=2, per_device_train_batch_size=2,
                            max_completion_length=4)
    phases = upo.CurriculumArguments(phases=[{"num_prompts": 1}, {"dataset_name": str(tmp_path / "logic")}])
    with pytest.raises(upo_prompts_given) as reached_trainer:
        upo.main(*configs, phases)
    colors = [row["images"][0].getpixel((0, 0)) for row in reached_trainer.value.args[0]]
    assert colors == [(0, 0, 255)] + [(255, 0, 0)] * 2  # the main file's image, then the phase's own two
    rows[1] = {**rows[1], "images": ["red.png", "red.png"]}
    Dataset.from_list(rows).to_parquet(str(tmp_path / "logic" / "train.parquet"))
    with pytest.raises(UserError, match=r"upo phases\[1\]: .*logic \(train\) row 2 \(counting from 1\): 2 image\(s\) "
                                        r"for 1 image placeholder"):
        upo.main(*configs, phases)


def test_image_phases_pick_their_prompts_among_those_of_the_thinking_mode_trained(tiny_model_path, tmp_path,
                                                                                   upo_prompts_given):
    """GRPO renders image prompts in one thinking mode, so the stage keeps that mode's prompts before a phase takes
    its `num_prompts`: three of them, not the non-thinking share of three picked among all six."""
    from datasets import Dataset

    from posttrain.stages import upo
    from posttrain.trainers import UPOConfig

    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    (tmp_path / "main").mkdir()
    write_png(tmp_path / "main" / "red.png", (255, 0, 0))
    rows = [{"prompt": prompt, "answer": "red", "domain": "color", "thinking": i % 2 == 0, "images": ["red.png"]}
            for i in range(6)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "main" / "train.parquet"))
    configs = stage_configs(UPOConfig, "llava", tiny_model_path, tmp_path / "out", tmp_path / "main", "train",
                            rewards={"accuracy": 1.0}, num_generations=2, per_device_train_batch_size=2,
                            max_completion_length=4, chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(upo_prompts_given) as reached_trainer:
        upo.main(*configs, upo.CurriculumArguments(phases=[{"num_prompts": 3}]))
    assert list(reached_trainer.value.args[0]["thinking"]) == [False] * 3


@pytest.fixture(scope="module")
def mixed(vqa, task_data, tmp_path_factory):
    """The easy-VQA tasks and pairs with a text row (a verifiable task, no images) after each image row: a vision set
    that also trains text, as VLM post-training mixes them."""
    from datasets import Dataset

    out = tmp_path_factory.mktemp("mixed")
    for folder, split in (("tasks", "sft"), ("tasks", "prompts"), ("tasks", "test"), ("pairs", "train")):
        images = load_split(vqa / folder, split)
        text = load_split(task_data, split if folder == "tasks" else "prompts")
        if folder == "pairs":  # text pairs: the task's worked reply against a wrong one
            text = text.map(lambda row: {"chosen": [{"role": "assistant", "content": row["completion"]}],
                                         "rejected": [{"role": "assistant", "content": "purple"}],
                                         "chosen_reward": 1.0, "rejected_reward": 0.0})
        rows = []
        for image_row, text_row in zip(images, text):
            rows += [image_row, {**{key: text_row.get(key) for key in images.column_names}, "images": []}]
        (out / folder).mkdir(exist_ok=True)
        Dataset.from_list(rows, features=images.features).to_parquet(str(out / folder / f"{split}.parquet"))
    return out


def batches_seen(monkeypatch) -> list[tuple[int, int]]:
    """(rows, images) of every batch a trainer trains on, from now on."""
    from transformers import Trainer

    seen, step = [], Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        rows = next(len(value) for key, value in inputs.items() if key.endswith("input_ids"))
        seen.append((rows, len(inputs["image_grid_thw"]) if "image_grid_thw" in inputs else 0))
        return step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)
    return seen


@pytest.mark.parametrize("arch", ["qwen2_vl", "ernie4_5_vl"])
def test_sft_and_dpo_train_on_batches_of_image_and_text_rows(arch, mixed, tiny_model_path, tmp_path, monkeypatch):
    """Text rows (no images) among image rows: TRL's collators batch them together, and the held-out evaluation of
    such a set stopped on pyarrow's "cannot mix list and non-list" (image prompts' contents are parts, text
    prompts' strings) before it generated."""
    from trl import DPOConfig, SFTConfig

    from posttrain.stages import dpo, sft

    seen = batches_seen(monkeypatch)
    for config_cls, stage, data, split, adapter in ((SFTConfig, sft, mixed / "tasks", "sft", None),
                                                    (DPOConfig, dpo, mixed / "pairs", "train", tmp_path / "sft")):
        stage_args, training, model_args = stage_configs(config_cls, arch, tiny_model_path, tmp_path / split, data,
                                                         split, adapter=adapter, max_length=160)
        stage_args.eval_dataset = str(mixed / "tasks")
        trainer = stage.main(stage_args, training, model_args)
        losses(trainer)
        assert any(p.abs().sum() > 0 for p in lora_b(trainer.model).values()), f"{split}: LoRA did not move"
        assert any(0 < images < rows for rows, images in seen), f"{split}: no batch held both kinds: {seen}"
        groups = json.loads((tmp_path / split / "metrics.json").read_text())["eval"]["by_group"]
        assert {"domain/arithmetic", "domain/color"} <= set(groups), f"both kinds were evaluated: {sorted(groups)}"
        seen.clear()


@pytest.mark.parametrize("arch", ARCHS)
def test_upo_trains_on_batches_of_image_and_text_rows(arch, mixed, tiny_model_path, tmp_path, monkeypatch):
    """Generation batches of image and text prompts, and offline pairs of both kinds. GRPO gave a text prompt None
    for images, which the processors refuse ("only a single or a list of entries is supported"), and a chunk of text
    rows (`per_device_train_batch_size` rows of a larger generation batch) an empty slice of the image inputs, on
    which the vision towers fail. Every row's log-probs in its batch are those it has scored alone: the image inputs
    went to the rows they belong to."""
    from posttrain.data import completion_text
    from posttrain.rewards import REWARDS
    from posttrain.stages import upo
    from posttrain.trainers import UPOConfig, UPOTrainer
    from posttrain.trainers.upo_pairs import IMAGE_KEYS, TYPED_KEYS, select_images

    score, checked = UPOTrainer._generate_and_score_completions, []

    def scored(self, inputs):
        out = score(self, inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        typed = {key: out[key] for key in TYPED_KEYS if key in out}
        logps = self._get_per_token_logps_and_entropies  # GRPO's own forward, in its chunks
        with torch.no_grad():
            together = logps(self.model, ids, mask, out["completion_ids"].size(1),
                             self.args.per_device_train_batch_size, num_images=out["num_images"],
                             **{k: out[k] for k in IMAGE_KEYS if k in out}, **typed)[0]
            for row in range(len(ids)):
                one = select_images(out, [row])
                alone = logps(self.model, ids[row:row + 1], mask[row:row + 1], out["completion_ids"].size(1),
                              num_images=one["num_images"], **{k: one[k] for k in IMAGE_KEYS if k in one},
                              **{key: value[row:row + 1] for key, value in typed.items()})[0]
                kept = out["completion_mask"][row].bool()
                assert torch.allclose(together[row][kept], alone[0][kept], atol=1e-4), (row, out["num_images"])
        checked.append(out["num_images"])
        return out

    monkeypatch.setattr(UPOTrainer, "_generate_and_score_completions", scored)
    # a random tiny model is never right: reward its rollouts' variety so that groups have online pairs
    monkeypatch.setitem(REWARDS, "variety", lambda completions, **kw: [len(set(completion_text(c))) / 10
                                                                       for c in completions])
    trainer = upo.main(*stage_configs(
        UPOConfig, arch, tiny_model_path, tmp_path / "upo", mixed / "tasks", "prompts",
        rewards={"accuracy": 1.0, "variety": 1.0},
        upo_lambda=0.5, upo_margin=0.0, num_generations=4, per_device_train_batch_size=4,
        gradient_accumulation_steps=4, max_completion_length=4, upo_mode="both",
        upo_offline_dataset=str(mixed / "pairs"), chat_template_kwargs={"enable_thinking": False}),
        upo.CurriculumArguments())
    assert any(0 in counts and any(counts) for counts in checked), f"no generation batch held both: {checked}"
    losses(trainer, "upo/dpo_loss")
    logs = trainer.state.log_history
    assert any(log.get("upo/pairs_online", 0) > 0 for log in logs) and any(log.get("upo/pairs_offline", 0) > 0
                                                                          for log in logs)
    assert any(p.abs().sum() > 0 for p in lora_b(trainer.model).values()), "LoRA B starts at zero and must have moved"


def test_offline_pairs_of_image_and_text_prompts_load_with_their_own_images(mixed, tiny_model_path):
    """A text pair among image pairs is tokenized as GRPO tokenizes a text prompt of a vision batch, with no images."""
    from posttrain.trainers.upo_pairs import load_offline_pairs

    processor = load_tokenizer(tiny_model_path("qwen2_vl"))
    pairs = load_offline_pairs(str(mixed / "pairs"), vision.text_tokenizer(processor), 16, processor=processor)
    counts = [pair[3]["num_images"] for pair in pairs]
    assert counts[:4] == [[1], [0], [1], [0]] and "pixel_values" not in pairs[1][3]
    assert processor.image_token_id in pairs[0][0] and processor.image_token_id not in pairs[1][0]


def test_onpolicy_pairs_of_image_and_text_prompts_keep_their_own_images(mixed, tiny_model_path, tmp_path):
    """The pairs job samples a mixed prompt set in mixed batches: each pair keeps its prompt's images, or none."""
    from data_prep.build_onpolicy_pairs import main

    out = tmp_path / "pairs"
    assert main(["--model_name_or_path", str(tiny_model_path("qwen2_vl")), "--prompts", str(mixed / "tasks"),
                 "--max_train_prompts", "8", "--max_test_prompts", "4", "--num_samples", "2", "--max_new_tokens", "4",
                 "--rewards", "length_penalty", "--margin", "0.0", "--output_dir", str(out)]) == 0
    pairs = load_split(out, "train")
    prompts = {json.dumps(row["prompt"]): len(row["images"]) for row in load_split(mixed / "tasks", "prompts")}
    assert {len(row["images"]) for row in pairs} == {0, 1}
    assert all(prompts[json.dumps(row["prompt"])] == len(row["images"]) for row in pairs)


def test_text_rows_beside_embedded_images_keep_their_turns_and_get_no_images(tmp_path):
    """A vision SFT set as data_prep writes one that embeds its images: text rows have `images` null (the processors
    stopped on None: "only a single or a list of entries is supported"), and a turn that reads as JSON ("42",
    "0110…") stays text through the stage's prompt/completion split (`datasets` stored it as JSON, and TRL's collator
    stopped on the number it came back as)."""
    from datasets import Dataset, Features, Json, List
    from datasets import Image as ImageFeature

    image = tmp_path / "red.png"
    write_png(image)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": "red"}], "images": [{"bytes": image.read_bytes()}]},
            {"messages": [{"role": "user", "content": "0110101110001010110101"},
                          {"role": "assistant", "content": "Ha"},
                          {"role": "user", "content": "What is 40 + 2?"}, {"role": "assistant", "content": "42"}],
             "images": None}]
    data = Dataset.from_list(rows, features=Features({"messages": List(Json()), "images": List(ImageFeature())}))
    rows = vision.sft_rows_to_prompt_completion(vision.decode_images(data, tmp_path, "the set")).to_list()
    assert [len(row["images"]) for row in rows] == [1, 0]
    assert [m["content"] for m in rows[1]["prompt"]] == ["0110101110001010110101", "Ha", "What is 40 + 2?"]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "42"}]


def test_an_offline_pair_without_the_images_of_its_placeholders_is_named(vqa, tiny_model_path, tmp_path):
    """An image pair set with one pair whose `images` is empty but whose prompt keeps its image part: the processor
    stopped UPO's construction with a bare "need at least one array to concatenate"; now the pair's line is named.
    (A text pair, without placeholders, belongs in such a set: `test_upo_trains_on_batches_of_image_and_text_rows`.)"""
    from posttrain.trainers.upo_pairs import load_offline_pairs

    pairs = load_split(vqa / "pairs", "train").map(lambda row, i: {"images": []} if i == 2 else {}, with_indices=True)
    (tmp_path / "pairs").mkdir()
    pairs.to_parquet(str(tmp_path / "pairs" / "train.parquet"))
    processor = load_tokenizer(tiny_model_path("qwen2_vl"))
    with pytest.raises(UserError, match=r"pairs:3: a pair without images whose prompt has image placeholders"):
        load_offline_pairs(str(tmp_path / "pairs"), vision.text_tokenizer(processor), 16, processor=processor)


def test_a_vision_model_is_one_whose_config_has_a_vision_config(tmp_path):
    """A `vision_config` makes a folder a VLM; a `text_config` alone does not (a VLM's language tower saved alone)."""
    from posttrain.models.vision import is_vision_model

    assert not is_vision_model(tmp_path)
    (tmp_path / "config.json").write_text('{"text_config": {"hidden_size": 64}}')
    assert not is_vision_model(tmp_path)
    (tmp_path / "config.json").write_text('{"vision_config": {"hidden_size": 32}}')
    assert is_vision_model(tmp_path)
