"""Model resolution and caching: partial Hub snapshots, the posttrain model cache, safetensors only, offline mode."""

import os
import shutil
import socket
import threading

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from posttrain.errors import UserError
from posttrain.models import gguf, load, load_model, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; `add(repo_id, files)` puts a snapshot of the files from the tiny model in it."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def add(repo_id, files):
        repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(COMMIT)
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        for name in files:
            shutil.copy(resolve_model("tiny:llama") / name, snapshot / name)
        return snapshot

    return add


def test_a_cached_snapshot_without_weights_is_not_the_model(hub_cache, monkeypatch):
    partial = hub_cache("someorg/tinymodel", ["config.json", "tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(UserError, match=r"only partly .*no \*\.safetensors weights.*hf download someorg/tinymodel"):
        resolve_model("someorg/tinymodel")
    # online, the weights are downloaded instead (the Hub answers; the download is faked)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(load, "_check_hub_answers", lambda repo_id, revision: None)
    real_download = huggingface_hub.snapshot_download
    downloads = []

    def download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return real_download(repo_id, **kwargs)
        downloads.append(repo_id)
        shutil.copy(resolve_model("tiny:llama") / "model.safetensors", partial)
        return str(partial)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model("someorg/tinymodel") == partial and downloads == ["someorg/tinymodel"]
    assert resolve_model("someorg/tinymodel") == partial and downloads == ["someorg/tinymodel"]  # now complete


def test_offline_and_not_cached_says_hf_download(hub_cache):
    with pytest.raises(UserError, match=r"not in the local Hugging Face cache.*\(hf download someorg/absent\)"):
        resolve_model("someorg/absent")
    # a pinned revision: `hf download` of main would leave the run failing the same way
    with pytest.raises(UserError, match=r"someorg/absent' at revision 'v2' .*hf download someorg/absent --revision v2"):
        resolve_model("someorg/absent", revision="v2")


def test_a_snapshot_whose_weights_link_to_a_removed_blob_is_only_partly_cached(hub_cache):
    """A snapshot's files are links to blobs: a blob removed by a cleanup leaves a link to nothing, which was taken for
    the weights (a traceback later, from fingerprinting)."""
    snapshot = hub_cache("someorg/dangling", ["config.json", "tokenizer.json", "tokenizer_config.json"])
    (snapshot / "model.safetensors").symlink_to(snapshot.parent.parent / "blobs" / "removed")
    with pytest.raises(UserError, match=r"only partly .*no \*\.safetensors weights.*hf download someorg/dangling"):
        resolve_model("someorg/dangling")


def test_a_full_disk_while_building_a_cache_entry_names_the_cache(tmp_path, monkeypatch):
    """The model cache is often on another disk than the run (the home folder): the error names the one that
    filled and how to move the cache, not the run folder."""
    import errno

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))

    def build(out):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"no space left on .*cache.*model cache entry x \(\$POSTTRAIN_CACHE moves"):
        load.cache_entry("x", build)


@pytest.mark.parametrize(("value", "offline"), [("1", True), ("true", True), ("ON", True), ("yes", True),
                                                 ("0", False), ("", False), ("off", False)])
def test_offline_is_read_as_huggingface_hub_reads_it(value, offline, monkeypatch):
    from posttrain.doctor import check_environment

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert load.is_offline() is offline
    status = dict((name, status) for name, _, status in check_environment())["offline mode"]
    assert status == ("Hub ids fail fast" if offline else "Hub lookups may wait on the network")


