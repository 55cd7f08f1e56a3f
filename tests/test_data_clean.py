"""Dedup, near-dup, decontamination, length filters and mixing do what they say, on small handcrafted data."""

import json
import random
import zlib
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from data_prep import build, build_sft_set, clean
from posttrain.errors import UserError
from posttrain.models import TINY_TOKENIZER, chat_template_text, load_tokenizer

WORDS = ("river stone cloud lamp orange music window garden silver paper engine forest candle bridge "
         "mountain pepper violin harbor meadow rocket").split()


def prose(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(n))


def table(texts: list[str], keys: list[str] | None = None) -> Dataset:
    return Dataset.from_dict({"_text": texts, "_key": keys or [""] * len(texts), "_source": ["f"] * len(texts),
                              "_origin": [f"f.jsonl:{i + 1}" for i in range(len(texts))]})


def test_exact_dedup_normalises_case_space_and_unicode():
    texts = ["Hello   World", "hello world", "Ｈｅｌｌｏ world", "Hello, world!", "something else"]
    kept, removed = clean.exact_dedup(table(texts))
    assert kept["_text"] == ["Hello   World", "Hello, world!", "something else"]
    assert removed["_reason"] == ["exact duplicate of f.jsonl:1"] * 2


def test_near_dedup_removes_one_word_edits_keeps_different_text():
    base = prose(0)
    edited = base.replace(base.split()[100], "changed", 1)
    half = " ".join(base.split()[:100]) + " " + prose(1, 100)
    kept, removed = clean.near_dedup(table([base, prose(2), edited, half]), threshold=0.8)
    assert kept["_origin"] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:4"]
    assert removed["_origin"] == ["f.jsonl:3"] and "near-duplicate" in removed["_reason"][0]
    assert removed["_reason"][0].endswith("of f.jsonl:1")


def test_near_dedup_finds_the_copies_at_its_threshold_and_takes_a_threshold_of_one():
    """Candidates come from LSH bands; with datasketch's balanced default (8 bands of 16 at 0.85) about a fifth of
    the copies with 1 % of words changed (Jaccard ~0.9) were never compared, and kept. At 1.0 it crashed."""
    texts = []
    for seed in range(40):
        words = prose(100 + seed, 300).split()
        rng = random.Random(seed)
        edited = list(words)
        for i in rng.sample(range(300), 3):
            edited[i] = "changed" + str(rng.randint(0, 99))
        texts += [" ".join(words), " ".join(edited)]
    kept, removed = clean.near_dedup(table(texts), threshold=0.85)
    assert len(removed) >= 36 and len(kept) + len(removed) == 80  # ~0.9 estimated: a few may fall just under 0.85
    kept, removed = clean.near_dedup(table([prose(0), prose(0), prose(1)]), threshold=1.0)
    assert removed["_origin"] == ["f.jsonl:2"]


def test_near_dedup_reads_each_column_once_however_many_candidates(column_reads):
    """Rows that share a long system prompt are ~70 % alike: most pairs are LSH candidates, and each candidate read
    its key from the table again (4,000 such rows took 81 s). The columns are read once."""
    system = prose(7, 150)
    texts = [f"{system} {prose(1000 + i, 20)}" for i in range(120)]
    kept, removed = clean.near_dedup(table(texts), threshold=0.95)
    assert len(kept) == 120 and column_reads["row"] == 0, column_reads
    copies = clean.near_dedup(table(texts[:20] + texts[:5]), threshold=0.95)[1]
    assert copies["_origin"] == [f"f.jsonl:{i}" for i in range(21, 26)]


def test_decontamination_names_the_ngram_and_eval_set():
    question = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"
    ngrams = clean.eval_ngrams({"gsm8k.jsonl": [question]}, n=13)
    leaked = f"Solve this: {question.upper()}. How many in total?"
    kept, removed = clean.decontaminate(table([leaked, "Natalia sold clips to friends.", prose(3)]), ngrams, 13)
    assert kept["_origin"] == ["f.jsonl:2", "f.jsonl:3"]
    assert "13-gram \"natalia sold clips to 48" in removed["_reason"][0] and "gsm8k.jsonl" in removed["_reason"][0]


