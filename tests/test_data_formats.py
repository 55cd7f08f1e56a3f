"""Every input format and container round-trips from a committed fixture in tests/assets/data/ to the TRL columns."""

import json
import shutil
import time
from pathlib import Path

import pytest
from datasets import Dataset, load_dataset

from data_prep import build_preference_set, build_sft_set
from data_prep.formats import Options, convert_rows, from_messages, from_preference, from_unpaired
from data_prep.messages import RowError
from posttrain.errors import UserError
from posttrain.gates import check_preference_pairs

DATA = Path(__file__).parent / "assets" / "data"


def build(job, tmp_path, *sources, extra=()):
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    job.main(["--sources", *map(str, sources), "--output_dir", str(out), "--test_size", "0",
              "--near_dup_threshold", "null", *extra])
    return list(load_dataset("parquet", data_files={"train": str(out / "train.parquet")}, split="train"))


def by_first_user(rows, key="messages"):
    return {next(m["content"] for m in r[key] if m["role"] == "user"): r for r in rows}


def test_alpaca(tmp_path):
    rows = by_first_user(build(build_sft_set, tmp_path, DATA / "alpaca.jsonl"))
    assert rows["Translate the sentence into French.\n\nThe cat sleeps on the sofa."]["messages"][1] == {
        "role": "assistant", "content": "Le chat dort sur le canapé."}
    with_history = rows["Hi there"]["messages"]
    assert [m["role"] for m in with_history] == ["system", "user", "assistant", "user", "assistant"]
    assert with_history[0]["content"] == "Answer in one word." and with_history[-1]["content"] == "Tokyo."


def test_sharegpt_json_array_with_tools(tmp_path):
    rows = by_first_user(build(build_sft_set, tmp_path, DATA / "sharegpt.json"))
    assert rows["Spell 'cat' backwards."]["messages"][0] == {"role": "system", "content": "You are terse."}
    tool_row = rows["Weather in Paris?"]
    call = tool_row["messages"][1]["tool_calls"][0]["function"]
    assert call == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert tool_row["messages"][2]["role"] == "tool"
    assert tool_row["tools"][0]["function"]["name"] == "get_weather"


