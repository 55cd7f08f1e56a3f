"""Images in built sets: paths stay path strings; a set with some embedded images (build_vqa_tasks output, Hub VLM
parquet files with a `datasets.Image` column) embeds all of them, and the stages load either."""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, Features, Image, List, Value

from data_prep import build_sft_set, validate
from posttrain import lineage
from posttrain.data import load_split
from posttrain.models import vision

DATA = Path(__file__).parent / "assets" / "data"


@pytest.fixture(scope="module")
def vqa_sft(tmp_path_factory) -> Path:
    """build_vqa_tasks' `sft.parquet`: messages with image parts, images embedded (`List(Image())`)."""
    from data_prep.build_vqa_tasks import main

    out = tmp_path_factory.mktemp("vqa") / "tasks"
    assert main(["--output_dir", str(out), "--n_train", "4", "--n_test", "1"]) == 0
    return out / "sft.parquet"


def build(tmp_path, *sources, extra=()) -> Path:
    out = tmp_path / "out"
    build_sft_set.main(["--sources", *map(str, sources), "--output_dir", str(out), "--test_size", "0",
                        "--near_dup_threshold", "null", *extra])
    return out


def stored_images(out: Path) -> list:
    """Each row's images as stored: `{"bytes", "path"}` dicts for an embedded set, path strings otherwise."""
    data = load_split(str(out), "train")
    if isinstance(data.features["images"].feature, Image):
        data = data.cast_column("images", List(Image(decode=False)))
    return data["images"]


def test_embedded_images_and_text_rows_build_into_one_vision_set(tmp_path, vqa_sft):
    out = build(tmp_path, vqa_sft, DATA / "alpaca.jsonl")
    card = json.loads((out / "card.json").read_text())
    assert all(s["rows_kept"] == s["rows_read"] > 0 for s in card["sources"])
    data = load_split(str(out), "train")
    assert data.features["images"] == List(Image()) and vision.has_images(data)
    images = stored_images(out)
    assert sum(1 for i in images if i) == 4 and all(image["bytes"] for row in images for image in row or [])
    decoded = vision.decode_images(data, out, "the set")
    from PIL.Image import Image as PILImage

    assert all(isinstance(image, PILImage) for row in decoded["images"] for image in row or [])
    assert lineage.image_files_fingerprint(out) is None  # the bytes are in the parquet file's own sha256


def test_path_images_beside_embedded_ones_are_embedded_too(tmp_path, vqa_sft):
    out = build(tmp_path, vqa_sft, DATA / "vision.jsonl")
    red = (DATA / "images" / "red.png").read_bytes()
    images = [row for row in stored_images(out) if row]
    assert len(images) == 4 + 2 and all(isinstance(image["bytes"], bytes) for row in images for image in row)
    assert sum(1 for row in images if [image["bytes"] for image in row] == [red]) == 2


def test_a_rejected_row_with_image_bytes_is_a_short_json_line(tmp_path):
    png = io.BytesIO()
    from PIL import Image as PILImage

    PILImage.new("RGB", (8, 8), "red").save(png, format="PNG")
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string")})
    rows = [{"image": {"bytes": png.getvalue(), "path": None}, "question": q, "answer": a}
            for q, a in (("What colour?", "red"), ("What shape?", ""))]
    Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "vqa.parquet"))
    out = build(tmp_path, tmp_path / "vqa.parquet", extra=["--on_error", "skip"])
    [reject] = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert "answer" in reject["reason"] and reject["where"].endswith("vqa.parquet:2")
    import hashlib

    assert reject["row"]["image"]["bytes"] == {"sha256": hashlib.sha256(png.getvalue()).hexdigest(),
                                               "bytes": len(png.getvalue())}
    assert len(stored_images(out)) == 1


def test_a_set_of_image_paths_keeps_them_as_path_strings(tmp_path):
    """Run lineage hashes the files a path set names (`lineage._image_lists` reads `list<string>` columns)."""
    out = build(tmp_path, DATA / "vision.jsonl", DATA / "alpaca.jsonl")
    assert pq.read_schema(out / "train.parquet").field("images").type == pa.list_(pa.string())
    assert lineage.image_files_fingerprint(out) is not None
    data = vision.decode_images(load_split(str(out), "train"), out, "the set")
    assert sum(1 for row in data["images"] if row) == 2


def test_validate_takes_embedded_images(vqa_sft):
    assert validate.main([str(vqa_sft)]) == 0
