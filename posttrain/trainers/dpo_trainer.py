"""TRL's DPOTrainer, scoring only the model's own turns of replies that hold tool results, with its `sft` loss term
averaged over the optimizer step's chosen tokens.

TRL (1.16) takes everything a reply's rendering adds after the prompt as the completion and scores all of it in the
policy's and the reference's log-probs: in a reply that calls a tool, reads its result and answers, the result (text
the environment wrote) counted as the model's own. Rows whose replies have `tool` turns get per-token masks from the
chat template's `{% generation %}` markers (`chosen_mask`, `rejected_mask`), as SFT's assistant-only loss trains
them; the collator scores only those tokens, in training, evaluation and the precomputed reference log-probs alike.
A dataset without tool turns is tokenized and collated exactly as TRL does it. Image pairs TRL tokenizes in its
collator, past these masks: the stage refuses those with tool turns (`stages.pairs.load_pairs`).

The `sft` term (`loss_type: [sigmoid, sft]`, RPO) is, in TRL, the mean NLL over the chosen tokens of each micro-batch
of each process, where the other terms are means over pairs: with gradient accumulation or several processes, a
token of a short reply weighed more when its micro-batch held short replies (4 pairs x 2 processes trained other
weights than 8 pairs in one). `DPOTrainer` counts the step's chosen tokens, all micro-batches and processes, and
weighs each micro-batch's term by its share of them, as transformers' Trainer does for SFT's `num_items_in_batch`.

With `precompute_ref_log_probs`, TRL's main process writes the reference log-probs to a file beside the dataset's
own Arrow files, in its machine's datasets cache, and every process then opens that file: a process on another
machine, with a cache of its own, found none (FileNotFoundError), nor did every process but the main one when the
dataset had no cache files (each drew a random name). The file goes under the stage's output folder instead
(`REF_LOGPS`), which every machine of a run shares, and is removed when training ends. TRL names the file after
the dataset's fingerprint, which its own filter of truncated rows draws at random in each run; in a stage folder the
pipeline made (its `lineage.json` records the stage's inputs hash, and the folder holds only one set of inputs) the
file is named after that hash instead, so a stage resumed after a fault reads what it computed before rather than
computing it again (a pass over every pair: hours at real sizes).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import trl
from trl.trainer.dpo_trainer import DataCollatorForPreference

from ..data import has_tool_turns
from ..errors import UserError, row_name
from ..io import read_json

MASKS = ("chosen_mask", "rejected_mask")
REF_LOGPS = "ref_logps"  # the precomputed reference log-probs, under the stage's output folder while it trains


def reply_masks(dataset, tokenizer, name: str):
    """`dataset` (tokenized by TRL) with `chosen_mask`/`rejected_mask` over `chosen_ids`/`rejected_ids` when some row
    has tool turns: 1 on the tokens inside the generation markers, all 1 for a row without tool turns."""
    if not any(has_tool_turns(row) for row in dataset.select_columns(["chosen", "rejected"])):
        return dataset

    def add(row, index):
        if not has_tool_turns(row):
            return {mask: [1] * len(row[side + "_ids"]) for mask, side in zip(MASKS, ("chosen", "rejected"))}
        tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
        kwargs = {"tools": tools, **(row.get("chat_template_kwargs") or {})}
        masks = {}
        for mask, side in zip(MASKS, ("chosen", "rejected")):
            out = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True, **kwargs)
            start = len(row["prompt_ids"])
            if out["input_ids"] != row["prompt_ids"] + row[side + "_ids"] or not any(out["assistant_masks"][start:]):
                raise UserError(f"{name} {row_name(index)}: the {side} reply has tool results, which DPO must not "
                                "score as the model's own tokens, but the chat template marks none of the reply's "
                                "own turns; expected a template with {% generation %} markers around the assistant "
                                "turns (built-ins: chatml, ernie4_5)")
            masks[mask] = out["assistant_masks"][start:]
        return masks

    return dataset.map(add, with_indices=True, desc=f"Masking tool results in {name}")


@dataclasses.dataclass
class ReplyMaskCollator(DataCollatorForPreference):
    """TRL's preference collator whose `completion_mask` keeps only the tokens of a row's `chosen_mask` and
    `rejected_mask`, when the rows have them."""

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        if MASKS[0] not in examples[0]:
            return batch
        masks = [[1] * len(e["prompt_ids"]) + e[mask] for mask in MASKS for e in examples]  # TRL's order
        cut = slice(-self.max_length, None) if self.max_length and self.truncation_mode == "keep_end" else \
            slice(self.max_length)
        width = batch["completion_mask"].shape[1]
        own = [m[cut] + [0] * (width - len(m[cut])) for m in masks]
        batch["completion_mask"] = batch["completion_mask"] * batch["completion_mask"].new_tensor(own)
        return batch


def chosen_tokens(batch) -> torch.Tensor:
    """The chosen replies' scored tokens of a collated batch (TRL's rows: the chosen ones, then the rejected ones;
    the mask shifted as TRL's `sft` term reads it)."""
    return batch["completion_mask"][..., 1:].chunk(2, dim=0)[0].sum()


class DPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer with the reply masks above and the step-wide `sft` term (see the module's docstring)."""

    _sft_tokens_in_step = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if "sft" in self.loss_types and batches:
            local = sum(chosen_tokens(batch) for batch in batches).to(device)
            self._sft_tokens_in_step = self.accelerator.reduce(local, reduction="sum").item()
        return batches, num_items

    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's loss, the `sft` term's weight scaled for this micro-batch: its chosen tokens x accumulation steps x
        processes / the step's chosen tokens (the Trainer divides by the accumulation steps, DDP averages over the
        processes), so the term is the step's token mean. Evaluation batches keep TRL's own mean."""
        if "sft" not in self.loss_types or not self.model.training or not self._sft_tokens_in_step:
            return super()._compute_loss(model, inputs, return_outputs)
        weights = self.loss_weights
        share = (chosen_tokens(inputs).item() * self.current_gradient_accumulation_steps
                 * self.accelerator.num_processes / self._sft_tokens_in_step)
        self.loss_weights = [w * share if kind == "sft" else w for kind, w in zip(self.loss_types, weights)]
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.loss_weights = weights

    @property
    def data_collator(self):
        return self._data_collator

    @data_collator.setter
    def data_collator(self, collator):  # set by Trainer.__init__, before TRL precomputes the reference log-probs
        if type(collator) is DataCollatorForPreference:
            collator = ReplyMaskCollator(**{f.name: getattr(collator, f.name) for f in dataclasses.fields(collator)})
        self._data_collator = collator

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return reply_masks(dataset, processing_class, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's, with its cache file under the output folder, named after the stage's inputs where the pipeline
        recorded them (see the module's docstring)."""
        folder = Path(self.args.output_dir) / REF_LOGPS
        folder.mkdir(parents=True, exist_ok=True)
        inputs = read_json(Path(self.args.output_dir) / "lineage.json").get("inputs_hash")
        # TRL asks first for the log-probs' file, then (concatenating them to the rows it filtered) for the file of
        # the rows with their selection flattened, which must be another one
        names = iter([f"cache-{name}-{inputs}.arrow"] if inputs else [])
        dataset._get_cache_file_path = lambda fingerprint: str(folder / next(names, f"cache-{fingerprint}.arrow"))
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            del dataset._get_cache_file_path

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.args.precompute_ref_log_probs:
            self.accelerator.wait_for_everyone()  # every process is done reading the reference log-probs
            if self.accelerator.is_main_process:
                shutil.rmtree(Path(self.args.output_dir) / REF_LOGPS, ignore_errors=True)
        return result

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *MASKS]
