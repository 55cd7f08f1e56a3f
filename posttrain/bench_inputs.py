"""`posttrain bench`'s inputs: the model (the default one, a local folder, or random weights in a named shape), the
benchmark's SFT/DPO/RL data written from the task generator or real conversations, and the adapter DPO and UPO continue."""

import importlib.util
import json
from pathlib import Path

# Random-weight models in the shape of real ones (`--model shape:<name>`), for GPU runs without the Hub
SHAPES = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936),
}


def resolve_bench_model(spec: str, work: Path) -> Path:
    """`default` (the default recipe's base model), `shape:<name>` (random weights, `SHAPES`), or anything
    `models.resolve_model` takes (`tiny:llama`, a folder, a cached Hub id)."""
    from .models import resolve_model
    from .recipe import load_recipe

    if spec == "default":
        base = load_recipe().base
        return resolve_model(base.model_name_or_path, base.model_revision, base.gguf_file, base.gguf_package)
    if spec.startswith("shape:"):
        return build_shaped_model(spec.split(":", 1)[1], work / "models" / spec.split(":", 1)[1])
    return resolve_model(spec)


def build_shaped_model(name: str, out: Path) -> Path:
    """A random-weight bf16 model of a known shape with the tiny tokenizer (its ids fit any vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .errors import UserError
    from .io import save_pretrained
    from .models import TINY_TOKENIZER

    if name not in SHAPES:
        raise UserError(f"unknown model shape 'shape:{name}'; choose one of: {', '.join(SHAPES)}")
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    shape = dict(SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.5B weights on CPU is slow
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return save_pretrained(out, model.to("cpu"), tokenizer, if_exists="keep")


def write_bench_data(tasks: Path, out: Path, tokenizer, kind: str = "tasks", max_length: int = 256) -> None:
    """SFT conversations and DPO pairs with TRL's own per-row `chat_template_kwargs` (so the plain script renders them
    as the stage does), and RL prompts rendered to text in their thinking mode (both sides tokenize the same text).

    `kind`: "tasks", the arithmetic tasks' rows (about 58 tokens each: a step is mostly per-kernel overhead on a GPU);
    "chat", rows of varied length as real data has them: SFT on the human conversations of
    `data_prep/sources/chitchat.jsonl` (300, about 20 to 1,000 tokens) whose first reply ends within `max_length` (the
    stage refuses a row whose end-of-turn token it cuts off), DPO on the dialogues and replies of
    `hhh_alignment.jsonl` (221 pairs; a BIG-bench evaluation set, used here to time random-weight models only), those
    that fit in `max_length` whole (the stages refuse a prompt that leaves no room for the reply)."""
    from datasets import load_dataset

    from .trainers.upo_pairs import render_prompt_text

    prompts = load_dataset("parquet", data_files=str(tasks / "prompts.parquet"), split="train")
    if kind == "chat":
        sources = Path(importlib.util.find_spec("data_prep").origin).parent / "sources"  # its package data
        sft = load_dataset("json", data_files=str(sources / "chitchat.jsonl"), split="train")
        pairs = load_dataset("json", data_files=str(sources / "hhh_alignment.jsonl"), split="train")
        no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}

        def tokens(messages):
            text = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        def first_reply_fits(messages) -> bool:  # the SFT stage refuses a row whose end-of-turn max_length cuts off
            end = next(i for i, message in enumerate(messages) if message["role"] == "assistant") + 1
            return tokens(messages[:end]) <= max_length

        sft = sft.filter(lambda row: first_reply_fits(row["messages"])).map(lambda row: no_thinking)
        pairs = pairs.filter(lambda row: max(tokens(row["prompt"] + row[side]) for side in ("chosen", "rejected"))
                             <= max_length).map(lambda row: no_thinking)
    else:
        sft = load_dataset("parquet", data_files=str(tasks / "sft.parquet"), split="train")
        sft = sft.map(lambda row: {"chat_template_kwargs": {"enable_thinking": bool(row["thinking"])}})
        completions, modes = prompts["completion"], [bool(m) for m in prompts["thinking"]]

        def wrong(i: int) -> str:  # the next task's reply in the same thinking mode: a wrong answer in the same format
            n = len(completions)
            return completions[next((k % n for k in range(i + 1, i + n) if modes[k % n] == modes[i]), i)]

        pairs = prompts.map(lambda row, i: {
            "chosen": [{"role": "assistant", "content": row["completion"]}],
            "rejected": [{"role": "assistant", "content": wrong(i)}],
            "chat_template_kwargs": {"enable_thinking": modes[i]}}, with_indices=True)
    sft.select_columns(["messages", "chat_template_kwargs"]).to_parquet(out / "sft" / "train.parquet")
    pairs.select_columns(["prompt", "chosen", "rejected", "chat_template_kwargs"]).to_parquet(
        out / "pairs" / "train.parquet")
    rl = prompts.map(lambda row: {"prompt": render_prompt_text(tokenizer, row["prompt"], row["thinking"])})
    rl.select_columns(["prompt", "answer", "domain", "thinking"]).to_parquet(out / "prompts" / "train.parquet")


def starting_adapter(model: Path, out: Path) -> Path:
    """A LoRA adapter (r16, all linear layers) with small non-zero weights, standing in for the previous stage's. The
    one already in `out` is kept only when it was made for `model`: one --work folder serves benches of other models."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = out / "adapter_config.json"
    if (out / "adapter_model.safetensors").is_file() and config.is_file() and \
            json.loads(config.read_text()).get("base_model_name_or_path") == str(model):
        return out
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                                LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1e-3)
    peft_model.save_pretrained(out)
    return out
