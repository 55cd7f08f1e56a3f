"""Build a preference set: preference sources in any supported format -> TRL `prompt/chosen/rejected` rows.

    posttrain data build_preference_set --config data.yaml [--key value ...]
    python -m data_prep.build_preference_set --sources data_prep/sources/hhh_alignment.jsonl --output_dir out/dpo

Formats: preference (TRL standard or conversational, explicit or implicit prompt), erniekit_dpo, rated
(UltraFeedback-style `completions` binarized with `min_score_margin`), unpaired (KTO `prompt/completion/label`,
written as such when every source is unpaired, or when `unpaired: true`).
"""

from .build import SPLITS as SPLITS  # the splits it writes (`jobs.check_data_section`)
from .build import build_set
from .build_sft_set import summary
from .config import PreferenceSetConfig, command_line, parse_config, run
from .config import make_parser as _make_parser

PROG = "posttrain data build_preference_set"


def make_parser():
    return _make_parser(PreferenceSetConfig, PROG, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PreferenceSetConfig, make_parser(), argv)
    card = build_set(cfg, "build_preference_set", ("preference", "unpaired"), command_line(PROG, argv))
    print(summary(cfg.output_dir, card))
    return 0


if __name__ == "__main__":
    run(main)
