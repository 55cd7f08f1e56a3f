"""Build on-policy preference pairs: sample replies from a model (+ adapter), score them, pair best vs worst.

The input of on-policy DPO and of offline UPO: the pairs come from the policy's own distribution, so DPO learns to
move probability between things the model actually says. For every prompt, `num_samples` replies are sampled and
scored with the reward functions (`posttrain.rewards`); the best and worst reply form a pair when their reward gap is
at least `margin` (the same mining rule as online UPO, `posttrain.trainers.upo_pairs.mine_pairs`).

With `reference_chosen`, a prompt's reference reply (its `completion` column, which the verifiable task sets carry)
competes as one more candidate, ranked first among equals: the chosen side is then a reply whose working is right, not
a sample that reached the right answer by a wrong route (a 135M model's correct samples often are: "p-a-z-i-n-o-p,
That is 5 letters." for "pizza"), and a prompt gives a pair whenever one sample is wrong, not only when the samples
disagree. The rejected side stays the policy's own worst sample.

    posttrain data build_onpolicy_pairs --model_name_or_path DIR --adapter_path outputs/<run>/sft \
        --prompts outputs/<run>/data/verifiable --output_dir outputs/<run>/data/pairs

In a recipe, give the job `after: sft` to run it right after that stage, on that stage's adapter.
Output: `train.parquet` (pairs from `train_split` prompts) and `test.parquet` (from `test_split` prompts) with
`prompt`, `chosen`, `rejected` (conversational), `thinking`, `domain`, `answer`, `chosen_reward`, `rejected_reward`.
No train pair is an error; no test pair is an empty `test.parquet`, which the DPO stage reads as nothing to measure.

Image prompts (an `images` column, a vision-language model whose processor renders them) work the same way: the
answers are sampled with the prompt's images, and each pair keeps its images (embedded), so DPO trains on exactly what
the model saw.
"""

import glob
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.configs import Precision
from posttrain.errors import UserError, is_out_of_memory, what_ran_out

from . import card as card_lib
from .config import command_line, parse_config, run
from .config import make_parser as _make_parser

PROG = "posttrain data build_onpolicy_pairs"
SPLITS = ("train", "test")  # pairs of train_split's and test_split's prompts: a recipe's split names are checked


