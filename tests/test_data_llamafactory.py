"""LLaMA-Factory and ERNIEKit files as users already have them, written here in the shapes their docs describe:
each is read as the right kind of data with the right row count, and a KTO-labelled file is never taken for SFT."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset

from data_prep import build_preference_set, build_sft_set, validate
from posttrain.errors import UserError

DATA = Path(__file__).parent / "assets" / "data"
LF = DATA / "llamafactory"
REGISTRY = LF / "dataset_info.json"


def build(job, tmp_path, *sources, extra=()):
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    job.main(["--sources", *map(str, sources), "--output_dir", str(out), "--test_size", "0", "--dedup", "false",
              "--near_dup_threshold", "null", *extra])
    return list(load_dataset("parquet", data_files={"train": str(out / "train.parquet")}, split="train"))


def last_user(messages):
    return [m for m in messages if m["role"] == "user"][-1]["content"]


def test_sharegpt_preference_with_single_message_replies(tmp_path):
    rows = {last_user(r["prompt"]): r for r in build(build_preference_set, tmp_path, LF / "dpo_sharegpt.json")}
    assert len(rows) == 3
    italy = rows["What is the capital of Italy?"]
    assert [m["role"] for m in italy["prompt"]] == ["user", "assistant", "user"]
    assert italy["chosen"] == [{"role": "assistant", "content": "Rome."}]
    assert italy["rejected"] == [{"role": "assistant", "content": "Milan."}]


def test_sharegpt_preference_system_column_opens_the_prompt():
    from data_prep.formats import Options, from_sharegpt_preference

    row = {"system": "Answer in one word.", "conversations": [{"from": "human", "value": "Capital of Italy?"}],
           "chosen": {"from": "gpt", "value": "Rome."}, "rejected": {"from": "gpt", "value": "Milan."}}
    assert from_sharegpt_preference(row, Options())["prompt"] == [
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"}]


def test_a_function_call_turn_may_hold_parallel_calls():
    from data_prep.formats import Options, from_sharegpt

    calls = [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]
    row = {"conversations": [{"from": "human", "value": "Weather and time in Oslo?"},
                             {"from": "function_call", "value": json.dumps(calls)},
                             {"from": "observation", "value": "-3C, 10:00"}, {"from": "gpt", "value": "Cold, at ten."}]}
    called = from_sharegpt(row, Options())["messages"][1]["tool_calls"]
    assert [call["function"] for call in called] == calls


def test_pairwise_messages_with_typed_parts(tmp_path):
    rows = {last_user(r["prompt"]): r for r in build(build_preference_set, tmp_path, LF / "pairwise_messages.jsonl")}
    assert len(rows) == 2
    spider = rows["How many legs does a spider have?"]
    assert spider["prompt"][0] == {"role": "system", "content": "Answer briefly."}
    assert spider["chosen"][0]["content"] == "Eight." and spider["rejected"][0]["content"] == "Six."
    assert rows["Is 17 prime?"]["chosen"][0]["content"] == (
        "<think>\n17 has no divisor between 2 and 4.\n</think>\n\nYes.")


def test_typed_messages_drop_turns_after_the_last_weighted_reply(tmp_path):
    (row,) = build(build_sft_set, tmp_path, LF / "messages_typed.jsonl")
    assert row["messages"] == [{"role": "user", "content": "Give me a colour."},
                               {"role": "assistant", "content": "Blue."}]


def test_a_reply_without_a_loss_weight_is_trained():
    """A file may weight only its untrained turns (`loss_weight: 0`): a reply without a weight is trained (weight 1)."""
    from data_prep.formats import Options, from_messages

    row = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Hi"}], "loss_weight": 0.0},
                        {"role": "assistant", "content": [{"type": "text", "value": "Hello."}]}]}
    assert from_messages(row, Options())["messages"] == [{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Hello."}]


def test_a_kto_conversations_system_column_opens_the_prompt():
    from data_prep.formats import Options, from_kto_conversation

    row = {"system": "Be kind.", "label": False, "conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Go away."}]}
    assert from_kto_conversation(row, Options())["prompt"] == [{"role": "system", "content": "Be kind."},
                                                               {"role": "user", "content": "Hi"}]


def test_kto_file_is_unpaired_never_sft(tmp_path, capsys):
    assert validate.main([str(LF / "kto.json")]) == 0
    assert "4 rows in format 'kto_conversation', all valid (unpaired data)" in capsys.readouterr().err
    with pytest.raises(UserError, match="KTO `label`.*undesirable"):
        build(build_sft_set, tmp_path, LF / "kto.json")
    with pytest.raises(UserError, match='"label" is True: a KTO desirability label'):
        build(build_sft_set, tmp_path, LF / "kto.json", extra=["--sources", json.dumps(
            {"path": str(LF / "kto.json"), "format": "messages"})])
    rows = build(build_preference_set, tmp_path, LF / "kto.json")
    labels = {last_user(r["prompt"]): r["label"] for r in rows}
    assert labels == {"What is 6 times 7?": True, "What is 9 minus 4?": False, "Translate 'merci' to English.": True,
                      "Is the sun a planet?": False}
    assert all(r["completion"][-1]["role"] == "assistant" for r in rows)


def test_erniekit_function_calling(tmp_path):
    rows = {last_user(r["messages"]): r for r in build(build_sft_set, tmp_path, DATA / "erniekit_function_call.jsonl")}
    assert len(rows) == 3
    stock = rows["What does one BIDU share cost?"]
    assert stock["messages"][1]["tool_calls"][0]["function"] == {"name": "get_stock_price",
                                                                 "arguments": {"symbol": "BIDU"}}
    assert json.loads(stock["messages"][2]["content"]) == {"symbol": "BIDU", "price": 88.5, "currency": "USD"}
    assert [t["function"]["name"] for t in stock["tools"]] == ["get_stock_price", "convert_currency"]
    euros = rows["Convert 100 dollars to euros."]["messages"]
    assert json.loads(euros[3]["content"]) == [{"amount": 92.1, "currency": "EUR"}, {"rate": 0.921}]
    called = rows["And one share of BABA?"]["messages"]  # ends on its call, as function-calling sets do
    assert [m["role"] for m in called] == ["user", "assistant"] and called[-1]["tool_calls"]


def test_literal_image_marker_in_text_data_is_text(tmp_path, capsys):
    assert validate.main([str(DATA / "erniekit_reasoning_text.jsonl")]) == 0
    assert "warning: 2 with a literal '<image>'" in capsys.readouterr().err
    rows = build(build_sft_set, tmp_path, DATA / "erniekit_reasoning_text.jsonl")
    assert len(rows) == 3 and "images" not in rows[0]
    assert any("<image> <image>" in r["messages"][0]["content"] for r in rows)


def test_registry_from_the_command_line(capsys):
    ok = subprocess.run([sys.executable, "-m", "data_prep.validate", f"{REGISTRY}:dpo_demo"], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "3 rows in format 'sharegpt_preference', all valid" in ok.stderr
    with pytest.raises(UserError, match="no dataset 'nope'; it has: dpo_demo, kto_demo"):
        validate.main([f"{REGISTRY}:nope"])
    assert validate.main([str(REGISTRY)]) == 0
    assert capsys.readouterr().err.count("all valid") == 5


def test_registry_mappings_and_relative_images(tmp_path):
    rows = build(build_sft_set, tmp_path, f"{REGISTRY}:alpaca_vision")
    vision = next(r for r in rows if r["images"])
    assert vision["images"] == [str((LF / "media" / "red.png").resolve())]
    assert vision["messages"][0]["content"][0] == {"type": "image"}
    plain = next(r for r in rows if not r["images"])["messages"]
    assert plain[0] == {"role": "system", "content": "Be brief."} and plain[1]["content"] == "Add the numbers.\n\n2 and 3"
    prefs = build(build_preference_set, tmp_path, f"{REGISTRY}:alpaca_dpo")
    assert {r["chosen"][0]["content"] for r in prefs} == {"4", "Madrid."}
    (tools,) = build(build_sft_set, tmp_path, f"{REGISTRY}:tools_openai")
    assert [m["role"] for m in tools["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert tools["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    kto = build(build_preference_set, tmp_path, f"{REGISTRY}:kto_demo")
    assert sorted(r["label"] for r in kto) == [False, False, True, True]



def test_registry_alpaca_kto_and_missing_file(tmp_path):
    from data_prep.formats import Options, convert_rows
    from data_prep.registry import load_entry

    (tmp_path / "kto.jsonl").write_text(json.dumps({"q": "2 + 2?", "extra": "Answer briefly.", "a": "4", "good": True})
                                        + "\n" + json.dumps({"q": "2 + 3?", "a": "6", "good": "false"}) + "\n")
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({
        "kto": {"file_name": "kto.jsonl", "columns": {"prompt": "q", "query": "extra", "response": "a", "kto_tag": "good"}},
        "gone": {"file_name": "missing.json"}}))
    entry = load_entry(str(registry), "kto")
    fmt, rows = convert_rows(entry.path, entry.format, Options(base_dir=entry.base_dir), 10_000, remap=entry.remap)
    records = [r.record for r in rows]
    assert fmt == "unpaired" and [r["label"] for r in records] == [True, False]
    assert records[0]["prompt"] == [{"role": "user", "content": "2 + 2?\n\nAnswer briefly."}]
    assert records[0]["completion"] == [{"role": "assistant", "content": "4"}]
    with pytest.raises(UserError, match="data file not found: .*missing.json"):
        validate.main([f"{registry}:gone"])


def test_alpaca_preference_and_kto_prompts_keep_system_and_history(tmp_path):
    columns = {"prompt": "instruction", "query": "input", "system": "system", "history": "history"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "dpo": {"file_name": "rows.json", "ranking": True, "columns": {**columns, "chosen": "c", "rejected": "r"}},
        "kto": {"file_name": "rows.json", "columns": {**columns, "response": "c", "kto_tag": "good"}}}))
    row = {"instruction": "And in French?", "input": "", "system": "You are a terse translator.",
           "history": [["Translate 'cat' to German.", "Katze"]], "c": "Chat", "r": "Katze", "good": True}
    (tmp_path / "rows.json").write_text(json.dumps([row]))
    expected = [{"role": "system", "content": "You are a terse translator."},
                {"role": "user", "content": "Translate 'cat' to German."}, {"role": "assistant", "content": "Katze"},
                {"role": "user", "content": "And in French?"}]
    for name in ("dpo", "kto"):
        (built,) = build(build_preference_set, tmp_path, f"{tmp_path / 'dataset_info.json'}:{name}")
        assert built["prompt"] == expected


def test_openai_tagged_turns_keep_their_tool_calls_and_kto_rows_their_images(tmp_path):
    """A ShareGPT entry with OpenAI tags (role/content) whose assistant turn calls a tool keeps the call; a KTO
    conversation keeps its image (both were dropped in the conversion)."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "observation_tag": "tool", "system_tag": "system"}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    chat = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]
    shutil.copy(LF / "media" / "red.png", tmp_path / "red.png")
    kto = {"messages": [{"role": "user", "content": "<image>What colour is it?"}, {"role": "assistant", "content": "Red."}],
           "label": True, "images": ["red.png"]}
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    (tmp_path / "kto.jsonl").write_text(json.dumps(kto) + "\n")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "oai": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags},
        "kto": {"file_name": "kto.jsonl", "formatting": "sharegpt", "tags": tags,
                "columns": {"messages": "messages", "kto_tag": "label", "images": "images"}}}))
    (row,) = build(build_sft_set, tmp_path, f"{tmp_path / 'dataset_info.json'}:oai")
    assert row["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    (unpaired,) = build(build_preference_set, tmp_path, f"{tmp_path / 'dataset_info.json'}:kto")
    assert unpaired["images"] == [str((tmp_path / "red.png").resolve())] and unpaired["label"] is True
