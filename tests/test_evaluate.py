"""Held-out evaluation and on-policy pairs on a tiny model: the numbers come from real generations and scores."""

import json

import pytest

from posttrain.evaluate import evaluate, load_rows, preference_eval
from posttrain.models import load_model, load_tokenizer


def test_evaluate_reports_every_metric(tiny_model_path, task_data):
    path = tiny_model_path("llama")
    model, tokenizer = load_model(path), load_tokenizer(path)
    rows = load_rows(str(task_data), "test")
    metrics = evaluate(model, tokenizer, rows, max_new_tokens=6, batch_size=4, samples=3)
    assert metrics["n"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["heldout_loss"] > 0 and len(metrics["samples"]) == 3
    modes = {"mode/thinking" if r["thinking"] else "mode/non_thinking" for r in rows}
    domains = {f"domain/{r['domain']}" for r in rows}
    assert set(metrics["by_group"]) == modes | domains
    assert 0 <= metrics["mean_completion_tokens"] <= 6


def test_preference_eval_detects_the_preferred_reply(tiny_model_path):
    path = tiny_model_path("llama")
    model, tokenizer = load_model(path), load_tokenizer(path)
    # a random model still prefers a 1-token reply to a 40-token one: summed log-probs favour short replies
    pairs = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b " * 40}] * 3
    result = preference_eval(model, tokenizer, pairs)
    assert result["n"] == 3 and result["accuracy"] == 1.0 and result["mean_logp_margin"] > 0
    flipped = preference_eval(model, tokenizer, [{**p, "chosen": p["rejected"], "rejected": p["chosen"]}
                                                 for p in pairs])
    assert flipped["accuracy"] == 0.0 and flipped["mean_logp_margin"] == pytest.approx(-result["mean_logp_margin"])


def test_onpolicy_pairs_job(tiny_model_path, task_data, tmp_path):
    from data_prep.build_onpolicy_pairs import main

    out = tmp_path / "pairs"
    code = main(["--model_name_or_path", str(tiny_model_path("llama")), "--prompts", str(task_data),
                 "--max_train_prompts", "6", "--max_test_prompts", "4", "--num_samples", "3", "--max_new_tokens", "6",
                 "--rewards", "length_penalty", "--reward_weights", "1.0", "--margin", "0.0", "--output_dir", str(out)])
    assert code == 0
    rows = load_rows(str(out), "train")
    assert rows and all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert all(r["chosen"][0]["role"] == "assistant" for r in rows)
    card = json.loads((out / "card.json").read_text())
    assert card["job"] == "build_onpolicy_pairs" and card["splits"]["train"]["rows"] == len(rows)