def test_a_stalled_hub_is_an_error_not_a_hang(hub_cache, monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()  # and never answer
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(load, "HUB_TIMEOUT_S", 0.5)
    try:
        with pytest.raises(UserError, match=r"Hub did not answer within 0.5 s.*HF_HUB_OFFLINE=1"):
            resolve_model("someorg/tinymodel")
    finally:
        server.close()


def test_pickled_weights_are_refused(tmp_path):
    tiny = resolve_model("tiny:llama")
    folder = tmp_path / "binmodel"
    folder.mkdir()
    shutil.copy(tiny / "config.json", folder)
    torch.save(load_model(tiny).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"pytorch_model.bin but no \*\.safetensors weights; posttrain loads "
                                        r"safetensors weights only"):
        load_model(folder)


def test_a_pickled_adapter_is_refused(tmp_path):
    """An adapter folder with only adapter_model.bin: a UserError by name (as `export` gives), not torch.load's
    traceback, and a hostile pickle never runs."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # any pickle
    with pytest.raises(UserError, match=r"pickled adapter \(adapter_model.bin\) but no adapter_model.safetensors"):
        load_model(resolve_model("tiny:llama"), adapter=folder)


def test_an_adapter_folder_without_its_weights_is_named_not_looked_up_on_the_hub(tmp_path):
    """A stage folder (or an adapter export) whose adapter_model.safetensors is gone: PEFT took the folder for a Hub
    id, and `posttrain eval` / `chat` ended in a traceback about hf.co look-ups being disabled."""
    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    with pytest.raises(UserError, match=r"sft holds no adapter_model.safetensors, the adapter's weights"):
        load_model(resolve_model("tiny:llama"), adapter=folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10" + bytes(20))  # cut short: a header and no tensors
    with pytest.raises(UserError, match=r"sft: adapter_model.safetensors does not load \(.*\): the folder is damaged"):
        load_model(resolve_model("tiny:llama"), adapter=folder)


def test_a_broken_cache_entry_is_rebuilt_and_dead_builds_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    entry = resolve_model("tiny:llama")
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a full disk, or an interrupted copy
    dead_pid = 4194305  # above Linux's pid_max: never a running process
    leftover = entry.parent / f".tiny-llama.{dead_pid}-0123abcd.partial"
    leftover.mkdir()
    assert resolve_model("tiny:llama") == entry
    err = capsys.readouterr().err
    assert "model.safetensors does not load" in err and "rebuilding it" in err
    assert load.entry_problem(entry) is None and not leftover.exists()
    load_model(entry)


def test_llava_is_rebuilt_when_its_local_language_model_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    language_model = shutil.copytree(resolve_model("tiny:llama"), tmp_path / "lm")
    first = resolve_model(f"llava:{language_model}")
    assert resolve_model(f"llava:{language_model}") == first
    weights = language_model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # saved again
    assert resolve_model(f"llava:{language_model}") != first


def test_doctor_sees_the_converted_default_model_under_its_key(tmp_path, monkeypatch):
    from posttrain.doctor import check_default_model
    from posttrain.recipe import load_recipe

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    base = load_recipe().base
    name = load.gguf_entry_name(gguf.find_gguf(base.gguf_file, base.gguf_package))
    stem = name.rsplit("-", 1)[0]
    shutil.copytree(resolve_model("tiny:llama"), tmp_path / "cache" / "models" / f"{stem}-0000000000")  # another key
    assert check_default_model()[0][2].endswith("converts on first run (~15 s)")
    shutil.copytree(resolve_model("tiny:llama"), tmp_path / "cache" / "models" / name)
    assert check_default_model()[0][2] == "installed, converted"


def test_a_gguf_rewritten_in_place_converts_again(tmp_path):
    """The converted model's cache key covers the GGUF's time and size: a file replaced under the same name (another
    quantization) is converted again instead of being served the old conversion."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"x" * 10)
    first = load.gguf_entry_name(path)
    assert first.startswith("model-") and load.gguf_entry_name(path) == first
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten, same size
    assert load.gguf_entry_name(path) != first
    path.write_bytes(b"x" * 11)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time, another size
    assert load.gguf_entry_name(path) != first


def test_a_hub_download_takes_safetensors_and_no_pickles(monkeypatch):
    """Online, a Hub id is downloaded with its safetensors weights and tokenizer files, never its pickled weights."""
    from fnmatch import fnmatch
    from pathlib import Path

    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(load, "_check_hub_answers", lambda repo_id, revision: None)
    asked = {}

    def download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        asked.update(kwargs)
        return "/hub/someorg/new"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_model("someorg/new") == Path("/hub/someorg/new")
    names = ("model.safetensors", "config.json", "tokenizer.json", "pytorch_model.bin", "model.pt", "optimizer.bin")
    taken = [name for name in names if any(fnmatch(name, pattern) for pattern in asked["allow_patterns"])]
    assert taken == ["model.safetensors", "config.json", "tokenizer.json"]


def test_transformers_offline_alone_keeps_the_hub_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert load.is_offline() and load.datasets_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not load.is_offline() and not load.datasets_offline()


def test_a_folder_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a folder but holds no config.json; expected a saved Hugging Face model"):
        resolve_model(str(tmp_path))


def test_a_missing_folder_named_without_a_slash_is_not_taken_for_a_hub_id():
    """"mymodel" passes the Hub's own check (a legacy id), but a recipe means a local folder by it: the error says so
    instead of suggesting `hf download mymodel`."""
    with pytest.raises(UserError, match=r"model 'mymodel' is neither a local folder nor a Hub id of the form"):
        resolve_model("mymodel")


def test_a_cache_entry_without_its_config_is_rebuilt(tmp_path, monkeypatch):
    tiny = resolve_model("tiny:llama")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    entry = shutil.copytree(tiny, tmp_path / "models" / "x")
    (entry / "config.json").unlink()
    built = []
    assert load.cache_entry("x", lambda out: built.append(out) or out) == entry and built == [entry]


def test_a_snapshot_missing_one_of_its_weight_shards_is_only_partly_cached(hub_cache):
    """An interrupted download of a sharded model leaves some shards: the index names them all."""
    import json

    snapshot = hub_cache("someorg/sharded", ["config.json", "tokenizer.json", "tokenizer_config.json"])
    shutil.copy(resolve_model("tiny:llama") / "model.safetensors", snapshot / "model-00001-of-00002.safetensors")
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match=r"only partly .*weight shards missing: model-00002-of-00002.safetensors\)"):
        resolve_model("someorg/sharded")


