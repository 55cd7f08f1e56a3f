"""Build an SFT set: instruction sources in any supported format -> TRL `messages` rows.

    posttrain data build_sft_set --config data.yaml [--key value ...]
    python -m data_prep.build_sft_set --sources data/alpaca.jsonl --output_dir outputs/data/sft

Formats: messages (OpenAI/TRL, with tools and reasoning), sharegpt, alpaca, erniekit_sft, prompt_completion.
Writes OUT/train.parquet, OUT/test.parquet, OUT/README.md (data card), OUT/card.json and OUT/rejects.jsonl.
"""

from .build import SPLITS as SPLITS  # the splits it writes (`jobs.check_data_section`)
from .build import build_set
from .config import SFTSetConfig, command_line, parse_config, run
from .config import make_parser as _make_parser

PROG = "posttrain data build_sft_set"


def make_parser():
    return _make_parser(SFTSetConfig, PROG, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SFTSetConfig, make_parser(), argv)
    card = build_set(cfg, "build_sft_set", ("sft",), command_line(PROG, argv))
    print(summary(cfg.output_dir, card))
    return 0


def summary(out_dir: str, card: dict) -> str:
    """One line per split and the rejects count, for the terminal."""
    splits = ", ".join(f"{name} {s['rows']:,} rows" for name, s in card["splits"].items())
    return f"wrote {out_dir}: {splits}; {card['rejects']:,} rows left out (see {out_dir}/rejects.jsonl)"


if __name__ == "__main__":
    run(main)