def test_decontamination_finds_an_eval_text_exactly_n_words_long_and_dedup_reads_short_rows():
    """An eval text of exactly n words is one n-gram (its last one counts too); rows shorter than a shingle are
    compared as one shingle, so distinct short rows are kept and copies of one are not."""
    question = "what is the capital city of the country that lies north of spain"  # 13 words
    ngrams = clean.eval_ngrams({"geo.jsonl": [question]}, n=13)
    kept, removed = clean.decontaminate(table([f"Q: {question}?", "what is the capital city of france"]), ngrams, 13)
    assert removed["_origin"] == ["f.jsonl:1"] and kept["_origin"] == ["f.jsonl:2"]
    kept, removed = clean.near_dedup(table(["yes", "no", "thanks a lot", "yes"]), threshold=0.8)
    assert kept["_origin"] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"] and removed["_origin"] == ["f.jsonl:4"]


def test_decontamination_finds_every_eval_ngram_the_first_and_the_last_in_hash_order():
    """The index is sorted by hash and searched with `searchsorted`: each of an eval text's n-grams, the one with the
    largest hash (at the end of the table) too, removes a row that holds it alone."""
    question = [f"{word}{i}" for i, word in enumerate(WORDS[:8])]  # 8 words: 4 five-grams
    ngrams = clean.eval_ngrams({"eval.jsonl": [" ".join(question)]}, n=5)
    rows = [" ".join(question[start:start + 5]) for start in range(4)]
    kept, removed = clean.decontaminate(table(rows + [prose(1)]), ngrams, 5)
    assert removed["_origin"] == [f"f.jsonl:{i}" for i in range(1, 5)] and kept["_origin"] == ["f.jsonl:5"]


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.85, 0.9, 0.95])
def test_lsh_bands_find_a_pair_at_the_threshold_99_percent_of_the_time(threshold):
    """The bands are the fewest that miss a pair of similarity `threshold` at most 1 % of the time (a missed
    candidate is a duplicate kept; datasketch's default misses ~20 % at 0.9): the longest bands that reach 99 %."""
    bands, rows = clean.lsh_bands(threshold, 128)
    assert bands * rows <= 128 and (1 - threshold ** rows) ** bands <= 0.01
    assert (1 - threshold ** (rows + 1)) ** (128 // (rows + 1)) > 0.01


def test_records_with_other_answers_are_different_text():
    # a verifiable task's rows with one prompt and two answers are two examples, and an answer can leak eval text
    prompt = [{"role": "user", "content": "What is 6 * 7?"}]
    assert clean.record_text({"prompt": prompt, "answer": "42"}) != clean.record_text({"prompt": prompt, "answer": "43"})


def test_length_limits_are_inclusive_and_a_pair_counts_its_longer_reply():
    lengths = Dataset.from_dict({"_length": [9, 10, 20, 21], "_origin": [f"f.jsonl:{i}" for i in range(1, 5)]})
    kept, removed = clean.length_filter(lengths, min_tokens=10, max_tokens=20)
    assert kept["_length"] == [10, 20] and removed["_length"] == [9, 21]
    pair = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "ok"}],
            "rejected": [{"role": "assistant", "content": prose(1, 60)}], "_text": "unused"}
    [length] = clean.add_lengths(Dataset.from_list([pair]), load_tokenizer(TINY_TOKENIZER))["_length"]
    assert length > 60