def test_messages_thinking_and_tools(tmp_path):
    rows = by_first_user(build(build_sft_set, tmp_path, DATA / "messages.jsonl"))
    reasoning = rows["Is 91 a prime number?"]
    assert reasoning["messages"][-1]["content"].startswith("<think>\n91 = 7 * 13")
    assert reasoning["messages"][-1]["content"].endswith("\n</think>\n\nNo, 91 = 7 x 13.")
    assert reasoning["thinking"] is True
    inline = rows["Which is larger, 2^10 or 10^3?"]["messages"][-1]["content"]
    assert inline == "<think>\n2^10 = 1024 and 10^3 = 1000.\n</think>\n\n2^10 is larger: 1024 > 1000."
    empty_think = rows["Say hello in Spanish."]
    assert empty_think["messages"][-1]["content"] == "Hola." and empty_think["thinking"] is False
    assert rows["What is 12 times 12?"]["thinking"] is False and rows["What is 12 times 12?"]["tools"] is None
    tools = rows["Please add 40 and 2 with the tool."]
    assert tools["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"a": 40, "b": 2}
    assert tools["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]


def test_erniekit_sft_labels(tmp_path):
    rows = by_first_user(build(build_sft_set, tmp_path, DATA / "erniekit_sft.jsonl"))
    assert len(rows["I want to visit Kyoto."]["messages"]) == 5  # label [0, 1]: the first turn stays as context
    assert len(rows["Tell me a fact about owls."]["messages"]) == 2  # label [1, 0]: the untrained last turn goes
    assert rows["I want to visit Kyoto."]["messages"][0]["role"] == "system"


def test_prompt_completion_csv(tmp_path):
    rows = by_first_user(build(build_sft_set, tmp_path, DATA / "prompt_completion.csv"))
    assert rows["Complete the proverb: an apple a day"]["messages"][1]["content"] == " keeps the doctor away."
    assert "\nmore than eleven" in rows["Name the largest planet of the solar system."]["messages"][1]["content"]


def test_vision_paths(tmp_path):
    rows = build(build_sft_set, tmp_path, DATA / "vision.jsonl")
    for row in rows:
        assert len(row["images"]) == 1 and Path(row["images"][0]).is_file()
        assert Path(row["images"][0]).is_absolute()
        assert row["messages"][0]["content"][0] == {"type": "image"}  # `<image>` markers become TRL's typed parts
    texts = {row["messages"][0]["content"][1]["text"] for row in rows}
    assert texts == {"What colour is this square?", "Describe the picture in two words."}


def test_preference_standard_and_conversational(tmp_path):
    rows = build(build_preference_set, tmp_path, DATA / "preference_standard.jsonl",
                 DATA / "preference_conversational.jsonl")
    rows = by_first_user(rows, "prompt")
    assert rows["How many legs does a spider have?"]["chosen"] == [{"role": "assistant", "content": "Eight."}]
    assert rows["My code does not compile."]["prompt"][0]["role"] == "system"
    implicit = rows["Recommend a classic novel."]  # no prompt column: the shared first turn becomes the prompt
    assert len(implicit["prompt"]) == 1 and implicit["rejected"][0]["content"] == "Books are boring, watch TV."


def test_ultrafeedback_binarized_rows_are_pairs():
    """UltraFeedback-binarized rows (a text `prompt`, chosen/rejected as whole conversations, and `messages` repeating
    the chosen one) were detected as SFT data, and as `format: preference` every row was refused ("user after user").
    TRL's `maybe_extract_prompt` reads them; so do we, checking that the `prompt` column agrees."""
    from data_prep.formats import detect

    def conversation(reply):
        return [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": reply}]

    row = {"prompt": "What is 2 + 2?", "chosen": conversation("4"), "rejected": conversation("5"),
           "messages": conversation("4"), "score_chosen": 8.0, "score_rejected": 3.0}
    assert detect(row) == "preference"
    record = convert("preference", row)
    assert record["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]
    assert (record["chosen"][0]["content"], record["rejected"][0]["content"]) == ("4", "5")
    with pytest.raises(RowError, match='"prompt" is not the last user turn'):
        convert("preference", {**row, "prompt": "What is 3 + 3?"})


def test_erniekit_dpo_sort(tmp_path):
    rows = by_first_user(build(build_preference_set, tmp_path, DATA / "erniekit_dpo.jsonl"), "prompt")
    assert rows["What is 2 + 2?"]["chosen"][0]["content"] == "2 + 2 = 4."
    eggs = rows["Hi, I need a recipe."]  # sort [0, 1]: the second response wins
    assert eggs["chosen"][0]["content"].startswith("Try a Spanish omelette")
    assert [m["role"] for m in eggs["prompt"]] == ["user", "assistant", "user"]


def test_rated_binarized_with_margin(tmp_path):
    rows = build(build_preference_set, tmp_path, DATA / "rated.jsonl")
    assert len(rows) == 1  # the bat row's scores differ by 0.2 < 1.0
    assert rows[0]["chosen"][0]["content"].startswith("A hash map stores")
    assert rows[0]["rejected"][0]["content"] == "It is a map of hashes."
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert rejects[0]["filter"] == "margin" and rejects[0]["where"].endswith("rated.jsonl:2")
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert (card["sources"][0]["rows_skipped"], card["sources"][0]["rows_invalid"]) == (1, 0)  # filtered, not bad


def test_unpaired_kept_as_such(tmp_path):
    rows = build(build_preference_set, tmp_path, DATA / "unpaired.jsonl")
    assert sorted(r["label"] for r in rows) == [False, True]
    assert set(rows[0]) == {"prompt", "completion", "label"}


def test_pairs_unpaired_on_request(tmp_path):
    with pytest.raises(UserError, match="unpaired: true"):
        build(build_preference_set, tmp_path, DATA / "preference_standard.jsonl", DATA / "unpaired.jsonl")
    rows = build(build_preference_set, tmp_path, DATA / "preference_standard.jsonl", DATA / "unpaired.jsonl",
                 extra=["--unpaired", "true"])
    assert len(rows) == 2 * 2 + 2 and sum(r["label"] for r in rows) == 3


def test_unpaired_rows_keep_images_tools_and_thinking(tmp_path):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    image = str(DATA / "images" / "red.png")
    pair = {"prompt": "<image>What colour is the square?", "chosen": "<think>\nIt looks red.\n</think>\n\nRed.",
            "rejected": "Blue.", "images": [image], "tools": tools}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(pair) + "\n")
    rows = build(build_preference_set, tmp_path, pairs, extra=["--unpaired", "true"])
    assert sorted(r["label"] for r in rows) == [False, True]
    for row in rows:
        assert row["images"] == [image] and row["tools"] == tools and row["thinking"] is True
        assert row["prompt"][0]["content"][0] == {"type": "image"}
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "<image>What colour?", "completion": "Red.", "label": True,
                               "images": [image]}) + "\n")
    (row,) = build(build_preference_set, tmp_path, kto)
    assert row["images"] == [image] and row["prompt"][0]["content"][0] == {"type": "image"}
    with pytest.raises(RowError, match="1 file.* for 2 image placeholder"):  # slots checked as a pair's are
        from_unpaired({**json.loads(kto.read_text()), "prompt": "<image><image>What colour?"}, Options())


