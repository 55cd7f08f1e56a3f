"""Test environment: offline, one thread, a private model cache; fixtures for tiny models built from configs."""

import os
import tempfile

# Before anything imports huggingface_hub / torch: offline, one thread (tiny models run ~100x slower on shared cores
# with the default thread pool), and a cache that tests own so nothing leaks into the user's ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("POSTTRAIN_CACHE", tempfile.mkdtemp(prefix="posttrain-test-cache-"))
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_path():
    """Callable: `tiny_model_path("llama")` -> local folder of a tiny random-weight model with the tiny tokenizer."""
    from posttrain.models import resolve_model

    return lambda arch="llama": resolve_model(f"tiny:{arch}")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.models import TINY_TOKENIZER, load_tokenizer

    return load_tokenizer(TINY_TOKENIZER)
