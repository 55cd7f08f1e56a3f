"""Converting a GGUF base model: each file parsed once, gguf-py left as it was afterwards. Where a model for
evaluation and sampling is placed."""

import gguf
import numpy as np
import pytest
import torch

from posttrain.models.load import gguf_read_once


def write_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_is_parsed_once_inside_the_context_and_anew_outside(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling of its path
        assert gguf.GGUFReader(path, "r+") is not first  # a writable map is never shared
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is table
        assert table.get_name("model.embed_tokens") == "token_embd"
        assert first.fields["llama.block_count"].contents() == 2
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(32, dtype=np.float32).reshape(4, 8))
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not first
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not table


def test_gguf_py_is_restored_when_the_conversion_fails(tmp_path):
    reader_class = gguf.GGUFReader
    try:
        with gguf_read_once():
            raise RuntimeError("conversion failed")
    except RuntimeError:
        pass
    assert gguf.GGUFReader is reader_class


@pytest.mark.parametrize("cuda, native, precision, device, dtype", [
    (False, False, "auto", "cpu", torch.float32),
    (False, False, "bfloat16", "cpu", torch.float32),  # bf16 on a CPU is autocast over float32 weights
    (True, True, "auto", "cuda", torch.bfloat16),
    (True, False, "auto", "cuda", torch.float32),
    (True, True, "float32", "cuda", torch.float32),
])
def test_evaluation_and_pair_sampling_load_onto_the_gpu(monkeypatch, tiny_model_path, cuda, native, precision, device,
                                                        dtype):
    """The base model's and a saved adapter's evaluation and the on-policy pair sampler run where the stages train:
    on the GPU when there is one (bf16 weights there when the precision resolves to bf16), not on its host's CPU."""
    from posttrain import devices
    from posttrain.models import load_for_inference

    moved = []
    monkeypatch.setattr(devices, "has_cuda", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: native)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: moved.append(args) or self)
    model = load_for_inference(tiny_model_path("llama"), precision=precision)
    assert moved == [(device,)] and not model.training
    assert {p.dtype for p in model.parameters()} == {dtype}