def test_replies_that_differ_only_in_tool_calls_are_a_pair():
    def reply(city):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        return [{"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]

    row = {"prompt": [{"role": "user", "content": "What's the weather in Paris?"}], "chosen": reply("Paris")}
    record = from_preference({**row, "rejected": reply("London")}, Options())
    assert record["rejected"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "London"}
    with pytest.raises(RowError, match="identical"):
        from_preference({**row, "rejected": reply("Paris")}, Options())


@pytest.mark.parametrize("fmt", ["preference", "sharegpt_preference", "pairwise_messages"])
def test_replies_that_are_tool_calls_are_a_pair(fmt):
    """The commonest agentic pair, the right call against a wrong one, was refused in every format ('"chosen[0]" is a
    'assistant' turn at the end; expected an assistant reply last'), though DPO trains such pairs: the call is the
    model's whole turn. So may an SFT conversation (function-calling sets such as xLAM's end on the call): it was
    refused, asking for the call's result and a reply after it."""
    def call(name):
        return {"name": name, "arguments": {"city": "Paris"}}

    def message(name):
        return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call(name)}]}

    question = {"role": "user", "content": "Weather in Paris?"}
    row = {"preference": {"prompt": [question], "chosen": [message("get_weather")], "rejected": [message("get_time")]},
           "sharegpt_preference": {"conversations": [{"from": "human", "value": question["content"]}],
                                   "chosen": {"from": "function_call", "value": json.dumps(call("get_weather"))},
                                   "rejected": {"from": "function_call", "value": json.dumps(call("get_time"))}},
           "pairwise_messages": {"chosen_messages": [question, message("get_weather")],
                                 "rejected_messages": [question, message("get_time")]}}[fmt]
    record = convert(fmt, row)
    assert record["prompt"] == [question]
    assert [m["tool_calls"][0]["function"]["name"] for m in record["chosen"] + record["rejected"]] == [
        "get_weather", "get_time"]
    sft = from_messages({"messages": [question, message("get_weather")]}, Options())
    assert sft["messages"][-1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_tool_calls_id_is_kept_for_the_result_that_points_at_it(tiny_tokenizer):
    """OpenAI rows link each tool result to its call by id (`tool_call_id`, no `name`): the calls' ids were dropped
    while the results kept theirs, so a template that names a result's tool by its call (Gemma 4's) rendered every
    result as from 'unknown'. Ids are handles: replies that differ only in them are still the same reply."""
    import trl

    def calls(*ids):
        return [{"id": call_id, "type": "function", "function": {"name": name, "arguments": '{"city": "Oslo"}'}}
                for call_id, name in zip(ids, ("get_weather", "get_time"))]

    prompt = [{"role": "user", "content": "Weather and time in Oslo?"}]
    reply = [{"role": "assistant", "content": None, "tool_calls": calls("call_1", "call_2")},
             {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
             {"role": "tool", "tool_call_id": "call_2", "content": "10:00"},
             {"role": "assistant", "content": "Cold, at ten."}]
    messages = from_messages({"messages": prompt + reply}, Options())["messages"]
    assert [call["id"] for call in messages[1]["tool_calls"]] == ["call_1", "call_2"]
    gemma4 = (Path(trl.__file__).parent / "chat_templates" / "gemma4_v5.jinja").read_text()
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=gemma4)
    assert "response:get_weather" in text and "response:get_time" in text and "unknown" not in text
    resampled = [{**reply[0], "tool_calls": calls("call_7", "call_8")}, *reply[1:]]
    with pytest.raises(RowError, match="identical"):
        from_preference({"prompt": prompt, "chosen": reply, "rejected": resampled}, Options())
    pair = Dataset.from_list([{"prompt": prompt, "chosen": reply, "rejected": resampled}])  # straight to DPO
    with pytest.raises(UserError, match="chosen == rejected"):
        check_preference_pairs(pair, "pairs.jsonl")


@pytest.mark.parametrize("fmt", ["preference", "pairwise_messages"])
def test_a_shared_tool_exchange_with_other_call_ids_is_the_prompt(fmt):
    """Two samples of one tool call get two random ids: whole conversations sharing the call and its result kept that
    exchange duplicated in both replies (only equal ids, and arguments written alike, counted as shared). The prompt
    keeps chosen's turns; an exchange whose id a later turn of the rejected reply still refers to stays a reply's."""
    def conversation(call_id, arguments, *rest):
        return [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call_id, "content": "18C"}, *rest]

    def pair(chosen, rejected):
        keys = {"preference": ("chosen", "rejected"), "pairwise_messages": ("chosen_messages", "rejected_messages")}
        return convert(fmt, dict(zip(keys[fmt], (chosen, rejected))))

    chosen = conversation("call_a", {"city": "Paris"}, {"role": "assistant", "content": "18C in Paris."})
    rejected = conversation("call_b", '{"city": "Paris"}', {"role": "assistant", "content": "No idea."})
    record = pair(chosen, rejected)
    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "tool"]
    assert record["prompt"][1]["tool_calls"][0]["id"] == record["prompt"][2]["tool_call_id"] == "call_a"
    assert record["chosen"] == [chosen[-1]] and record["rejected"] == [rejected[-1]]
    again = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_c", "type": "function", "function": {"name": "get_time", "arguments": {}}}]}
    rejected = conversation("call_b", {"city": "Paris"}, again, {"role": "tool", "tool_call_id": "call_b",
                                                                 "content": "18C"}, rejected[-1])
    record = pair(chosen, rejected)
    assert [m["role"] for m in record["prompt"]] == ["user"] and record["rejected"][1]["tool_call_id"] == "call_b"


