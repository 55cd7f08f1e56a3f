"""Padding-free scoring of padded preference batches (`models.padding_free`): the same per-token log-probs, loss and
gradients as TRL's padded forward, on real tokens only."""

import pytest
import torch


def padded_batch(vocab: int, lengths=(9, 5, 12, 7), prompts=(3, 0, 2, 3)):
    """Right-padded rows of different lengths, labels on all but each row's prompt (TRL's layout); the second row
    has none, so its first token must not become the last target of the row before it."""
    generator = torch.Generator().manual_seed(0)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(5, vocab, (length,), generator=generator)
        attention_mask[row, :length] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for row, prompt in enumerate(prompts):
        labels[row, :prompt] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "use_cache": False}


def scored(model, batch):
    model.zero_grad()
    outputs = model(**batch, fused_lm_head=True)
    (outputs.log_probs.sum() + outputs.entropy.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


@pytest.mark.parametrize("attention", ["sdpa", "packed_rows"])
def test_packed_scoring_gives_the_padded_batch_outputs_and_gradients(tiny_model_path, attention):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.models.attention import register
    from posttrain.models.padding_free import pack_scoring_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    batch = padded_batch(model.config.vocab_size)
    padded, padded_grads = scored(model, batch)

    if attention != "sdpa":
        model.set_attn_implementation(register())
    calls = []
    original = model.model.forward
    model.model.forward = lambda **kwargs: calls.append(kwargs["input_ids"].shape) or original(**kwargs)
    pack_scoring_forward(model)
    packed, packed_grads = scored(model, batch)

    assert calls == [(1, int(batch["attention_mask"].sum()))]  # one sequence of the real tokens, no padding
    assert packed.log_probs.shape == padded.log_probs.shape == (4, 11)
    assert (packed.log_probs != 0).sum() == (batch["labels"][:, 1:] != -100).sum()  # every target scored
    torch.testing.assert_close(packed.log_probs, padded.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.entropy, padded.entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.is_top1, padded.is_top1) and torch.equal(packed.label_mask, padded.label_mask)
    torch.testing.assert_close(packed.loss, padded.loss)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_calls_it_cannot_pack_go_to_the_forward_as_it_was(tiny_model_path):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.models.padding_free import pack_scoring_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("llama"), dtype=torch.float32)
    add_fused_lm_head(model)
    pack_scoring_forward(model)
    batch = padded_batch(model.config.vocab_size)
    seen = []
    original = model.model.forward
    model.model.forward = lambda **kwargs: seen.append(kwargs["input_ids"].shape[0]) or original(**kwargs)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # plain forward
        unpadded = {k: v[:, :5] if torch.is_tensor(v) else v for k, v in batch.items()}
        unpadded["attention_mask"] = torch.ones_like(unpadded["attention_mask"])
        model(**unpadded, fused_lm_head=True)  # nothing to remove
        model(**batch, fused_lm_head=True, token_type_ids=torch.zeros_like(batch["input_ids"]))  # unknown input
    assert logits.shape[:2] == batch["input_ids"].shape
    assert seen == [4, 4, 4]


def test_models_with_multimodal_positions_stay_padded(tiny_model_path):
    """Qwen2-VL's text model expands packed position ids to its three rotary sections and drops the row boundaries
    they carry: packed, a row attends to the rows before it and its log-probs change. The stages keep such a
    model's batches padded (`padding_free_problem`); a model with plain positions packs, for which the outputs are
    those of the padded batch (above)."""
    from transformers import AutoModelForImageTextToText
    from trl.trainer.utils import add_fused_lm_head

    from posttrain.models import load_model
    from posttrain.models.padding_free import pack_scoring_forward
    from posttrain.stages.common import padding_free_problem

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path("qwen2_vl"), dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs",))
    batch = padded_batch(model.config.get_text_config().vocab_size)
    with torch.no_grad():
        padded = model(**batch, fused_lm_head=True).log_probs
        pack_scoring_forward(model)
        packed = model(**batch, fused_lm_head=True).log_probs
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=1e-5)  # the first row has no row before it
    assert (packed[1:] - padded[1:]).abs().max() > 1e-2, "the rows after it attend across row boundaries"
    assert "multimodal rotary positions" in padding_free_problem(model, images=False)
    assert padding_free_problem(load_model(tiny_model_path("llama")), images=False) is None
    assert "image rows" in padding_free_problem(load_model(tiny_model_path("llama")), images=True)
