"""build_prompt_set: RL prompts from GSM8K, MATH, TRL-style and conversation files, with the final answer taken out of
the worked solutions these datasets ship, ready for the UPO stage, its gates, its rewards and evaluation."""

import json
from pathlib import Path

import pytest
import yaml

from data_prep import build_prompt_set, build_sft_set
from data_prep.formats import detect
from data_prep.messages import RowError
from data_prep.prompt_formats import from_gsm8k, from_math, from_rl, gsm8k_answer
from data_prep.records import Options
from posttrain import gates
from posttrain.answers import boxed_content
from posttrain.data import load_split
from posttrain.errors import UserError

NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
           "clips did Natalia sell altogether in April and May?")
GSM8K = [
    {"question": NATALIA, "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
                                    "<<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A car costs $12,000 and the tax is $500. What is the total?",
     "answer": "12,000 + 500 = <<12000+500=12500>>12,500\n#### 12,500"},
    {"question": "How many legs do 3 spiders have?", "answer": "Each spider has 8 legs, so 3 * 8 = 24 legs."},
]
MATH = [
    {"problem": "Compute $\\frac{1}{2} + \\frac{1}{4}$.", "type": "Prealgebra",
     "solution": "We have $\\frac{1}{2} = \\boxed{2}/4$ so the sum is $\\boxed{\\frac{3}{4}}$."},
    {"problem": "What is $2^{10}$?", "solution": "Doubling ten times gives $\\boxed{1024}$.", "answer": "1,024"},
]
TRL = [
    {"prompt": "Reverse the string 'abc'.", "solution": "cba", "domain": "string"},
    {"prompt": [{"role": "user", "content": "What is 6 times 7?"}], "ground_truth": 42},
]
CHAT = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
         "answer": "Paris"}]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("row,fmt", [
    (GSM8K[0], "gsm8k"), (MATH[0], "math"), (MATH[1], "math"), (TRL[0], "rl"), (TRL[1], "rl"), (CHAT[0], "rl"),
    ({"question": "Who wrote Hamlet?", "answer": "Shakespeare"}, "rl"),
    ({"prompt": "Say hi.", "answer": "#### hi"}, "gsm8k"),
    ({"messages": CHAT[0]["messages"] + [{"role": "assistant", "content": "Paris."}], "answer": "Paris"}, "messages"),
    ({"question": "What colour?", "answer": "red", "image": "red.png"}, "vqa"),
])
def test_formats_are_detected_from_the_keys(row, fmt):
    assert detect(row) == fmt


def test_answers_are_taken_out_of_the_worked_solutions():
    assert gsm8k_answer(GSM8K[1]["answer"]) == "12500"  # thousands commas dropped, as GSM8K's evaluation does
    assert gsm8k_answer("#### is how the answer line starts.\n3 + 4 = 7\n#### 7") == "7"  # after the last marker
    assert boxed_content("\\boxed{\\frac{1}{2}} then \\fbox{x^{2}+\\sqrt{3}}") == "x^{2}+\\sqrt{3}"  # the last, nested
    assert boxed_content("\\boxed{4") is None and boxed_content("no box") is None
    assert from_math(MATH[0], Options())["answer"] == "\\frac{3}{4}"
    assert from_math(MATH[1], Options())["answer"] == "1,024"  # an explicit `answer` wins
    record = from_gsm8k(GSM8K[0], Options(domain="gsm8k", system="Think.", thinking=True))
    assert record == {"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": NATALIA}],
                      "answer": "72", "domain": "gsm8k", "thinking": True}
    chat = from_rl(CHAT[0], Options(system="Ignored: the row has one."))
    assert chat["prompt"] == CHAT[0]["messages"] and chat["answer"] == "Paris" and chat["domain"] == "general"
    assert from_rl(TRL[1], Options())["answer"] == "42" and from_rl(TRL[0], Options())["domain"] == "string"
    assert from_rl({"prompt": "What is 2 + 2?", "solution": "Two and two: $\\boxed{4}$."}, Options())["answer"] == "4"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompts")
    test_set = write_jsonl(tmp / "gsm8k_test.jsonl", [{"question": NATALIA, "answer": "#### 72"}])
    sources = [{"path": write_jsonl(tmp / "gsm8k.jsonl", GSM8K), "license": "mit"},
               {"path": write_jsonl(tmp / "competition_math.jsonl", MATH), "license": "mit", "name": "math"},
               write_jsonl(tmp / "trl.jsonl", TRL), write_jsonl(tmp / "chat.jsonl", CHAT)]
    config = tmp / "prompts.yaml"
    config.write_text(yaml.safe_dump({"sources": sources, "output_dir": str(tmp / "out"), "on_error": "skip",
                                      "decontaminate": [test_set], "test_size": 1, "system": "Answer briefly."}))
    assert build_prompt_set.main(["--config", str(config)]) == 0
    return tmp / "out"