def test_rl_prompts():
    fmt, rows = convert_rows(str(DATA / "rl.jsonl"), "auto", Options(), 10_000)
    records = [r.record for r in rows]
    assert fmt == "rl" and records[0]["answer"] == "42" and records[0]["domain"] == "math"
    assert records[1]["prompt"] == [{"role": "user", "content": "Reverse the string 'abc'."}]


def test_parquet_and_save_to_disk(tmp_path):
    source = load_dataset("json", data_files=str(DATA / "preference_standard.jsonl"), split="train")
    source.to_parquet(str(tmp_path / "prefs.parquet"))
    source.save_to_disk(str(tmp_path / "prefs_disk"))
    from_parquet = build(build_preference_set, tmp_path, tmp_path / "prefs.parquet")
    from_disk = build(build_preference_set, tmp_path, tmp_path / "prefs_disk")
    assert len(from_parquet) == len(from_disk) == 2
    assert by_first_user(from_parquet, "prompt").keys() == by_first_user(from_disk, "prompt").keys()


def test_hub_id_offline_is_immediate_and_named(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError, match="'someorg/somedata'.*offline"):
        build(build_sft_set, tmp_path, "someorg/somedata")
    assert time.monotonic() - start < 5


SOURCES = Path(__file__).parents[1] / "data_prep" / "sources"


def test_real_hhh_alignment_source(tmp_path):
    rows = build(build_preference_set, tmp_path, SOURCES / "hhh_alignment.jsonl")
    assert len(rows) >= 200
    multi_turn = [r for r in rows if len(r["prompt"]) > 1]
    assert multi_turn and all(r["prompt"][-1]["role"] == "user" for r in rows)
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["sources"][0]["license"] == "Apache-2.0" and "canary" in card["sources"][0]["notes"]


def test_real_chitchat_source(tmp_path):
    rows = build(build_sft_set, tmp_path, SOURCES / "chitchat.jsonl")
    assert len(rows) >= 250 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["sources"][0]["license"] == "MIT"


# ------------------------------------------------------------------------------------------- reading what users have
def convert(fmt, row):
    from data_prep.formats import FORMATS

    return FORMATS[fmt][1](row, Options(check_images=False))


def converted(source) -> list:
    """Every row of a file or folder, read and converted; an error row fails the test with its text."""
    _, rows = convert_rows(str(source), "auto", Options(check_images=False), 2_000_000)
    rows = list(rows)
    assert not [row.error for row in rows if row.error]
    return [row.record for row in rows]


@pytest.mark.parametrize("fmt, row", [
    ("prompt_completion", {"prompt": "What is 2 + 2?", "completion": "4"}),
    ("preference", {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}),
    ("unpaired", {"prompt": "What is 2 + 2?", "completion": "4", "label": True}),
    ("alpaca", {"instruction": "What is 2 + 2?", "output": "4"}),
    ("messages", {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}]}),
    ("erniekit_sft", {"src": ["What is 2 + 2?"], "tgt": ["4"]}),
])
def test_a_reasoning_column_beside_the_replies_is_refused(fmt, row):
    """A `reasoning` column beside the replies was left out of the built set without a word (the converters read
    reasoning from the reply): refused, naming the column; a boolean `thinking` (the thinking mode) is no reasoning.
    SFT rows too: an Alpaca file with a `reasoning` column became replies without it, in no thinking mode."""
    with pytest.raises(RowError, match='"reasoning" is reasoning text in a column of its own'):
        convert(fmt, {**row, "reasoning": "Two and two make four."})
    assert convert(fmt, {**row, "thinking": True})["thinking"] is True


