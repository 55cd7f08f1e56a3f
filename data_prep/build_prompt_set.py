"""Build an RL prompt set: questions with reference answers in any supported format -> TRL `prompt/answer` rows.

    posttrain data build_prompt_set --config prompts.yaml [--key value ...]
    python -m data_prep.build_prompt_set --sources data/gsm8k_train.jsonl --output_dir outputs/data/prompts

Formats (`prompt_formats`): gsm8k (`question` + a rationale `answer` ending in `#### 72`: the answer after `####`),
math (`problem` + `solution`: the last `\\boxed{}`), rl (`prompt`/`question`/`problem`, or `messages` ending on a
user turn, + `answer`/`ground_truth`/`reference`/`solution`, + `images`/`image` for a vision prompt). The correctness
rewards compare a reply with `answer`, which must be the final answer alone, not the worked solution these datasets
ship it in.
Writes OUT/prompts.parquet (the UPO stage's `dataset_train_split: prompts`) and OUT/test.parquet (`eval.split: test`),
columns `prompt`, `answer`, `domain` (the row's, else the source's name), `thinking` (when set) and `images` (when a
row has them: absolute paths, or every image embedded when some row has bytes; None in text rows; `<image>`
markers become image parts of `prompt`), as build_verifiable_tasks names them; OUT/README.md (data card),
OUT/card.json and OUT/rejects.jsonl.
"""

from .build import build_set
from .build_sft_set import summary
from .config import PromptSetConfig, command_line, parse_config, run
from .config import make_parser as _make_parser

PROG = "posttrain data build_prompt_set"
SPLITS = ("prompts", "test")  # the splits it writes (`jobs.check_data_section`)


def make_parser():
    return _make_parser(PromptSetConfig, PROG, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PromptSetConfig, make_parser(), argv)
    card = build_set(cfg, "build_prompt_set", ("rl",), command_line(PROG, argv), train_split="prompts")
    print(summary(cfg.output_dir, card))
    return 0


if __name__ == "__main__":
    run(main)
