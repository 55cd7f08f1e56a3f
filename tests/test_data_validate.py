"""Malformed inputs: each gives `FILE:LINE: message` naming the field and what was expected; validate lists them all."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import build_preference_set, build_sft_set, validate
from data_prep.formats import FORMATS
from posttrain.errors import UserError

DATA = Path(__file__).parent / "assets" / "data"
RED = str(DATA / "images" / "red.png")


def msgs(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = {
    "messages": msgs(("user", "hi"), ("assistant", "hello")),
    "preference": {"prompt": "q", "chosen": "a", "rejected": "b"},
    "erniekit_dpo": {"src": ["q"], "tgt": [], "response": [["a"], ["b"]], "sort": [1, 0]},
    "erniekit_sft": {"src": ["q"], "tgt": ["a"]},
    "alpaca": {"instruction": "do", "output": "done"},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "unpaired": {"prompt": "q", "completion": "a", "label": True},
    "rated": {"prompt": "q", "completions": [{"response": "a", "score": 9}, {"response": "b", "score": 1}]},
    "prompt_completion": {"prompt": "q", "completion": "a"},
    "rl": {"prompt": "What is 2 + 2?", "answer": "4", "domain": "math"},
    "gsm8k": {"question": "Sam has 2 apples and buys 3. How many now?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    "math": {"problem": "Compute $1/2 + 1/4$.", "solution": "$\\frac{1}{2}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$"},
    "vqa": {"question": "What colour?", "answer": "red", "image": RED},
    "erniekit_vl": {"image_info": [{"image_url": RED, "matched_text_index": 0}],
                    "text_info": [{"text": "What colour?", "tag": "mask"}, {"text": "red", "tag": "no_mask"}]},
    "sharegpt_preference": {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                            "rejected": {"from": "gpt", "value": "b"}},
    "pairwise_messages": {
        "chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "q"}], "loss_weight": 0.0},
                            {"role": "assistant", "content": [{"type": "text", "value": "a"}], "loss_weight": 1.0}],
        "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "q"}], "loss_weight": 0.0},
                              {"role": "assistant", "content": [{"type": "text", "value": "b"}], "loss_weight": 1.0}]},
    "kto_conversation": {**msgs(("user", "q"), ("assistant", "a")), "label": False},
}

# (id, format, bad row as a dict or raw bytes, expected message fragment)
CASES = [
    ("empty-assistant", "messages", msgs(("user", "hi"), ("assistant", "  ")),
     '"messages[1].content" is empty; expected a non-empty assistant reply'),
    ("empty-user", "messages", msgs(("user", ""), ("assistant", "x")), '"messages[0].content" is empty'),
    ("wrong-role-order", "messages", msgs(("user", "a"), ("user", "b"), ("assistant", "c")),
     "\"messages[1].role\" is 'user' after 'user' (wrong role order); expected 'assistant'"),
    ("starts-with-assistant", "messages", msgs(("assistant", "a"), ("user", "b"), ("assistant", "c")),
     "is 'assistant' as the first turn"),
    ("ends-with-user", "messages", msgs(("user", "a"), ("assistant", "b"), ("user", "c")),
     "expected an assistant reply last"),
    ("unknown-role", "messages", msgs(("user", "a"), ("bot", "b")), '"messages[1].role" is "bot"; expected one of'),
    ("system-in-middle", "messages", msgs(("user", "a"), ("system", "s"), ("assistant", "b")),
     "is 'system' after the first message"),
    ("content-wrong-type", "messages", msgs(("user", 42), ("assistant", "b")), '"messages[0].content" is a int'),
    ("messages-not-list", "messages", {"messages": "hello"}, '"messages" is a str'),
    ("unclosed-think", "messages", msgs(("user", "a"), ("assistant", "<think>hmm")), "opens <think> but never closes"),
    ("think-without-answer", "messages", msgs(("user", "a"), ("assistant", "<think>hmm</think>  ")),
     '"messages[1].content" has a <think> block but no answer after it'),
    ("reasoning-twice", "messages",
     {"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": "<think>x</think>b", "reasoning_content": "y"}]},
     "has both 'reasoning_content' and a <think> block in 'content'"),
    ("reasoning-on-user", "messages",
     {"messages": [{"role": "user", "content": "a", "reasoning_content": "r"}, {"role": "assistant", "content": "b"}]},
     "reasoning on assistant turns only"),
    ("bad-tool-arguments", "messages", {"messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "content": "1"}, {"role": "assistant", "content": "b"}]},
     '"messages[1].tool_calls[0].function.arguments" is not valid JSON'),
    ("tool-without-call", "messages", msgs(("user", "a"), ("assistant", "b"), ("tool", "c"), ("assistant", "d")),
     "is 'tool' after 'assistant'"),
    ("call-without-result", "messages", {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
     "\"messages[2].role\" is 'user' after 'assistant' (wrong role order); expected 'tool'"),
    ("reply-role-order", "preference", {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"},
                                                                  {"role": "assistant", "content": "b"}],
                                        "rejected": "c"},
     "\"chosen[1].role\" is 'assistant' after 'assistant'"),  # indexed in the reply, not after the prompt's turns
    ("missing-image", "messages", {**msgs(("user", "<image>a"), ("assistant", "b")), "images": ["nope.png"]},
     '"images[0]" file not found'),
    ("undecodable-image", "messages",
     {**msgs(("user", "<image>a"), ("assistant", "b")), "images": ["images/not_an_image.png"]},
     "does not decode as an image"),
    ("image-count-mismatch", "messages", {**msgs(("user", "<image><image>a"), ("assistant", "b")), "images": [RED]},
     "has 1 file(s) for 2 image placeholder(s)"),
    ("chosen-equals-rejected", "preference", {"prompt": "q", "chosen": "Same  answer", "rejected": "Same answer "},
     '"chosen" and "rejected" are identical; expected two different replies'),
    ("chosen-empty", "preference", {"prompt": "q", "chosen": "", "rejected": "b"},
     '"chosen" is empty; expected a non-empty assistant reply'),
    ("rejected-missing", "preference", {"prompt": "q", "chosen": "a"}, '"rejected" is missing'),
    ("prompt-wrong-type", "preference", {"prompt": 3, "chosen": "a", "rejected": "b"}, '"prompt" is a int'),
    ("sort-length", "erniekit_dpo", {"src": ["q"], "tgt": [], "response": [["a"], ["b"]], "sort": [1, 0, 2]},
     '"sort" is [1, 0, 2] for 2 responses; expected 2 numbers, higher wins'),
    ("sort-tie", "erniekit_dpo", {"src": ["q"], "tgt": [], "response": [["a"], ["b"]], "sort": [1, 1]},
     "gives every response the same rank"),
    ("dpo-tgt-length", "erniekit_dpo", {"src": ["q1", "q2"], "tgt": [], "response": [["a"], ["b"]], "sort": [1, 0]},
     '"tgt" has 0 turn(s) for 2 in "src"'),
    ("sft-src-tgt-mismatch", "erniekit_sft", {"src": ["q1", "q2"], "tgt": ["a1"]}, '"tgt" has 1 turn(s) for 2'),
    ("sft-label-length", "erniekit_sft", {"src": ["q"], "tgt": ["a"], "label": [1, 0]}, '"label" is [1, 0]'),
    ("alpaca-no-output", "alpaca", {"instruction": "do"}, '"output" is missing; expected the reply text'),
    ("alpaca-history-triple", "alpaca", {"instruction": "do", "output": "done", "history": [["q", "a", "x"]]},
     '"history[0]" is [\'q\', \'a\', \'x\']; expected a [query, reply] pair'),
    ("sharegpt-unknown-speaker", "sharegpt", {"conversations": [{"from": "alien", "value": "x"}]},
     '"conversations[0].from" is \'alien\''),
    ("sharegpt-empty-reply", "sharegpt",
     {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     '"conversations[1].value" is empty; expected a non-empty assistant reply'),  # it named a `content` key
    ("unpaired-bad-label", "unpaired", {"prompt": "q", "completion": "a", "label": "maybe"}, '"label" is \'maybe\''),
    ("unpaired-label-not-0-or-1", "unpaired", {"prompt": "q", "completion": "a", "label": 2},
     '"label" is 2; expected true or false'),
    ("rated-score-not-number", "rated", {"prompt": "q", "completions": [{"response": "a", "score": "high"},
                                                                          {"response": "b", "score": 1}]},
     '"completions[0].score" is \'high\'; expected a number'),
    ("prompt-completion-empty-reply", "prompt_completion", {"prompt": "q", "completion": ""},
     '"completion" is empty; expected a non-empty assistant reply'),
    ("rl-no-answer", "rl", {"prompt": "What is 2 + 2?", "answer": None},
     '"answer" is missing; expected the reference answer'),
    ("rl-rationale-answer", "rl", {"prompt": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
     "\"answer\" holds GSM8K's '####' marker"),
    ("gsm8k-no-marker", "gsm8k", {"question": "What is 2 + 2?", "answer": "2 + 2 is 4"},
     "\"answer\" has no '####' line; expected GSM8K's worked solution ending in '#### <answer>'"),
    ("math-no-box", "math", {"problem": "What is 2 + 2?", "solution": "It is $\\boxed{4$."},
     '"solution" has no closed \\boxed{...} or \\fbox{...}'),
    ("dpo-one-response", "erniekit_dpo", {"src": ["q"], "tgt": [], "response": [["a"]], "sort": [1]},
     '"response" has 1 candidate(s); expected at least two'),
    ("vqa-no-image", "vqa", {"question": "What colour?", "answer": "red", "images": []}, '"image" is missing'),
    ("vl-image-index-out-of-range", "erniekit_vl", {"image_info": [{"image_url": RED, "matched_text_index": 5}],
                                                    "text_info": [{"text": "q", "tag": "mask"},
                                                                  {"text": "a", "tag": "no_mask"}]},
     '"image_info[0].matched_text_index" is 5'),
    ("vl-image-index-one-past-the-end", "erniekit_vl", {"image_info": [{"image_url": RED, "matched_text_index": 2}],
                                                        "text_info": [{"text": "q", "tag": "mask"},
                                                                      {"text": "a", "tag": "no_mask"}]},
     '"image_info[0].matched_text_index" is 2; expected the index of a text_info entry (0..1)'),
    ("sharegpt-preference-prompt-ends-on-reply", "sharegpt_preference",
     {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}},
     '"conversations[1]" is a \'assistant\' turn at the end of the prompt'),
    ("pairwise-unknown-part", "pairwise_messages",
     {"chosen_messages": [{"role": "user", "content": [{"type": "image_url", "value": "x.png"}]},
                          {"role": "assistant", "content": "a"}],
      "rejected_messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     '"chosen_messages[0].content[0]" has type \'image_url\''),
    ("pairwise-no-shared-prompt", "pairwise_messages",
     {"chosen_messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected_messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     '"chosen_messages" and rejected_messages share no leading user turn'),
    ("kto-bad-label", "kto_conversation", {**msgs(("user", "q"), ("assistant", "a")), "label": "maybe"},
     '"label" is \'maybe\'; expected true or false'),
    ("kto-label-read-as-sft", "messages", {**msgs(("user", "q"), ("assistant", "a")), "label": True},
     '"label" is True: a KTO desirability label on a conversation'),
    ("non-utf8", "messages", b'{"messages": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    ("truncated-json", "messages", b'{"messages": [{"role": "user", "con', "not valid JSON"),
    ("not-an-object", "messages", b'[1, 2, 3]', "a JSON list, not an object"),
    ("huge-row", "messages", {**msgs(("user", "x" * 3000), ("assistant", "y"))}, "more than max_row_bytes=2,000"),
]


def write_case(tmp_path, fmt, bad) -> Path:
    path = tmp_path / "data.jsonl"
    line = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
    path.write_bytes(json.dumps(GOOD[fmt]).encode() + b"\n" + line + b"\n")
    copy_images(tmp_path)
    return path


def copy_images(tmp_path):
    if not (tmp_path / "images").exists():
        shutil.copytree(DATA / "images", tmp_path / "images")


@pytest.mark.parametrize("case_id,fmt,bad,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_row_reported_with_line(tmp_path, capsys, case_id, fmt, bad, expected):
    path = write_case(tmp_path, fmt, bad)
    code = validate.main([str(path), "--format", fmt, "--max_row_bytes", "2000"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert len(out) == 1, out  # the good first row is not reported
    assert out[0].startswith(f"{path}:2: ") and expected in out[0], out[0]


def test_every_format_has_a_valid_row_and_a_malformed_case():
    """A format added to data_prep.formats without a malformed case here fails, as does a format whose valid row
    the validator rejects."""
    assert set(GOOD) == set(FORMATS) and {fmt for _, fmt, _, _ in CASES} == set(FORMATS)


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_valid_row_passes(tmp_path, capsys, fmt):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD[fmt]) + "\n")
    copy_images(tmp_path)
    assert validate.main([str(path), "--format", fmt]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out == ""


def test_validate_reports_every_bad_row(tmp_path, capsys):
    lines = [GOOD["preference"], {"prompt": "q", "chosen": "", "rejected": "b"}, GOOD["preference"],
             {"prompt": "q", "chosen": "x", "rejected": "x"}, {"prompt": "q", "chosen": "a"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n" + '{"prompt": "q", "cho\n')
    code = validate.main([str(path)])
    captured = capsys.readouterr()
    bad_lines = [line.split(": ")[0] for line in captured.out.strip().splitlines()]
    assert code == 1 and bad_lines == [f"{path}:2", f"{path}:4", f"{path}:5", f"{path}:7"]
    assert "6 rows in format 'preference', 4 bad" in captured.err  # blank line 6 is not a row


def test_an_unreadable_file_does_not_hide_the_bad_rows_of_the_next(tmp_path, capsys):
    """An empty (or unknown-format) file among several ended the check there: the files after it went unchecked."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "prefs.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}) + "\n")
    code = validate.main([str(tmp_path / "empty.jsonl"), str(tmp_path / "prefs.jsonl")])
    captured = capsys.readouterr()
    assert code == 2 and "empty.jsonl: no rows" in captured.err
    assert f"{tmp_path / 'prefs.jsonl'}:1: \"chosen\" and \"rejected\" are identical" in captured.out


