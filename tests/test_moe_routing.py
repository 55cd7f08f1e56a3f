"""ERNIE-4.5-VL's expert routing (`posttrain.moe_routing`) in small pieces; the collators on real batches and UPO's
forwards are in test_vision.py."""

import dataclasses
from types import SimpleNamespace

from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, DataCollatorForVisionLanguageModeling

from posttrain.models import load_tokenizer
from posttrain.moe_routing import route_collator, with_routing


def test_the_routed_collators_keep_every_trl_setting_and_other_collators_are_left_alone(tiny_model_path):
    processor = load_tokenizer(tiny_model_path("ernie4_5_vl"))
    shared = dict(max_length=64, pad_to_multiple_of=8)  # every setting off TRL's default
    language = dict(completion_only_loss=True, assistant_only_loss=True, dataset_text_field="body", chat_template="x")
    trl_collators = [DataCollatorForVisionLanguageModeling(processor, **shared, **language),
                     DataCollatorForVisionPreference(processor, **shared)]
    for collator in trl_collators:
        trainer = SimpleNamespace(processing_class=processor, data_collator=collator)
        route_collator(trainer)
        assert type(trainer.data_collator) is not type(collator)
        assert all(getattr(trainer.data_collator, field.name) is getattr(collator, field.name)
                   for field in dataclasses.fields(collator))
        routed = trainer.data_collator
        route_collator(trainer)  # already routed: kept as it is
        assert trainer.data_collator is routed
    # ERNIE-4.5-VL on text rows: TRL's text collator, which the model reads as all text
    text = DataCollatorForLanguageModeling(pad_token_id=processor.tokenizer.pad_token_id)
    trainer = SimpleNamespace(processing_class=processor, data_collator=text)
    route_collator(trainer)
    assert trainer.data_collator is text
    # a processor without this routing (LLaVA) keeps TRL's collator
    llava = DataCollatorForVisionLanguageModeling(load_tokenizer(tiny_model_path("llava")))
    trainer = SimpleNamespace(processing_class=llava.processor, data_collator=llava)
    route_collator(trainer)
    assert trainer.data_collator is llava


def test_the_routing_is_computed_on_the_cpu_and_returned_beside_the_tokens():
    """The processor's rule runs in numpy, which cannot read an accelerator's tensors (GRPO's forwards have their
    tokens there); the model wants the routing on the tokens' device."""

    class Tokens:  # token ids on an accelerator, as far as `with_routing` can tell
        device = "accelerator"

        def cpu(self):
            return "tokens on the cpu"

    class Routing:
        def to(self, device):
            return f"routing on the {device}"

    class Processor:
        def create_moe_mm_token_type_ids(self, input_ids):
            assert input_ids == "tokens on the cpu"
            return Routing()

    batch = with_routing(Processor(), {"input_ids": Tokens()})
    assert batch["moe_mm_token_type_ids"] == "routing on the accelerator"