def test_a_built_set_with_tools_reads_back_from_parquet_and_from_disk(tmp_path):
    """The jobs write tools and tool calls as `Json` columns, which pyarrow reads as JSON text: a built set mixed into
    another, or validated, read every such row as bad."""
    from datasets import Dataset

    build(build_sft_set, tmp_path, DATA / "sharegpt.json")
    built = tmp_path / "out" / "train.parquet"
    rows = converted(built)
    assert any(row["tools"] and row["tools"][0]["function"]["name"] == "get_weather" for row in rows)
    Dataset.from_parquet(str(built)).save_to_disk(str(tmp_path / "disk"))
    assert converted(tmp_path / "disk") == rows


def test_embedded_images_read_from_a_saved_dataset_folder(tmp_path):
    """A dataset folder decodes `Image` columns to PIL objects when iterated; read as Arrow rows instead, the images
    arrive as bytes, as from a parquet file."""
    import io

    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    png = io.BytesIO()
    PILImage.new("RGB", (8, 8), "red").save(png, format="PNG")
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string")})
    Dataset.from_list([{"image": {"bytes": png.getvalue(), "path": None}, "question": "What colour?",
                        "answer": "red"}], features=features).save_to_disk(str(tmp_path / "vqa"))
    _, rows = convert_rows(str(tmp_path / "vqa"), "auto", Options(embedded_images=True), 2_000_000)
    [row] = list(rows)
    assert row.error is None and len(row.record["images"]) == 1


def test_a_sharegpt_turns_reasoning_is_kept():
    """A ShareGPT turn's `reasoning_content` (or `thinking`) was dropped: only `from` and `value` were read."""
    for key in ("reasoning_content", "thinking"):
        turns = [{"from": "human", "value": "What is 12 * 12?"}, {"from": "gpt", "value": "144", key: "12 * 12 = 144"}]
        record = convert("sharegpt", {"conversations": turns})
        assert record["messages"][1]["content"] == "<think>\n12 * 12 = 144\n</think>\n\n144"
        assert record["thinking"] is True


def test_openai_legacy_functions_are_the_tools():
    """OpenAI's legacy rows: `function_call` turns were read as tool calls, but the row's `functions` (their schemas)
    were dropped, so the model learnt to call a function no prompt showed it."""
    schema = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None,
                 "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"role": "function", "name": "get_weather", "content": "sunny"},
                {"role": "assistant", "content": "Sunny."}]
    record = convert("messages", {"messages": messages, "functions": [schema]})
    assert record["tools"] == [{"type": "function", "function": schema}]
    with pytest.raises(RowError, match='"functions" is set beside tools'):
        convert("messages", {"messages": messages, "functions": [schema], "tools": [schema]})


def test_a_messages_reasoning_is_read_under_the_name_that_holds_it():
    """An empty `reasoning_content` beside a filled `reasoning` hid the reasoning (the reply was built without it, in
    no thinking mode); a value that is not text is named by its own key (a boolean `thinking` was called
    `reasoning_content`)."""
    user = {"role": "user", "content": "What is 2 + 2?"}
    record = convert("messages", {"messages": [user, {"role": "assistant", "content": "4", "reasoning_content": "",
                                                      "reasoning": "Two and two make four."}]})
    assert record["messages"][1]["content"] == "<think>\nTwo and two make four.\n</think>\n\n4"
    assert record["thinking"] is True
    with pytest.raises(RowError, match=r'"messages\[1\].thinking" is a bool \(false\); expected a string'):
        convert("messages", {"messages": [user, {"role": "assistant", "content": "4", "thinking": False}]})


def test_reasoning_before_a_tool_call_is_kept():
    """Reasoning on an assistant turn that calls a tool was dropped (`reasoning_content`) or left raw (`<think>`):
    the row was then trained as non-thinking."""
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": "", "reasoning_content": "Call get_weather.", "tool_calls": call},
                        {"role": "tool", "content": "18C"},
                        {"role": "assistant", "content": "It is 18C.", "reasoning_content": None,
                         "reasoning": "The tool said 18C."}]}
    record = convert("messages", row)
    assert record["messages"][1]["content"] == "<think>\nCall get_weather.\n</think>\n\n"
    assert record["messages"][3]["content"].startswith("<think>\nThe tool said 18C.\n</think>")
    assert record["thinking"] is True