def test_the_set_has_the_columns_and_splits_upo_and_evaluation_read(built):
    from posttrain.evaluate import load_rows
    from posttrain.rewards import accuracy

    assert sorted(p.name for p in built.glob("*.parquet")) == ["prompts.parquet", "test.parquet"]
    rows = {split: load_rows(str(built), split) for split in ("prompts", "test")}
    assert len(rows["prompts"]) == 5 and len(rows["test"]) == 1
    answers = {r["answer"]: r for split in rows.values() for r in split}
    assert set(answers) == {"12500", "\\frac{3}{4}", "1,024", "cba", "42", "Paris"}
    assert {r["domain"] for r in answers.values()} == {"gsm8k", "math", "string", "trl", "chat"}
    assert answers["Paris"]["prompt"] == CHAT[0]["messages"]  # its own system turn, not the configured one
    assert all(r["prompt"][0] == {"role": "system", "content": "Answer briefly."}
               for reference, r in answers.items() if reference != "Paris")
    for reference in answers:
        said = reference if reference in ("Paris", "cba") else f"So the answer is {reference}."  # text: the whole reply
        reply = [{"role": "assistant", "content": said}]
        assert accuracy([reply], answer=[reference]) == [1.0], reference
    for split in ("prompts", "test"):
        dataset = load_split(str(built), split)
        assert {"prompt", "answer", "domain"} <= set(dataset.column_names) and "thinking" not in dataset.column_names
        gates.check_prompt_rows(dataset, split)
        assert gates.check_reward_references(dataset, {"accuracy": 1.0}, split)[1] == 0


def test_the_help_names_the_files_the_job_writes(built):
    """`--help` of this job says prompts.parquet where the other builds write train.parquet (it said train.parquet)."""
    import re

    help_text = " ".join(build_prompt_set.make_parser().format_help().split())
    named = set(re.findall(r"\w+\.parquet", help_text))
    assert named == {p.name for p in built.glob("*.parquet")} == {"prompts.parquet", "test.parquet"}
    assert "0 writes prompts.parquet only" in help_text


def test_rows_left_out_name_their_file_line_and_why(built):
    rejects = [json.loads(line) for line in (built / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["where"].rsplit("/", 1)[-1]: (r["filter"], r["reason"]) for r in rejects}
    assert reasons["gsm8k.jsonl:3"] == ("invalid", "\"answer\" has no '####' line; expected GSM8K's worked solution "
                                                   "ending in '#### <answer>'")
    assert reasons["gsm8k.jsonl:1"][0] == "contamination" and "gsm8k_test.jsonl" in reasons["gsm8k.jsonl:1"][1]
    card = json.loads((built / "card.json").read_text())
    assert [s["format"] for s in card["sources"]] == ["gsm8k", "math", "rl", "rl"] and card["kind"] == "rl"


def test_the_raw_gsm8k_column_is_refused_by_the_gate():
    from datasets import Dataset

    raw = Dataset.from_list([{"prompt": [{"role": "user", "content": GSM8K[0]["question"]}],
                              "answer": GSM8K[0]["answer"]}])
    gates.check_prompt_rows(raw, "gsm8k.jsonl")
    with pytest.raises(UserError, match="gsm8k.jsonl row 1 .*'####' marker.*build_prompt_set"):
        gates.check_reward_references(raw, {"accuracy": 1.0}, "gsm8k.jsonl")


def test_one_prompt_in_both_thinking_modes_is_two_prompts(tmp_path):
    """The same question with `thinking: true` and `thinking: false` was an "exact duplicate": every non-thinking copy
    was dropped, and UPO trained the thinking mode alone. Both stay, on one side of the held-out split."""
    rows = [{"prompt": f"What is {n} + 2?", "answer": str(n + 2), "thinking": mode} for n in range(4)
            for mode in (True, False)]
    source = write_jsonl(tmp_path / "modes.jsonl", rows)
    assert build_prompt_set.main(["--sources", source, "--output_dir", str(tmp_path / "out"), "--test_size", "2"]) == 0
    splits = {split: load_split(str(tmp_path / "out"), split) for split in ("prompts", "test")}
    assert sorted(splits["prompts"]["thinking"]) == [False, False, False, True, True, True]
    assert sorted(splits["test"]["thinking"]) == [False, True] and len(set(splits["test"]["answer"])) == 1


def test_a_bad_row_stops_the_job_naming_its_line(tmp_path):
    source = write_jsonl(tmp_path / "math.jsonl", [MATH[0], {"problem": "What is 1 + 1?", "solution": "Two."}])
    with pytest.raises(UserError, match=r"math.jsonl:2: \"solution\" has no closed \\boxed"):
        build_prompt_set.main(["--sources", json.dumps({"path": source, "format": "math"}), "--output_dir",
                               str(tmp_path / "out")])


def test_the_other_builds_point_rl_data_to_this_job(tmp_path):
    source = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    with pytest.raises(UserError, match=r"is rl data \(format 'gsm8k'\); build_sft_set takes sft data: .* "
                                        "build_prompt_set reads it"):
        build_sft_set.main(["--sources", source, "--output_dir", str(tmp_path / "out")])


def test_a_recipe_runs_the_job_and_points_upo_at_its_splits(tmp_path):
    """Through the child process a recipe's `data:` section uses: the recipe's split names are checked against the
    splits the job writes (`dataset_train_split: prompts`, `eval.split: test`), and it runs."""
    from posttrain import datajobs
    from posttrain.recipe import load_recipe
    from posttrain.recipe_files import split_problems

    source = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K[:2])
    job = {"job": "build_prompt_set", "sources": [source], "thinking": False, "test_size": 1}
    upo = {"dataset_name": "{data}/prompts", "dataset_train_split": "prompts", "rewards": {"accuracy": 1.0}}
    raw = {"name": "own-prompts", "modality": "text", "base": {"model_name_or_path": "tiny:llama"},
           "data": {"prompts": job}, "eval": {"dataset": "{data}/prompts", "split": "test"}, "stages": {"upo": upo}}
    recipe = load_recipe(raw=raw)
    assert recipe.data_splits == {"prompts": ["prompts", "test"]} and split_problems(recipe) == []
    wrong = load_recipe(raw={**raw, "stages": {"upo": {**upo, "dataset_train_split": "train"}}})
    assert split_problems(wrong) == ["stages.upo.dataset_train_split: 'train' is not a split of {data}/prompts (its "
                                     "job build_prompt_set writes: prompts, test)"]
    datajobs.run_job("build_prompt_set", {k: v for k, v in job.items() if k != "job"}, tmp_path / "out")
    rows = load_split(str(tmp_path / "out"), "prompts").to_list() + load_split(str(tmp_path / "out"), "test").to_list()
    assert sorted(r["answer"] for r in rows) == ["12500", "72"] and {r["thinking"] for r in rows} == {False}
    assert {r["domain"] for r in rows} == {"gsm8k"}