def test_lengths_count_a_non_thinking_row_as_the_stages_render_it():
    # chatml prefills an empty think block before each non-thinking reply: 10 tokens a turn that max_tokens missed,
    # so rows it kept were cut by the same max_length in training, their end-of-turn token first
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    tokenizer.chat_template = chat_template_text("chatml")
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]
    rows = Dataset.from_list([{"messages": messages, "thinking": thinking, "_text": "unused"}
                              for thinking in (False, True)])
    lengths = clean.add_lengths(rows, tokenizer)["_length"]
    assert lengths == [len(tokenizer.apply_chat_template(messages, enable_thinking=thinking, tokenize=True,
                                                         return_dict=True)["input_ids"]) for thinking in (False, True)]
    assert lengths[0] > lengths[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(tag: str, n: int) -> list[dict]:
    seeds = [zlib.crc32(f"{tag}{i}".encode()) for i in range(n)]
    return [{"instruction": f"{tag} task {i}: {prose(seeds[i], 12)}", "output": prose(i, 8)} for i in range(n)]


def run_build(tmp_path, name, *args) -> tuple[dict, dict]:
    out = tmp_path / name
    build_sft_set.main(["--output_dir", str(out), "--near_dup_threshold", "null", *map(str, args)])
    card = json.loads((out / "card.json").read_text())
    splits = {s: load_dataset("parquet", data_files=str(out / f"{s}.parquet"), split="train") for s in card["splits"]}
    return card, splits


def test_decontamination_in_a_build_is_reported(tmp_path):
    question = "A robe takes 2 bolts of blue fiber and half that much white fiber how many bolts in total"
    eval_set = write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": question, "answer": "3"}])
    rows = alpaca_rows("clean", 3) + [{"instruction": f"Homework: {question}?", "output": "3 bolts."}]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    card, splits = run_build(tmp_path, "out", "--sources", source, "--decontaminate", eval_set, "--test_size", 0)
    assert len(splits["train"]) == 3
    assert card["decontamination"]["removed"] == 1 and card["counts"][-2]["step"] == "contamination"
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["filter"] == "contamination" and reject["where"].endswith("train.jsonl:4")
    assert "Decontamination" in (tmp_path / "out" / "README.md").read_text()


def test_decontamination_reads_every_split_of_a_saved_dataset_dict(tmp_path):
    # GSM8K saved with `save_to_disk` holds train and test: reading only `train` let the test questions through
    from datasets import DatasetDict

    question = "A robe takes 2 bolts of blue fiber and half that much white fiber how many bolts in total"
    DatasetDict({"train": Dataset.from_list([{"question": prose(7, 20), "answer": "1"}]),
                 "test": Dataset.from_list([{"question": question, "answer": "3"}])}).save_to_disk(tmp_path / "gsm8k")
    source = write_jsonl(tmp_path / "train.jsonl", alpaca_rows("clean", 3) + [{"instruction": question, "output": "3"}])
    card, splits = run_build(tmp_path, "out", "--sources", source, "--decontaminate", tmp_path / "gsm8k",
                             "--test_size", 0)
    assert len(splits["train"]) == 3 and card["decontamination"]["removed"] == 1

def test_length_filter_counts_tokens_of_the_chat_template(tmp_path):
    rows = [{"instruction": "hi", "output": "ok"}, {"instruction": "mid " + prose(5, 40), "output": "fine"},
            {"instruction": "long " + prose(6, 400), "output": "done"}]
    source = write_jsonl(tmp_path / "lengths.jsonl", rows)
    card, splits = run_build(tmp_path, "out", "--sources", source, "--tokenizer", TINY_TOKENIZER,
                             "--min_tokens", 100, "--max_tokens", 1000, "--test_size", 0)
    assert [m[0]["content"][:3] for m in splits["train"]["messages"]] == ["mid"]
    reasons = [json.loads(line)["reason"] for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert any("< min_tokens 100" in r for r in reasons) and any("> max_tokens 1000" in r for r in reasons)
    assert card["length_unit"].startswith("tokens")


def test_mixing_respects_weights_and_seed(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", alpaca_rows("big", 40))
    small = write_jsonl(tmp_path / "small.jsonl", alpaca_rows("small", 10))
    sources = ["--sources", json.dumps({"path": str(big), "weight": 0.5}), json.dumps({"path": str(small),
                                                                                       "weight": 2.0})]
    card, splits = run_build(tmp_path, "a", *sources, "--test_size", 0, "--seed", 1)
    counts = Counter(m[0]["content"].split()[0] for m in splits["train"]["messages"])
    assert counts == {"big": 20, "small": 20} and card["mix"]["weights"] == {"big": 0.5, "small": 2.0}
    firsts = [m[0]["content"].split()[0] for m in splits["train"]["messages"]]
    assert set(firsts[:20]) == {"big", "small"}  # shuffled: the sources interleave, not one after the other
    same, _ = run_build(tmp_path, "b", *sources, "--test_size", 0, "--seed", 1)
    other, other_splits = run_build(tmp_path, "c", *sources, "--test_size", 0, "--seed", 2)
    assert same["fingerprint"] == card["fingerprint"] and other["fingerprint"] != card["fingerprint"]
    assert set(m[0]["content"] for m in other_splits["train"]["messages"]) != set(
        m[0]["content"] for m in splits["train"]["messages"])


@pytest.mark.parametrize("rows,kept", [(1, 1), (3, 2), (5, 3), (7, 4)])
def test_a_weights_share_of_rows_is_rounded_half_up(tmp_path, rows, kept):
    """0.5 of an odd count is rounded the same way every time (half to even kept 2 of 5 rows, 2 of 3 and 0 of 1)."""
    source = write_jsonl(tmp_path / "odd.jsonl", alpaca_rows("odd", rows))
    anchor = write_jsonl(tmp_path / "anchor.jsonl", alpaca_rows("anchor", 2))
    _, splits = run_build(tmp_path, "out", "--sources", json.dumps({"path": str(source), "weight": 0.5}),
                          json.dumps({"path": str(anchor)}), "--test_size", 0)
    assert Counter(m[0]["content"].split()[0] for m in splits["train"]["messages"]) == {"odd": kept, "anchor": 2}


def test_held_out_split_never_shares_rows_with_upsampled_train(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", alpaca_rows("small", 20))
    card, splits = run_build(tmp_path, "out", "--sources", json.dumps({"path": str(small), "weight": 3.0}),
                             "--test_size", 0.25)
    train = [m[0]["content"] for m in splits["train"]["messages"]]
    test = [m[0]["content"] for m in splits["test"]["messages"]]
    assert len(test) == 5 and len(set(test)) == 5 and len(train) == 45
    assert not set(train) & set(test)


def test_near_dup_of_pairs_compares_prompt_and_each_reply(tmp_path):
    from data_prep import build_preference_set

    prompt, chosen, rejected = prose(10, 150), prose(11, 100), prose(12, 100)
    rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected},
            {"prompt": prompt, "chosen": chosen, "rejected": "A short, different bad answer."},  # a new pair: kept
            {"prompt": prompt, "chosen": chosen, "rejected": rejected.replace(rejected.split()[50], "x", 1)}]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    build_preference_set.main(["--sources", str(source), "--output_dir", str(tmp_path / "out"), "--test_size", "0"])
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["filter"] == "near_dup" and reject["where"].endswith("pairs.jsonl:3")
    assert json.loads((tmp_path / "out" / "card.json").read_text())["splits"]["train"]["rows"] == 2


def test_decontamination_reads_cjk_letters_and_drops_invisible_characters():
    # Each ideograph is a word: the 29-character question is 26 words, so its 13-grams are indexed.
    question_zh = "小明有五个苹果，他给了小红两个苹果，请问小明现在一共有几个苹果？"
    question_en = "Natalia sold clips to 48 of her friends in April and then she sold half as many clips in May"
    ngrams = clean.eval_ngrams({"eval.jsonl": [question_zh, question_en]}, n=13)
    soft_hyphens = question_en.replace("Natalia", "Nata\u00adlia").replace("sold", "so\u200bld")  # web-page copy
    rows = ["请回答：" + question_zh, soft_hyphens, "写一首关于春天的诗，要有花和风。"]
    kept, removed = clean.decontaminate(table(rows), ngrams, 13)
    assert kept["_origin"] == ["f.jsonl:3"] and len(removed) == 2
    assert clean.words("Nata\u00adlia 小明・カナ") == ["natalia", "小", "明", "カ", "ナ"]


def test_lengths_without_a_tokenizer_count_cjk_letters_as_words():
    # the data card's length statistics: a Chinese reply of 32 ideographs had the length of one whitespace "word"
    lengths = clean.add_lengths(table(["小明有五个苹果，他给了小红两个苹果，请问小明现在一共有几个苹果？",
                                       "Natalia sold clips to 48 of her friends."]))["_length"][:]
    assert lengths == [29, 8]


def test_near_dup_of_unpaired_rows_compares_prompt_and_completion(tmp_path):
    from data_prep import build_preference_set

    # Three pairs for one long prompt: as whole texts, the True (False) rows are ~0.9 similar to each other.
    prompt = prose(20, 150)
    rows = [{"prompt": prompt, "chosen": f"A one-line summary, take {i}.", "rejected": f"I will not, reason {i}."}
            for i in range(3)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    build_preference_set.main(["--sources", str(source), "--output_dir", str(out), "--test_size", "0",
                               "--unpaired", "true"])
    train = load_dataset("parquet", data_files=str(out / "train.parquet"), split="train")
    assert sorted(train["label"]) == [False] * 3 + [True] * 3
    assert not (out / "rejects.jsonl").read_text()


def test_dedup_keeps_rows_whose_images_tools_or_label_differ(tmp_path):
    from PIL import Image

    from data_prep import build_preference_set

    for colour in ("red", "blue", "green"):
        Image.new("RGB", (4, 4), colour).save(tmp_path / f"{colour}.png")
    vqa = [{"image": f"{c}.png", "question": "Is the shape red?", "answer": "no"} for c in ("blue", "green")]
    vqa.append({"image": "blue.png", "question": "Is the shape red?", "answer": "no"})  # a true copy
    conversation = [{"role": "user", "content": "What can you do?"}, {"role": "assistant", "content": "Use tools."}]
    tools = [[{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}]
             for name in ("get_weather", "search_web")]
    sources = [write_jsonl(tmp_path / "vqa.jsonl", vqa),
               write_jsonl(tmp_path / "tools.jsonl", [{"messages": conversation, "tools": t} for t in tools])]
    card, splits = run_build(tmp_path, "sft", "--sources", *sources, "--test_size", 0, "--near_dup_threshold", 0.85)
    rejects = [json.loads(line) for line in open(tmp_path / "sft" / "rejects.jsonl")]
    assert len(splits["train"]) == 4 and [r["where"].split("/")[-1] for r in rejects] == ["vqa.jsonl:3"]
    # The same reply marked desirable and undesirable is two KTO rows, not a duplicate.
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "2 + 2?", "completion": "4", "label": label}
                                               for label in (True, False)])
    build_preference_set.main(["--sources", str(kto), "--output_dir", str(tmp_path / "kto"), "--test_size", "0"])
    assert json.loads((tmp_path / "kto" / "card.json").read_text())["splits"]["train"]["rows"] == 2