def test_a_deepseek_r1_reply_without_its_opening_think_is_read_as_thinking(tmp_path, capsys):
    """DeepSeek-R1's template puts `<think>` in the generation prompt, so its saved replies start inside the block:
    such rows were refused ("has '</think>' without an opening '<think>'"). The block is opened for them (TRL's parser
    for its template reads them so), and the build and validate say so; two `</think>` stay an error."""
    from data_prep import validate

    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 2?"},
                          {"role": "assistant", "content": f"I add 2 to {i}.\n</think>\n\n{i + 2}"}]} for i in range(3)]
    path = tmp_path / "r1.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    built = by_first_user(build(build_sft_set, tmp_path, path))["What is 0 + 2?"]
    assert built["messages"][1]["content"] == "<think>\nI add 2 to 0.\n</think>\n\n2" and built["thinking"] is True
    assert "3 row(s) with a reply that closes '</think>' without opening it (DeepSeek-R1" in capsys.readouterr().err
    assert validate.main([str(path)]) == 0
    assert "warning: 3 with a reply that closes '</think>'" in capsys.readouterr().err
    with pytest.raises(RowError, match="has '</think>' without an opening '<think>' before it"):
        convert("messages", {"messages": [rows[0]["messages"][0], {"role": "assistant", "content": "a</think>b</think>c"}]})


def test_a_think_block_after_other_text_is_named_as_such():
    """A reply with text before its <think> block was refused as "'</think>' without an opening '<think>'"."""
    reply = {"role": "assistant", "content": "Sure. <think>2 and 2 make 4</think> 4"}
    with pytest.raises(RowError, match=r'"messages\[1\].content" has a <think> block after other text'):
        convert("messages", {"messages": [{"role": "user", "content": "What is 2 + 2?"}, reply]})


def test_reasoning_under_its_gpt_oss_name_and_in_openthoughts_markers_is_thinking():
    """transformers hands a template a reply's reasoning as `reasoning_content`, `thinking` (gpt-oss's) or `reasoning`:
    `thinking` was dropped, reasoning and mode with it. OpenThoughts-style `<|begin_of_thought|>` blocks (kept as
    written: their system prompts ask for them) were trained after an empty think block, as non-thinking replies."""
    reply = {"role": "assistant", "content": "5", "thinking": "Two and three make five."}
    record = convert("messages", {"messages": [{"role": "user", "content": "2 + 3?"}, reply]})
    assert record["messages"][1]["content"] == "<think>\nTwo and three make five.\n</think>\n\n5"
    assert record["thinking"] is True
    pair = convert("preference", {"prompt": [{"role": "user", "content": "2 + 3?"}], "chosen": [reply],
                                  "rejected": [{"role": "assistant", "content": "6", "thinking": "Two and three."}]})
    assert pair["chosen"][0]["content"].startswith("<think>\nTwo and three make five.") and pair["thinking"] is True
    thought = "<|begin_of_thought|>\n2 + 3 = 5\n<|end_of_thought|>\n\n<|begin_of_solution|>5<|end_of_solution|>"
    record = convert("sharegpt", {"conversations": [{"from": "human", "value": "2 + 3?"},
                                                    {"from": "gpt", "value": thought}]})
    assert record["messages"][1]["content"] == thought and record["thinking"] is True


def test_csv_replies_that_look_like_json_stay_text(tmp_path):
    path = tmp_path / "pc.csv"
    path.write_text('prompt,completion\n"First three primes as JSON.","[2, 3, 5]"\n'
                    '"Bob as JSON.","{""name"": ""Bob""}"\n')
    replies = [row["messages"][-1]["content"] for row in converted(path)]
    assert replies == ["[2, 3, 5]", '{"name": "Bob"}']


def test_a_csv_thinking_column_is_the_thinking_mode(tmp_path):
    """CSV writes booleans as text: a `thinking` column of `true`/`False` was lost from RL prompts and refused beside
    pairs and prompt/completion rows as "reasoning text in a column of its own"."""
    (tmp_path / "rl.csv").write_text("prompt,answer,thinking\n2+2?,4,true\n3+3?,6,False\n")
    assert [row["thinking"] for row in converted(tmp_path / "rl.csv")] == [True, False]
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected,thinking\nHi,Hello,Go away,false\n")
    assert converted(tmp_path / "pairs.csv")[0]["thinking"] is False


def test_csv_references_that_look_like_json_stay_text(tmp_path):
    """An RL reference cell such as `[1, 2, 3]` was decoded, and the row refused as '"ground_truth" is a list'."""
    path = tmp_path / "rl.csv"
    path.write_text('prompt,ground_truth\n"Sort 3, 1, 2 as a JSON list.","[1, 2, 3]"\n')
    assert converted(path)[0]["answer"] == "[1, 2, 3]"