@dataclass
class OnPolicyPairsConfig:
    model_name_or_path: str = field(default=None, metadata={"help": "Base model folder (or Hub id) to sample from."})
    adapter_path: str | None = field(default=None, metadata={"help": "LoRA adapter applied on the base model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model's own code from its folder "
                                                                     "(`posttrain run` sets it from the recipe's "
                                                                     "base.trust_remote_code)."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder (default: the adapter's, else "
                                                                  "the model's); its chat template renders prompts."})
    prompts: str = field(default=None, metadata={"help": "Prompt rows (prompt/answer/domain/thinking): a data_prep "
                                                         "folder or file."})
    train_split: str = field(default="prompts", metadata={"help": "Split of `prompts` whose pairs go to train."})
    test_split: str | None = field(default="test", metadata={"help": "Split whose pairs go to test (held out)."})
    max_train_prompts: int = field(default=128, metadata={"help": "Prompts sampled from train_split.", "min": 1})
    max_test_prompts: int = field(default=48, metadata={"help": "Prompts sampled from test_split.", "min": 1})
    num_samples: int = field(default=4, metadata={"help": "Replies sampled per prompt.", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling."})
    max_new_tokens: int = field(default=64, metadata={"help": "Reply length budget.", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "Sequences generated together.", "min": 1})
    dtype: Precision = field(default="auto", metadata={"help": "Sampling precision, as eval.dtype: auto (bfloat16 where "
                                                                "the device runs it natively, else float32), "
                                                                "float32, or bfloat16."})
    rewards: dict[str, float] | list[str] = field(
        default_factory=lambda: {"accuracy": 1.0, "think_format": 0.5},
        metadata={"help": "Reward functions by name (posttrain.rewards.REWARDS, or your own by import path) with "
                          "their weights, as UPO's `rewards`: {accuracy: 1.0, think_format: 0.5} in YAML, "
                          "`accuracy=1.0 think_format=0.5` as flags."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Deprecated: the weights of a `rewards` list; write `rewards` as a mapping."}
    )
    margin: float = field(default=0.5, metadata={"help": "Minimum reward gap between chosen and rejected."})
    pairs_per_prompt: int = field(default=1, metadata={"help": "At most this many pairs per prompt.", "min": 1})
    reference_chosen: bool = field(default=False, metadata={"help": "The prompt's reference reply (`completion` "
                                                                     "column) is one more candidate, first among "
                                                                     "equals: a right reply with right working."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    output_dir: str = field(default=None, metadata={"help": "Output folder (replaced atomically)."})
    overwrite: bool = field(default=True, metadata={"help": "Replace `output_dir` if it exists and a data job wrote "
                                                            "it (it holds card.json)."})


    def __post_init__(self):
        self.rewards = reward_mapping(self.rewards, self.reward_weights)
        self.reward_weights = None


def reward_mapping(rewards: dict | list, weights: list | None) -> dict[str, float]:
    """`rewards` as {name: weight}, from a mapping, `name=weight` flags, or the old parallel `rewards` /
    `reward_weights` lists (read with a warning that gives the new spelling)."""
    if isinstance(rewards, dict):
        if weights is not None:
            raise UserError("reward_weights: give the weights inside `rewards` ({name: weight}), not beside it")
        return {name: float(weight) for name, weight in rewards.items()}
    if weights is None and all("=" in item for item in rewards):  # the command line: accuracy=1.0 think_format=0.5
        return {name: float(weight) for name, weight in (item.split("=", 1) for item in rewards)}
    weights = [1.0] * len(rewards) if weights is None else weights
    if len(weights) != len(rewards):
        raise UserError(f"reward_weights: {len(weights)} weights for {len(rewards)} rewards {rewards}")
    mapping = {name: float(weight) for name, weight in zip(rewards, weights)}
    new = "{" + ", ".join(f"{name}: {weight}" for name, weight in mapping.items()) + "}"
    warnings.warn(f"{PROG}: `rewards: {list(rewards)}` with `reward_weights: {list(weights)}` is deprecated and will "
                  f"stop working; write the same as one mapping, `rewards: {new}` (in a recipe: "
                  "data.<name>.rewards, as in stages.upo.rewards)", FutureWarning, stacklevel=2)
    return mapping


def make_parser():
    return _make_parser(OnPolicyPairsConfig, PROG, __doc__.split("\n\n")[0])


def sample_pairs(model, tokenizer, rows: list[dict], config: OnPolicyPairsConfig, journal=None,
                 share=None) -> list[dict]:
    """Sample, score and pair replies for `rows`; pairs carry their rewards for the data card and the report. With a
    `journal` (`generation_journal.Journal`), a run killed while it sampled resumes there; with a `share`
    (`generation.Share`), this process samples its share of the replies and every process gets them all."""
    import torch

    from posttrain.data import prompt_text
    from posttrain.gates import non_thinking_reasoning
    from posttrain.reward_inputs import reward_columns
    from posttrain.rewards import REWARD_COLUMNS, combine_rewards
    from posttrain.trainers.upo_pairs import mine_pairs

    n = config.num_samples
    expanded = [row for row in rows for _ in range(n)]
    images = [r["images"] for r in expanded] if rows and "images" in rows[0] else None
    # with each row's tools (and thinking mode), as DPO renders the pairs, which carry them
    prompts = [prompt_text(tokenizer, r) for r in expanded]
    tools = any(r.get("tools") for r in rows)
    texts, stopped = sample_replies(model, tokenizer, prompts, images, config, journal, share)
    if config.reference_chosen:  # each prompt's group: its reference reply first (it wins ties), then its samples
        texts = [text for g, row in enumerate(rows) for text in (row.get("completion") or "", *texts[g * n:(g + 1) * n])]
        stopped = [flag for g in range(len(rows)) for flag in (True, *stopped[g * n:(g + 1) * n])]
        n += 1
        expanded = [row for row in rows for _ in range(n)]
    # as UPO gives them: tool_calls too, and the columns rewards of your own name where the prompts have them (else,
    # as under GRPO, their parameters keep their defaults)
    columns = {key: [r.get(key) for r in expanded] for key in sorted(reward_columns(config.rewards))
               if key in REWARD_COLUMNS or key in expanded[0]}
    score = combine_rewards(config.rewards)
    prompts = [prompts[g * config.num_samples] for g in range(len(rows)) for _ in range(n)]  # the rewards read them
    rewards = torch.tensor([float("nan") if v is None else v for v in score(texts, prompts=prompts, **columns)])
    # no side of a pair DPO can use: an empty reply, or a non-thinking row's reply that opens a think block of its own
    # (DPO renders it without the empty block it was sampled after; the pair gate refuses it)
    valid = torch.tensor([bool(t.strip()) and not non_thinking_reasoning(row, {"sampled": t})
                          for t, row in zip(texts, expanded)])
    pairs, cut = [], 0
    for chosen, rejected, _gap in mine_pairs(rewards, n, config.margin, config.pairs_per_prompt, valid=valid):
        row = expanded[chosen]
        pairs.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": texts[chosen]}],
                      "rejected": [{"role": "assistant", "content": texts[rejected]}],
                      **({"images": row["images"]} if images else {}), **({"tools": row["tools"]} if tools else {}),
                      "thinking": row.get("thinking"),
                      "domain": row.get("domain"), "answer": row.get("answer"),
                      "chosen_reward": float(rewards[chosen]), "rejected_reward": float(rewards[rejected])})
        cut += not (stopped[chosen] and stopped[rejected])
    if cut:  # DPO renders each side as a finished turn: the end-of-turn token where the budget ran out
        print(f"{PROG}: {cut} of {len(pairs)} pairs have a reply cut at max_new_tokens={config.max_new_tokens} before "
              "it ended; DPO trains it as a finished turn, so the model learns to stop there: raise max_new_tokens")
    return pairs


def sample_replies(model, tokenizer, prompts: list[str], images, config: OnPolicyPairsConfig, journal, share):
    """(texts, whether each ended) of the replies sampled for `prompts`: an out-of-memory error says what to lower."""
    from posttrain.generation import autocast, generate

    # LoRA merged into the bf16 weights: these replies are only sampled, never scored by the model
    try:
        with autocast(model, config.dtype, option=f"{PROG}: dtype", merge_lora=True):
            texts, stopped, _ = generate(model, tokenizer, prompts, config.max_new_tokens, config.batch_size,
                                         images=images, key=f"{PROG}: max_new_tokens", journal=journal,
                                         share=share, do_sample=True, temperature=config.temperature,
                                         top_p=config.top_p)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise UserError(f"{PROG}: out of memory sampling replies ({what_ran_out(exc)}) with {config.batch_size} "
                        f"sequences a batch and up to {config.max_new_tokens} new tokens: lower batch_size") from exc
    return texts, stopped


def sampling_journal(config: OnPolicyPairsConfig, model_dir, share=None):
    """The journal beside the output folder (`.<name>.sampling.jsonl`, one a process under a launcher) that a run
    killed while it sampled resumes from, keyed by the weights sampled from (the base model's content, the adapter
    file), the precision and the seed: at real sizes sampling takes hours. Removed once the pairs are written."""
    from posttrain import lineage
    from posttrain.generation_journal import Journal

    out = Path(config.output_dir)
    identity = lineage.base_identity(config.model_name_or_path, model_dir)
    key = {"model": lineage.base_spelling(model_dir, identity), "dtype": config.dtype, "seed": config.seed,
           "adapter": lineage.weights_fingerprint(config.adapter_path) if config.adapter_path else None}
    part = f".{share.index}-of-{share.count}" if share else ""
    return Journal(out.parent / f".{out.name}.sampling{part}.jsonl", key, say=lambda text: print(f"{PROG}: {text}"))


def image_pairs_dataset(pairs: list[dict]):
    """Pairs with images: embedded images, and message contents kept as JSON (text and image parts mix)."""
    from datasets import Dataset, Features, Image, Json, List, Value

    features = Features({"prompt": List(Json()), "chosen": List(Json()), "rejected": List(Json()),
                         "images": List(Image()), "thinking": Value("bool"), "domain": Value("string"),
                         "answer": Value("string"), "chosen_reward": Value("float64"),
                         "rejected_reward": Value("float64")})
    return Dataset.from_list(pairs, features=features)


def main(argv: list[str] | None = None) -> int:
    import torch

    from posttrain.evaluate import launched_share
    from posttrain.models import adapter_folder, load_for_inference, load_tokenizer, resolve_model

    config = parse_config(OnPolicyPairsConfig, make_parser(), argv, needs_sources=False)
    for key in ("model_name_or_path", "prompts", "output_dir"):
        if not getattr(config, key):
            raise UserError(f"{PROG}: --{key} is required")
    inputs = [config.prompts, config.model_name_or_path, config.adapter_path, config.tokenizer]
    card_lib.check_output_dir(config.output_dir, config.overwrite, inputs)
    # under a launcher (`posttrain run` with several GPUs or --num-processes), one process per device, each
    # sampling its share of the prompts from a seed of its own (one process: `seed`, as without a launcher)
    share = launched_share()
    torch.manual_seed(config.seed + (share.index if share else 0))
    prompts = read_prompts(config)  # what could be wrong is checked before the model loads
    model_dir = resolve_model(config.model_name_or_path)
    if config.adapter_path:
        adapter_folder(config.adapter_path, "--adapter_path")
    tokenizer = load_tokenizer(config.tokenizer or config.adapter_path or model_dir,
                               trust_remote_code=config.trust_remote_code)
    model = load_for_inference(model_dir, adapter=config.adapter_path, precision=config.dtype,
                               trust_remote_code=config.trust_remote_code)
    journal = sampling_journal(config, model_dir, share)
    tables = {split: sample_pairs(model, tokenizer, rows, config, journal=journal, share=share)
              for split, rows in prompts.items()}
    if not tables["train"]:
        raise UserError(f"{PROG}: no prompt gave a pair with reward gap >= {config.margin}: every group of "
                        f"{config.num_samples} samples scored the same. Raise temperature or num_samples.")
    if share is None or share.index == 0:  # every process holds every pair: the first one writes them
        write_pairs(config, argv, prompts, tables, inputs)
        out = Path(config.output_dir)  # and removes the journals, also those of a run killed with other processes
        for left in out.parent.glob(f".{glob.escape(out.name)}.sampling*.jsonl"):
            left.unlink(missing_ok=True)
    journal.remove()
    return 0


def read_prompts(config: OnPolicyPairsConfig) -> dict[str, list[dict]]:
    """{split: prompt rows} of the train split and the test split, checked against the rewards of your own."""
    from posttrain.evaluate import load_rows
    from posttrain.reward_inputs import check_own_reward_columns

    prompts = {"train": load_rows(config.prompts, config.train_split, config.max_train_prompts)}
    if config.test_split:
        prompts["test"] = load_rows(config.prompts, config.test_split, config.max_test_prompts)
    for split, rows in prompts.items():
        check_own_reward_columns(config.rewards, list(rows[0]), f"{PROG}: {config.prompts} ({split})")
    return prompts


def write_pairs(config: OnPolicyPairsConfig, argv, prompts: dict, tables: dict, inputs: list) -> None:
    """The pairs of each split, with their data card."""
    source = {"name": "on-policy samples", "path": f"{config.model_name_or_path} + {config.adapter_path}",
              "license": "same as the prompts", "notes": f"{config.num_samples} samples per prompt at temperature "
              f"{config.temperature}, scored by {config.rewards} (reward: weight); best vs worst "
              f"with gap >= {config.margin}"
              + ("; the reference reply a candidate, first among equals" if config.reference_chosen else "")}
    lengths = [len(p["chosen"][0]["content"]) for rows in tables.values() for p in rows]
    with_images = "images" in tables["train"][0]
    card_lib.write_generated(config, tables, job="build_onpolicy_pairs", kind="preference", source=source,
                             command=command_line(PROG, argv), lengths=lengths, length_unit="characters of chosen",
                             to_dataset=image_pairs_dataset if with_images else None,
                             overwrite=config.overwrite, inputs=inputs,
                             # the prompts sampled: one whose samples all score within `margin` gives no pair
                             read={split: len(rows) for split, rows in prompts.items()},
                             keep_empty=True)  # a stage naming the test split finds it, empty, and says so
    print(f"wrote {config.output_dir}: " + ", ".join(f"{s} {len(t)} pairs" for s, t in tables.items()))
    if config.test_split and not tables["test"]:
        print(f"{PROG}: test has 0 pairs: none of its {len(prompts['test'])} prompts gave two samples with a reward "
              f"gap >= {config.margin}, so DPO will not measure held-out preference accuracy (more test prompts, "
              "num_samples or temperature give some)")


if __name__ == "__main__":
    run(main)