def test_an_adapter_gives_its_tokenizer_only_where_it_saved_one(tmp_path):
    assert load.adapter_tokenizer(None) is None and load.adapter_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load.adapter_tokenizer(tmp_path) == str(tmp_path)


def test_an_adapter_with_safetensors_loads_beside_a_stray_pickle(tmp_path):
    from peft import LoraConfig, get_peft_model

    tiny = resolve_model("tiny:llama")
    get_peft_model(load_model(tiny), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # never read: PEFT prefers the safetensors
    assert load_model(tiny, adapter=tmp_path).peft_config["default"].r == 2


def test_a_tiny_model_is_the_same_every_time_it_is_built(tmp_path):
    from posttrain.models import tiny

    first, second = (tiny.build_tiny("llama", tmp_path / name) for name in ("a", "b"))
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_a_folder_without_its_tokenizer_files_is_named_before_the_model_loads(tmp_path, monkeypatch):
    """A stage folder whose tokenizer files are gone (a partial copy): `posttrain eval` and `chat` name the folder and
    what it lacks before loading the model, instead of transformers' traceback about its config."""
    from posttrain import evaluate
    from posttrain.configs import EvalArguments
    from posttrain.models import load_tokenizer

    folder = tmp_path / "sft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    with pytest.raises(UserError, match=r"sft holds no tokenizer files \(tokenizer_config.json, tokenizer.json"):
        load_tokenizer(folder)
    data = tmp_path / "eval.jsonl"
    data.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    monkeypatch.setattr(evaluate, "settings_rows", lambda settings: [{"prompt": "1 + 1 =", "answer": "2"}])
    monkeypatch.setattr("posttrain.models.load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"sft holds no tokenizer files"):
        evaluate.run_saved(EvalArguments(dataset=str(data)), "tiny:llama", tokenizer=str(folder))
    load_tokenizer(resolve_model("tiny:llama"))  # a model folder with its tokenizer loads as before