COLOUR = "<image>What colour is it? Answer with one word."


def image_prompts(tmp_path: Path, rows: list[dict]) -> str:
    """An rl file beside one small PNG per colour: the rows ask the same question of different images."""
    from PIL import Image

    for colour in ("red", "blue", "green"):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{colour}.png")
    return write_jsonl(tmp_path / "rl.jsonl", rows)


def test_image_prompts_keep_their_images_beside_text_prompts(tmp_path):
    """The `images` of rl rows were dropped: the `<image>` marker stayed text, and rows asking one question of
    different images were left out as duplicates. Image rows now carry image parts and absolute paths, as sft and
    preference rows do; text rows in the same set stay plain, without images."""
    rows = [{"prompt": COLOUR, "answer": "red", "images": ["red.png"]},
            {"prompt": COLOUR, "answer": "blue", "image": "blue.png"},  # `image`: a path, as `vqa` takes it
            {"prompt": COLOUR, "answer": "green", "images": ["green.png"]},
            {"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 4 + 5?", "answer": "9"}]
    source = image_prompts(tmp_path, rows)
    assert build_prompt_set.main(["--sources", source, "--output_dir", str(tmp_path / "out"), "--test_size", "0"]) == 0
    prompts = {r["answer"]: r for r in load_split(str(tmp_path / "out"), "prompts").to_list()}
    assert sorted(prompts) == ["5", "9", "blue", "green", "red"]
    for colour in ("red", "blue", "green"):
        assert prompts[colour]["images"] == [str((tmp_path / f"{colour}.png").resolve())]
        assert prompts[colour]["prompt"] == [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What colour is it? Answer with one word."}]}]
    assert prompts["5"]["images"] is None and prompts["5"]["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]


def test_an_image_prompt_without_its_file_stops_the_job_naming_its_line(tmp_path):
    source = image_prompts(tmp_path, [{"prompt": COLOUR, "answer": "red", "images": ["red.png"]},
                                      {"prompt": COLOUR, "answer": "pink", "images": ["pink.png"]}])
    with pytest.raises(UserError, match=r"rl.jsonl:2: \"images\[0\]\" file not found: .*pink.png"):
        build_prompt_set.main(["--sources", source, "--output_dir", str(tmp_path / "out")])


def test_an_image_prompt_needs_one_image_per_placeholder(tmp_path):
    image_prompts(tmp_path, [])
    with pytest.raises(RowError, match=r"\"images\" has 1 file\(s\) for 2 image placeholder\(s\)"):
        from_rl({"prompt": "<image> or <image>: which is red?", "answer": "left", "images": ["red.png"]},
                Options(base_dir=tmp_path))
