"""ERNIE-4.5-VL's per-token expert routing (`moe_mm_token_type_ids`), laid out where TRL 1.16 does not.

ERNIE-4.5-VL's MoE layers send each token to the text experts (0) or the vision experts (1 for image tokens and their
start/end tokens, 2 for video), by a per-token field its processor computes from the token ids. TRL extends
`mm_token_type_ids` over the reply with zeros, but not this field: its vision collators for prompt/completion and
preference rows return it at the prompt's length (the model then fails on the shape mismatch), and GRPO never passes
it to the model (every token would go to the text experts, image tokens included).

The field is a function of the tokens, so wherever the tokens end up (prompt + reply, flushed left, truncated) it is
recomputed from them with the processor's own rule: the prompt keeps its values and the reply (which holds no
vision tokens) is text (0), as TRL extends `mm_token_type_ids`. The collators here are TRL's with that one step
added; `UPOTrainer` does the same at each forward of GRPO and of its DPO term.
"""

import contextlib
import dataclasses

import torch
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from .models.vision import is_processor

MOE_ROUTING = "moe_mm_token_type_ids"


def routes_by_modality(processing_class) -> bool:
    """Whether the model's processor makes `moe_mm_token_type_ids` (ERNIE-4.5-VL), which the model needs per token."""
    return is_processor(processing_class) and MOE_ROUTING in processing_class.model_input_names


def with_routing(processor, batch: dict) -> dict:
    """`batch` with `moe_mm_token_type_ids` for its `input_ids`, as the processor computes it."""
    input_ids = batch["input_ids"]
    # the processor's rule runs in numpy, so on the CPU (GRPO's forwards have their tokens on the accelerator)
    batch[MOE_ROUTING] = processor.create_moe_mm_token_type_ids(input_ids.cpu()).to(input_ids.device)
    return batch


class _Routing:
    """Before a TRL collator in the bases: its batch, then the routing of the batch's final tokens."""

    def torch_call(self, examples):
        return with_routing(self.processor, super().torch_call(examples))


@dataclasses.dataclass
class RoutedVisionLanguageCollator(_Routing, DataCollatorForVisionLanguageModeling):
    """TRL's SFT vision collator, plus `moe_mm_token_type_ids` over the whole collated sequence."""


@dataclasses.dataclass
class RoutedVisionPreferenceCollator(_Routing, DataCollatorForVisionPreference):
    """TRL's DPO vision collator, plus `moe_mm_token_type_ids` over the whole collated sequence (chosen and rejected)."""


_ROUTED = {DataCollatorForVisionLanguageModeling: RoutedVisionLanguageCollator,
           DataCollatorForVisionPreference: RoutedVisionPreferenceCollator}


def route_collator(trainer) -> None:
    """Swap the trainer's TRL vision collator for the same one with routing, when its processor routes by modality."""
    collator = trainer.data_collator
    if routes_by_modality(trainer.processing_class) and type(collator) in _ROUTED:
        settings = {field.name: getattr(collator, field.name) for field in dataclasses.fields(collator)}
        trainer.data_collator = _ROUTED[type(collator)](**settings)


@contextlib.contextmanager
def vision_experts_in_graph(module, batch: dict):
    """`module`'s forwards of `batch` with its trainable vision-expert weights (ERNIE-4.5-VL's `vision_moe`) in their
    output's graph at zero weight when `batch` has no vision token, so that DDP counts them as used; else nothing.

    DDP readies at once the all-reduce of a weight its forward did not use (`find_unused_parameters`); a later forward
    around it that does use the weight (UPO's DPO term on offline image pairs, after GRPO's forward of text rows) then
    gave it a gradient in the same backward, and DDP stopped ("marked a variable ready only once"). At zero weight the
    weights' gradient is that later forward's alone, as in one process."""
    routing = batch.get(MOE_ROUTING)
    text_only = torch.is_grad_enabled() and (routing is None or not routing.any())
    experts = [p for n, p in module.named_parameters() if p.requires_grad and ".vision_moe." in n] if text_only else []
    if not experts:
        yield
        return

    def touch(_, __, output):
        key = "log_probs" if output.get("log_probs") is not None else "logits"
        output[key] = output[key] + 0.0 * sum(p.view(-1)[0] for p in experts)
        return output

    handle = module.register_forward_hook(touch)
    try:
        yield
    finally:
        handle.remove()