def test_validate_valid_file_exits_zero_as_a_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "data_prep.validate", str(DATA / "messages.jsonl")],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert "5 rows in format 'messages', all valid" in result.stderr


def test_unknown_format_is_a_user_error(tmp_path):
    path = tmp_path / "mystery.jsonl"
    path.write_text('{"question": "q", "reply": "a"}\n')
    with pytest.raises(UserError, match="unknown format.*question, reply"):
        validate.main([str(path)])
    with pytest.raises(SystemExit):  # argparse rejects a format name that does not exist
        validate.main([str(path), "--format", "nope"])


def test_build_fails_on_first_bad_row_with_location(tmp_path):
    path = write_case(tmp_path, "preference", {"prompt": "q", "chosen": "", "rejected": "b"})
    with pytest.raises(UserError, match=r'data\.jsonl:2: "chosen" is empty'):
        build_preferences(tmp_path, path, [])


def test_build_skip_writes_rejects_and_counts(tmp_path):
    path = write_case(tmp_path, "preference", {"prompt": "q", "chosen": "", "rejected": "b"})
    card = build_preferences(tmp_path, path, ["--on_error", "skip"])
    assert card["sources"][0]["rows_invalid"] == 1 and card["splits"]["train"]["rows"] == 1
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert rejects[0]["filter"] == "invalid" and rejects[0]["where"].endswith("data.jsonl:2")
    assert rejects[0]["row"] == {"prompt": "q", "chosen": "", "rejected": "b"}


