"""The output folder contract: atomic write, parquet per split, data card with counts and fingerprints; YAML config."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from data_prep import build_preference_set, build_sft_set, validate
from posttrain.errors import UserError
from posttrain.models import TINY_TOKENIZER

DATA = Path(__file__).parent / "assets" / "data"


def write_config(tmp_path, **options) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(options))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("card")
    config = write_config(
        tmp_path, output_dir=str(tmp_path / "sft"), test_size=2, tokenizer=str(TINY_TOKENIZER),
        sources=[{"path": str(DATA / "alpaca.jsonl"), "license": "cc-by-4.0", "notes": "hand-written"},
                 {"path": str(DATA / "messages.jsonl"), "license": "cc-by-4.0", "name": "chat"},
                 str(DATA / "sharegpt.json")])
    build_sft_set.main(["--config", str(config), "--seed", "7"])
    return tmp_path / "sft"


def test_layout(built):
    assert sorted(p.name for p in built.iterdir()) == ["README.md", "card.json", "lengths.png", "rejects.jsonl",
                                                       "test.parquet", "train.parquet"]
    assert not list(built.parent.glob(".sft.*"))  # no temporary folder left behind
    assert (built / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_counts_fingerprints_command(built):
    card = json.loads((built / "card.json").read_text())
    assert [s["name"] for s in card["sources"]] == ["alpaca", "chat", "sharegpt"]
    assert card["sources"][1]["license"] == "cc-by-4.0" and card["sources"][2]["license"] == "unknown"
    assert [c["step"] for c in card["counts"]] == ["validation", "exact_dup", "near_dup", "mix"]
    assert card["counts"][0] == {"step": "validation", "before": 11, "after": 11}
    assert card["splits"]["test"]["rows"] == 2 and card["splits"]["train"]["rows"] == 9
    for split in card["splits"].values():
        assert split["sha256"] == hashlib.sha256((built / split["file"]).read_bytes()).hexdigest()
    assert "--seed 7" in card["command"] and "data.yaml" in card["command"]
    assert card["mix"]["seed"] == 7 and card["length_unit"].startswith("tokens")
    assert sum(s["rows_kept"] for s in card["sources"]) == 11


def test_readme_has_the_same_facts(built):
    card = json.loads((built / "card.json").read_text())
    readme = (built / "README.md").read_text()
    assert card["command"] in readme and card["splits"]["train"]["sha256"] in readme
    assert "![length histogram](lengths.png)" in readme and "hand-written" in readme
    assert "| alpaca | " in readme and "cc-by-4.0" in readme and "license: other" in readme


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    args = ["--sources", str(DATA / "alpaca.jsonl"), "--output_dir", str(out), "--test_size", "0"]
    build_sft_set.main(args)
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        build_sft_set.main(args)
    build_sft_set.main([*args, "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    config = write_config(tmp_path, sources=[str(DATA / "alpaca.jsonl")], output_dir=str(tmp_path / "o"),
                          near_dup_treshold=0.9)
    with pytest.raises(UserError, match="near_dup_treshold.*did you mean 'near_dup_threshold'"):
        build_sft_set.main(["--config", str(config)])
    with pytest.raises(UserError, match="unknown source key 'wieght'"):
        build_sft_set.main(["--sources", json.dumps({"path": "x.jsonl", "wieght": 2}), "--output_dir", "o"])


def test_missing_sources_and_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no sources"):
        build_sft_set.main(["--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="on_error must be one of"):
        build_sft_set.main(["--sources", "a.jsonl", "--output_dir", "o", "--on_error", "ignore"])
    with pytest.raises(UserError, match="set `tokenizer`"):
        build_sft_set.main(["--sources", "a.jsonl", "--output_dir", "o", "--max_tokens", "10"])
    with pytest.raises(UserError, match="weight must be > 0, got 0"):
        build_sft_set.main(["--sources", json.dumps({"path": str(DATA / "alpaca.jsonl"), "weight": 0}),
                            "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match=r"near_dup_threshold must be in \(0, 1\]"):
        build_sft_set.main(["--sources", "a.jsonl", "--output_dir", "o", "--near_dup_threshold", "0"])
    with pytest.raises(UserError, match="two sources are named 'alpaca'; give each a distinct `name`"):
        build_sft_set.main(["--sources", str(DATA / "alpaca.jsonl"), str(DATA / "alpaca.jsonl"),
                            "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="data file not found: missing.jsonl"):
        build_preference_set.main(["--sources", "missing.jsonl", "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_shipped_source_is_found_from_any_folder(tmp_path, monkeypatch):
    """The README's `data_prep/sources/...` paths work from any folder, as in a recipe (`posttrain data build_sft_set
    --sources data_prep/sources/chitchat.jsonl` said "data file not found" outside the repository); the license comes
    from its sidecar. A file of that name in the folder run from is still the one read."""
    from data_prep.config import SourceConfig

    monkeypatch.chdir(tmp_path)
    source = SourceConfig(path="data_prep/sources/chitchat.jsonl")
    assert Path(source.path).is_file() and source.license == "MIT" and source.name == "chitchat"
    (tmp_path / "data_prep" / "sources").mkdir(parents=True)
    (tmp_path / "data_prep" / "sources" / "chitchat.jsonl").write_text("{}\n")
    assert SourceConfig(path="data_prep/sources/chitchat.jsonl").path == "data_prep/sources/chitchat.jsonl"
    monkeypatch.chdir(tmp_path / "data_prep")  # `posttrain data validate` of a shipped file, too
    assert validate.main(["data_prep/sources/hhh_alignment.jsonl"]) == 0


def test_every_option_has_help():
    import dataclasses

    from data_prep.config import PreferenceSetConfig, SourceConfig

    for cls in (PreferenceSetConfig, SourceConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls


def test_a_recipes_data_job_names_no_temporary_file_in_its_card(tmp_path):
    """A recipe's job runs from a temporary config deleted when it ends: the card names the options it lists."""
    from posttrain.datajobs import run_job

    run_job("build_verifiable_tasks", {"n_train": 8, "n_test": 2}, tmp_path / "tasks")
    card = json.loads((tmp_path / "tasks" / "card.json").read_text())
    assert card["command"].startswith("posttrain data build_verifiable_tasks --config options.yaml")
    assert "n_train: 8" in card["options_yaml"]


def test_a_split_edited_after_its_card_changes_the_fingerprint(tmp_path):
    """A stage's inputs hash reads a data folder's fingerprint: the card's, as the split files now are, so a split
    edited by hand after the card was written retrains the stage (the card's recorded value kept it)."""
    from datasets import Dataset

    from posttrain.datajobs import run_job
    from posttrain.lineage import dataset_fingerprint

    run_job("build_verifiable_tasks", {"n_train": 8, "n_test": 2}, tmp_path / "tasks")
    recorded = json.loads((tmp_path / "tasks" / "card.json").read_text())["fingerprint"]
    assert dataset_fingerprint(str(tmp_path / "tasks")) == recorded  # untouched: the same, finished stages still skip
    sft = Dataset.from_parquet(str(tmp_path / "tasks" / "sft.parquet"))
    sft.select(range(len(sft) - 1)).to_parquet(tmp_path / "tasks" / "sft.parquet")
    assert dataset_fingerprint(str(tmp_path / "tasks")) != recorded


def test_a_build_passes_over_its_columns_as_often_for_many_sources_as_for_few(tmp_path, column_reads):
    """The card counted each source's kept rows with a pass over the whole split per source (10k rows in 200 files:
    61 s): the passes do not grow with the sources."""
    passes = {}
    for sources in (3, 12):
        paths = []
        for s in range(sources):
            path = tmp_path / f"{sources}-{s}.jsonl"
            path.write_text("".join(json.dumps({"instruction": f"q {s} {i}", "output": f"a {s} {i}"}) + "\n"
                                    for i in range(10)))
            paths.append(str(path))
        column_reads.clear()
        assert build_sft_set.main(["--output_dir", str(tmp_path / f"out{sources}"), "--test_size", "0.1",
                                   "--sources", *paths]) == 0
        card = json.loads((tmp_path / f"out{sources}" / "card.json").read_text())
        assert sum(s["rows_kept"] for s in card["sources"]) == 10 * sources
        passes[sources] = (column_reads["pass"], column_reads["row"])
    assert passes[3] == passes[12], passes


def test_an_image_edited_in_place_changes_the_fingerprint(tmp_path, monkeypatch):
    """build_sft_set writes image paths: an image edited after the build changes what a stage trains on, so it must
    change the fingerprint (else the stage is skipped as unchanged); the parquet files themselves do not change."""
    from PIL import Image

    from posttrain.lineage import dataset_fingerprint

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    row = {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
           "images": ["a.png"]}
    (tmp_path / "vqa.jsonl").write_text(json.dumps(row) + "\n")
    assert build_sft_set.main(["--sources", str(tmp_path / "vqa.jsonl"), "--output_dir", str(tmp_path / "out"),
                               "--test_size", "0"]) == 0
    before = dataset_fingerprint(str(tmp_path / "out"))
    assert dataset_fingerprint(str(tmp_path / "out")) == before
    written = (tmp_path / "a.png").stat().st_mtime_ns
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(written + 10**9,) * 2)  # a second later (file times tick in milliseconds)
    assert dataset_fingerprint(str(tmp_path / "out")) != before
    # the raw .jsonl given to a stage as it is (its images read against its folder), and a .json list of rows
    (tmp_path / "vqa.json").write_text(json.dumps([row]))
    for raw in ("vqa.jsonl", "vqa.json"):
        before = dataset_fingerprint(str(tmp_path / raw))
        os.utime(tmp_path / "a.png", ns=((tmp_path / "a.png").stat().st_mtime_ns + 10**9,) * 2)
        assert dataset_fingerprint(str(tmp_path / raw)) != before, raw
    # a .jsonl is read line by line, keeping the image lists only: read whole, a 476 MB file took 2 GB
    whole = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *args, **kwargs: pytest.fail(f"{self} read whole")
                        if self.suffix == ".jsonl" else whole(self, *args, **kwargs))
    before = dataset_fingerprint(str(tmp_path / "vqa.jsonl"))
    os.utime(tmp_path / "a.png", ns=((tmp_path / "a.png").stat().st_mtime_ns + 10**9,) * 2)
    assert dataset_fingerprint(str(tmp_path / "vqa.jsonl")) != before


def test_a_large_fingerprint_is_kept_while_its_files_are_unchanged(tmp_path, monkeypatch):
    """A run asks for the fingerprint of the same dataset or adapter several times: past CACHED_BYTES it is hashed
    once, and again as soon as a file is changed or replaced (same size, same bytes: another inode)."""
    import hashlib

    from posttrain.models import load

    hashed, sha256 = [], hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *data: hashed.append(1) or sha256(*data))
    monkeypatch.setattr(load, "CACHED_BYTES", 8)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.parquet").write_bytes(b"0123456789")
    first = load.file_fingerprint(folder)
    assert load.file_fingerprint(folder) == first and len(hashed) == 1
    (folder / "new").write_bytes(b"0123456789")
    os.replace(folder / "new", folder / "train.parquet")  # as posttrain's own writes do
    assert load.file_fingerprint(folder) == first and len(hashed) == 2
    (folder / "train.parquet").write_bytes(b"0123456780")
    assert load.file_fingerprint(folder) != first
    monkeypatch.setattr(load, "CACHED_BYTES", 1 << 20)  # small: hashed every time
    (folder / "train.parquet").write_bytes(b"012")
    load.file_fingerprint(folder), load.file_fingerprint(folder)
    assert len(hashed) == 5


def test_a_near_dup_threshold_of_one_is_accepted():
    from data_prep.config import SFTSetConfig

    assert SFTSetConfig(sources=[str(DATA / "alpaca.jsonl")], near_dup_threshold=1.0).near_dup_threshold == 1.0


def test_flags_override_the_yaml(tmp_path):
    from data_prep.config import SFTSetConfig, make_parser, parse_config

    config = write_config(tmp_path, sources=["a.jsonl"], output_dir="o", seed=1, test_size=0.1)
    parser = make_parser(SFTSetConfig, "build_sft_set", "")
    cfg = parse_config(SFTSetConfig, parser, ["--config", str(config), "--seed", "7"])
    assert (cfg.seed, cfg.test_size) == (7, 0.1)


def test_the_card_reports_length_statistics_removals_decontamination_and_only_splits_with_rows():
    from data_prep import card as card_lib

    stats = card_lib.length_stats([1, 2, 3, 4, 100])
    assert stats == pytest.approx({"min": 1, "median": 3.0, "mean": 22.0, "p95": 80.8, "max": 100})
    card = {"sources": [{"name": "a", "path": "a.jsonl", "format": "alpaca", "license": "mit", "rows_read": 5,
                         "rows_invalid": 0, "rows_kept": 3}],
            "splits": {"train": {"rows": 3, "file": "train.parquet", "sha256": "1" * 64},
                       "test": {"rows": 0, "file": "test.parquet", "sha256": "2" * 64}},
            "counts": [{"step": "dedup", "before": 5, "after": 3}], "rejects": 2, "name": "n", "kind": "SFT",
            "job": "build_sft_set", "created": "today", "columns": ["messages"], "command": "cmd",
            "decontamination": {"eval_sets": ["gsm8k.jsonl"], "ngram": 13, "removed": 1}, "length_unit": "tokens",
            "length_stats": stats, "fingerprint": "f", "options_yaml": "x: 1\n"}
    readme = card_lib.render_readme(card)
    assert "| dedup | 5 | 3 | 2 |" in readme and "13-gram overlap; 1 rows removed" in readme
    assert "split: train" in readme and "split: test" not in readme