def test_held_out_split_keeps_each_prompt_on_one_side(tmp_path):
    from data_prep import build_preference_set

    rows = [{"prompt": f"Prompt {p}: explain topic {p * 13}.", "chosen": f"Good answer {k} to {p}.",
             "rejected": f"Bad answer {k} to {p}."} for p in range(10) for k in range(3)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    for name, extra in (("pairs", []), ("unpaired", ["--unpaired", "true"])):
        out = tmp_path / name
        build_preference_set.main(["--sources", str(source), "--output_dir", str(out), "--test_size", "0.2",
                                   "--near_dup_threshold", "null", *extra])
        prompts = {split: {r["prompt"][0]["content"] for r in load_dataset(
            "parquet", data_files=str(out / f"{split}.parquet"), split="train")} for split in ("train", "test")}
        assert len(prompts["test"]) == 2 and len(prompts["train"]) == 8 and not prompts["test"] & prompts["train"]
    with pytest.raises(UserError, match="of 4 rows with 1 distinct prompt"):
        build.held_out_split(Dataset.from_dict({"_group": ["same prompt"] * 4}), 0.5, seed=0)


def test_a_held_out_fraction_rounds_up_and_is_the_same_for_a_seed():
    """5% of 10 prompts holds out one, not none (a small set would fail the build); a seed draws the same prompts."""
    split = build.held_out_split(Dataset.from_dict({"_group": [[f"p{i}"] for i in range(10)]}), 0.05, seed=0)
    assert (len(split["train"]), len(split["test"])) == (9, 1)
    data = Dataset.from_dict({"_group": [[f"p{i}"] for i in range(100)]})
    drawn = [build.held_out_split(data, 0.3, seed=5)["test"]["_group"] for _ in range(2)]
    assert len(drawn[0]) == 30 and drawn[0] == drawn[1]


def test_a_conversation_and_the_rows_holding_its_first_turns_stay_on_one_side(tmp_path):
    # sets that ship every conversation with its prefixes: a held-out [q, a] was trained on inside [q, a, q2, a2]
    rows = []
    for i in range(20):
        first = [{"role": "user", "content": f"Question {i}: how long do I bake loaf {i}?"},
                 {"role": "assistant", "content": f"Bake loaf {i} for {30 + i} minutes."}]
        rows += [{"messages": first}, {"messages": first + [{"role": "user", "content": f"And then {i}?"},
                                                           {"role": "assistant", "content": f"Let it cool {i}."}]}]
    source = write_jsonl(tmp_path / "chat.jsonl", rows)
    _, splits = run_build(tmp_path, "out", "--sources", source, "--test_size", 0.25, "--seed", 0)

    def firsts(split):
        return {m[0]["content"] for m in splits[split]["messages"]}

    assert len(splits["test"]) % 2 == 0 and not firsts("train") & firsts("test")


def test_rows_a_weight_below_one_leaves_out_are_rejects(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", alpaca_rows("big", 40))
    card, splits = run_build(tmp_path, "out", "--sources", json.dumps({"path": str(big), "weight": 0.25}),
                             "--test_size", 4, "--seed", 3)
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert len(splits["train"]) == 9 and len(splits["test"]) == 1 and len(rejects) == 30
    assert {r["filter"] for r in rejects} == {"mix"} and card["sources"][0]["removed"] == {"mix": 30}
    assert rejects[0]["reason"] == "weight 0.25: not drawn into train (seed 3)" and "instruction" not in rejects[0]["row"]
    assert rejects[-1]["reason"] == "weight 0.25: not drawn into test (seed 3)"
    shown = {r["row"]["messages"][0]["content"] for r in rejects}
    assert len(shown) == 30 and not shown & {m[0]["content"] for s in splits.values() for m in s["messages"]}


def test_an_unreadable_row_of_an_eval_set_stops_the_build(tmp_path):
    # skipped, the eval question on that line was never indexed and its copy in the training data was kept
    question = "A robe takes 2 bolts of blue fiber and half that much white fiber how many bolts in total"
    eval_set = tmp_path / "gsm8k_test.jsonl"
    eval_set.write_text(json.dumps({"question": "short"}) + "\n" + f'{{"question": "{question}", "answer": "3",}}\n')
    source = write_jsonl(tmp_path / "train.jsonl", alpaca_rows("clean", 3) + [{"instruction": question, "output": "3"}])
    with pytest.raises(UserError, match=r"gsm8k_test.jsonl:2: not valid JSON .*evaluation set in `decontaminate`"):
        run_build(tmp_path, "out", "--sources", source, "--decontaminate", eval_set, "--on_error", "skip")


def test_near_dup_reads_each_cjk_letter_as_a_token_and_tool_calls_are_text():
    """Chinese text has no spaces: as one token, a reply with one ideograph changed was no near-duplicate. Two calls
    of one tool with other arguments are other text."""
    assert clean.tokens("小明，你好") == ["小", "明", ",", "你", "好"]  # NFKC: the full-width comma
    rng = random.Random(0)
    text = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(200))
    kept, removed = clean.near_dedup(table([text, text[:100] + "的" + text[101:]]), threshold=0.8)
    assert removed["_origin"] == ["f.jsonl:2"]
    calls = [{"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}]} for city in "AB"]
    assert clean.record_text(calls[0]) != clean.record_text(calls[1])


def test_held_out_groups_are_the_prompt_to_its_last_user_turn_and_each_exchange_with_its_context():
    conversation = [{"role": "user", "content": "First question"}, {"role": "assistant", "content": "First reply"},
                    {"role": "user", "content": "Second question"}, {"role": "assistant", "content": "Second reply"}]
    assert "Second question" in clean.prompt_text({"messages": conversation})
    other_reply = [*conversation[:1], {"role": "assistant", "content": "Another reply"}]
    assert set(clean.exchange_keys({"messages": conversation}, "")).isdisjoint(
        clean.exchange_keys({"messages": other_reply}, ""))
    assert clean.exchange_keys({"messages": conversation}, "") != clean.exchange_keys({"messages": conversation}, "x")


def test_decontamination_matches_whole_word_n_grams_and_names_the_set_that_holds_them():
    """Eval n-grams are words, punctuation dropped, as the rows' are; a row sharing only n - 1 words is kept; the
    reason gives the whole n-gram and the eval set it came from."""
    ngrams = clean.eval_ngrams({"a.jsonl": [prose(5, 20)], "b.jsonl": ["river0, stone1, cloud2, lamp3, orange4"]}, n=5)
    rows = ["so: river0 stone1 cloud2 lamp3 orange4", "river0 stone1 cloud2 lamp3 and more", prose(6, 20)]
    kept, removed = clean.decontaminate(table(rows), ngrams, 5)
    assert kept["_origin"] == ["f.jsonl:2", "f.jsonl:3"]
    assert removed["_reason"] == ["shares the 5-gram \"river0 stone1 cloud2 lamp3 orange4\" with eval set 'b.jsonl'"]


def test_rows_with_other_embedded_images_are_other_examples_and_a_completion_counts_in_the_length():
    images = [{"bytes": colour, "path": None} for colour in (b"red", b"blue")]
    assert clean.context_key({"images": images[:1]}) != clean.context_key({"images": images[1:]})
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": prose(1, 60)}],
           "_text": "unused"}
    [length] = clean.add_lengths(Dataset.from_list([row]), load_tokenizer(TINY_TOKENIZER))["_length"]
    assert length > 60


def test_pairs_with_the_same_replies_to_other_prompts_are_kept():
    pairs = Dataset.from_dict({"chosen": ["c"] * 2, "_text_prompt": [prose(1, 100), prose(2, 100)],
                               "_text_chosen": [prose(3, 100)] * 2, "_text_rejected": [prose(4, 100)] * 2,
                               "_key": [""] * 2, "_origin": ["f.jsonl:1", "f.jsonl:2"]})
    kept, removed = clean.near_dedup(pairs, 0.8, columns=clean.near_dup_columns(pairs))
    assert len(kept) == 2 and not len(removed)


def test_a_row_near_only_a_removed_row_is_kept():
    """Rows are compared with the rows kept, not with those already removed: b (near a) goes, c (near b, far from
    a) stays, else a chain of small edits would remove rows unlike anything in the set."""
    words = prose(3, 400).split()
    b = words[:-16] + [f"end{i}" for i in range(16)]  # Jaccard ~0.92 to a, as c to b; c to a ~0.85
    c = [f"start{i}" for i in range(16)] + b[16:]
    kept, removed = clean.near_dedup(table([" ".join(t) for t in (words, b, c)]), threshold=0.89, num_perm=512)
    assert kept["_origin"] == ["f.jsonl:1", "f.jsonl:3"] and removed["_origin"] == ["f.jsonl:2"]