def test_the_system_column_and_a_thinking_column_reach_every_kind_of_row():
    """`system` became the first turn of a string prompt only, and a boolean `thinking` column was kept for SFT rows
    only: conversational prompts, preference and unpaired rows lost them."""
    prompt = [{"role": "user", "content": "Hi"}]
    pair = {"system": "You are a pirate.", "prompt": prompt, "chosen": [{"role": "assistant", "content": "Arr"}],
            "rejected": [{"role": "assistant", "content": "Hello"}], "thinking": False}
    record = convert("preference", pair)
    assert record["prompt"][0] == {"role": "system", "content": "You are a pirate."} and record["thinking"] is False
    unpaired = {"system": "You are a pirate.", "prompt": prompt, "completion": [{"role": "assistant", "content": "Arr"}],
                "label": True, "thinking": False}
    record = convert("unpaired", unpaired)
    assert record["prompt"][0]["role"] == "system" and record["thinking"] is False


def test_openai_text_parts_become_text_a_chat_template_renders(tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "<think>greet</think>Hello"}]}]}
    record = convert("messages", row)
    assert record["messages"][0]["content"] == "Hi" and record["thinking"] is True
    assert "Hello" in tiny_tokenizer.apply_chat_template(record["messages"], tokenize=False)


def test_a_bad_indented_json_line_names_its_real_column(tmp_path):
    from data_prep.readers import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n    {"a": 1,, "b": 2}\n')
    [_, bad] = list(read_rows(str(path), 2_000_000))
    assert bad.where.endswith(":2") and "column 13" in bad.error  # the second comma, after 4 blanks


def test_json_array_elements_are_named_by_the_line_they_start_on(tmp_path):
    from data_prep.readers import read_rows

    path = tmp_path / "rows.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2},\n\n  {"a": 3}\n]\n')
    assert [row.where for row in read_rows(str(path), 2_000_000)] == [f"{path}:{n}" for n in (2, 3, 5)]


def test_csv_rows_are_named_by_the_line_they_start_on(tmp_path):
    """A quoted cell may hold line breaks: the next row is named by its own first line, not by its row count."""
    from data_prep.readers import read_rows

    path = tmp_path / "pc.csv"
    path.write_text('prompt,completion\n"Two lines?","one\ntwo"\n"Bad row","a","extra cell"\n')
    first, second = read_rows(str(path), 2_000_000)
    assert (first.where, second.where) == (f"{path}:2", f"{path}:4") and "more cells" in second.error


def test_a_row_of_exactly_max_row_bytes_is_read(tmp_path):
    from data_prep.readers import read_rows

    line = json.dumps({"prompt": "q", "completion": "a" * 40})
    (tmp_path / "rows.jsonl").write_text(line + "\n")
    [row] = read_rows(str(tmp_path / "rows.jsonl"), len(line))
    assert row.error is None and row.row["completion"] == "a" * 40


def test_alpaca_errors_name_the_rows_own_keys():
    with pytest.raises(RowError, match=r"^\"history\[0\]\[1\]\" is a int"):
        convert("alpaca", {"instruction": "q", "output": "a", "history": [["hi", 5]]})
    with pytest.raises(RowError, match=r"^\"output\""):
        convert("alpaca", {"instruction": "q", "output": "<think>never closed"})


def test_image_bytes_written_as_text_say_how_to_embed_images():
    """A JSON Lines row can only carry image "bytes" as text (base64, say): the error says where bytes work (a parquet
    file) instead of only that text is not bytes."""
    from data_prep.images import check_images

    with pytest.raises(RowError, match="JSON has no bytes: embed images through a parquet file"):
        check_images([{"bytes": "iVBORw0KGgo="}], Path("."), decode=False, embedded=True)


def test_legacy_openai_function_calls_become_tool_calls():
    """OpenAI's legacy `function_call` turn and `function` result were refused as '"messages[1].content" is missing'
    (and "role is 'function'"); they are the current `tool_calls` and `tool` turns under older names."""
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": None,
                         "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                        {"role": "function", "name": "get_weather", "content": "18C"},
                        {"role": "assistant", "content": "It is 18C."}]}
    messages = from_messages(row, Options())["messages"]
    assert messages[1] == {"role": "assistant", "content": "",
                           "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                            "arguments": {"city": "Paris"}}}]}
    assert messages[2] == {"role": "tool", "content": "18C", "name": "get_weather"}
    both = {**row["messages"][1], "tool_calls": messages[1]["tool_calls"]}
    with pytest.raises(RowError, match=r'"messages\[1\].function_call" is set beside tool_calls'):
        from_messages({"messages": [row["messages"][0], both, *row["messages"][2:]]}, Options())


def test_a_pair_thinks_when_either_reply_does(tmp_path):
    """The pair's mode was the chosen reply's: a plain chosen reply beside a rejected one with a <think> block wrote
    the pair as non-thinking (once another row set a mode), a contradiction the template renders as thinking."""
    rows = [{"prompt": "What is 2+3?", "chosen": "5", "rejected": "<think>Two and two.</think>\n4"},
            {"prompt": "What is 1+1?", "chosen": "<think>One and one.</think>\n2", "rejected": "3"}]
    assert convert("preference", rows[0])["thinking"] is True
    assert convert("preference", {**rows[0], "rejected": "<think>\n\n</think>\n\n4"})["thinking"] is False
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [row["thinking"] for row in build(build_preference_set, tmp_path, path)] == [True, True]


@pytest.mark.parametrize("row, fmt", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},
     "sharegpt_preference"),  # a pair missing one reply is named as such, not read as a conversation
    ({"question": "What colour?", "answer": "red", "images": ["red.png"]}, "vqa"),
    ({"src": ["q"], "sort": [1, 0]}, "erniekit_dpo"),
])
def test_a_row_missing_keys_of_its_format_is_still_detected_as_it(row, fmt):
    from data_prep.formats import detect

    assert detect(row) == fmt