def build_preferences(tmp_path, path, extra):
    build_preference_set.main(["--sources", str(path), "--output_dir", str(tmp_path / "out"), "--test_size", "0",
                               *extra])
    return json.loads((tmp_path / "out" / "card.json").read_text())


def test_sft_job_refuses_preference_data(tmp_path):
    with pytest.raises(UserError, match="is preference data.*build_sft_set takes sft data"):
        build_sft_set.main(["--sources", str(DATA / "preference_standard.jsonl"), "--output_dir",
                            str(tmp_path / "out")])


def test_skipped_unparsable_line_keeps_its_text(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD["preference"]).encode() + b'\n{"prompt": "caf\xe9", "chosen": "a"\n')
    card = build_preferences(tmp_path, path, ["--on_error", "skip"])
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert card["sources"][0]["rows_invalid"] == 1 and reject["row"] is None
    assert reject["raw_text"] == '{"prompt": "caf\ufffd", "chosen": "a"' and "UTF-8" in reject["reason"]


def test_validate_counts_the_rated_rows_below_the_margin_it_is_given(tmp_path, capsys):
    path = tmp_path / "rated.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completions": [{"response": "a", "score": 2},
                                                               {"response": "b", "score": 1.5}]}) + "\n")
    assert validate.main([str(path), "--check_images", "1"]) == 0
    assert "1 below the score margin" in capsys.readouterr().err
    assert validate.main([str(path), "--min_score_margin", "0.5"]) == 0
    assert "below the score margin" not in capsys.readouterr().err


def test_the_build_summary_counts_the_rows_left_out():
    card = {"splits": {"train": {"rows": 1200}, "test": {"rows": 0}}, "rejects": 3}
    assert build_sft_set.summary("out", card) == ("wrote out: train 1,200 rows, test 0 rows; 3 rows left out "
                                                  "(see out/rejects.jsonl)")


def test_a_bad_row_in_any_dataset_of_a_registry_fails_the_whole_registry(tmp_path, capsys):
    (tmp_path / "good.json").write_text(json.dumps([{"instruction": "do", "output": "done"}]))
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "do", "output": ""}]))
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({"good": {"file_name": "good.json"}, "bad": {"file_name": "bad.json"}}))
    assert validate.main([str(registry)]) == 1