def test_vqa_images_without_markers_each_get_a_slot():
    """Two images and no `<image>` in the question: both come first in the user turn, one slot each."""
    record = convert("vqa", {"question": "Which is red?", "answer": "the left",
                             "images": [str(DATA / "images" / "red.png")] * 2})
    assert record["messages"][0]["content"] == [{"type": "image"}, {"type": "image"},
                                                {"type": "text", "text": "Which is red?"}]


def test_erniekit_dpo_system_is_the_prompts_first_turn():
    row = {"system": "Be brief.", "src": ["q"], "tgt": [], "response": [["a"], ["b"]], "sort": [0, 1]}
    record = convert("erniekit_dpo", row)
    assert record["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    assert record["chosen"] == [{"role": "assistant", "content": "b"}]


def test_rated_scores_exactly_the_margin_apart_are_kept():
    """`min_score_margin` is the least difference kept ("at least this"); a null score key (a parquet struct that
    has both `score` and `overall_score`) falls back to the next one."""
    from data_prep.formats import from_rated

    row = {"prompt": "q", "completions": [{"response": "good", "score": None, "overall_score": 8},
                                          {"response": "bad", "score": None, "overall_score": 7}]}
    record = from_rated(row, Options(min_score_margin=1.0))
    assert record["chosen"][0]["content"] == "good" and record["rejected"][0]["content"] == "bad"


def test_empty_tool_arguments_and_an_empty_tools_cell_read_as_none_given():
    """CSV and parquet write a row without tools as an empty `tools` cell, and a call without arguments as `""`."""
    row = {"messages": [{"role": "user", "content": "Time?"},
                        {"role": "assistant", "tool_calls": [{"function": {"name": "now", "arguments": ""}}]},
                        {"role": "tool", "content": "10:00"}, {"role": "assistant", "content": "Ten."}],
           "tools": ""}
    record = from_messages(row, Options())
    assert record["messages"][1]["tool_calls"][0]["function"]["arguments"] == {} and record["tools"] is None


def test_a_conversation_thinks_when_any_reply_does():
    """An earlier reply with an empty think block (non-thinking) does not make a later thinking reply non-thinking."""
    turns = [("user", "Hi"), ("assistant", "<think>\n\n</think>\n\nHello."), ("user", "2+2?"),
             ("assistant", "<think>Two and two.</think>4")]
    record = from_messages({"messages": [{"role": r, "content": c} for r, c in turns]}, Options())
    assert record["thinking"] is True


def test_image_bytes_where_a_job_writes_paths_are_named():
    from data_prep.images import check_images

    with pytest.raises(RowError, match=r'"images\[0\]" holds image bytes, not a file path'):
        check_images([{"bytes": b"\x89PNG", "path": None}], Path("."), decode=False)


def test_a_system_column_beside_a_conversations_own_system_turn_adds_none():
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")]
    row = {"system": "You are a pirate.", "messages": [{"role": r, "content": c} for r, c in turns]}
    assert from_messages(row, Options())["messages"] == row["messages"]


def test_a_thinking_column_does_not_override_the_replies_own_mode():
    """The `thinking` column says the mode of a row whose replies do not; a reply with a <think> block says its own."""
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>Add.</think>4"}]}
    assert from_messages({**row, "thinking": False}, Options())["thinking"] is True


def test_the_literal_image_note_is_for_rows_without_images():
    from data_prep.images import has_literal_image_marker

    reply = [{"role": "assistant", "content": "Write <image> where the picture goes."}]
    assert has_literal_image_marker({"chosen": reply}) and not has_literal_image_marker({"chosen": reply,
                                                                                         "images": ["red.png"]})
