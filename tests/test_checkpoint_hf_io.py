"""Streaming safetensors I/O and atomic output directories (no Megatron).

The written files are read back with the safetensors library itself and with transformers'
``from_pretrained`` (the consumers that matter); the reader is checked against ``save_pretrained`` output.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from fipo_megatron.checkpoint.fs import atomic_output_dir, check_output_dir
from fipo_megatron.checkpoint.hf_io import (INDEX_NAME, HFCheckpointReader, TensorSpec, copy_hf_metadata,
                                            plan_shards, write_safetensors_shards)
from fipo_megatron.testing.tiny_models import tiny_hf_model


def _specs(tensors):
    return [TensorSpec(name=n, shape=tuple(t.shape), dtype=t.dtype) for n, t in tensors.items()]


def test_streamed_shards_load_in_safetensors_and_transformers(tmp_path):
    import transformers

    model = tiny_hf_model("llama", seed=1, dtype=torch.bfloat16)
    sd = dict(model.state_dict())
    sd["extra.int_buffer"] = torch.arange(7, dtype=torch.int64)  # odd byte count, other dtype
    out = tmp_path / "hf"
    out.mkdir()
    seen = []
    weight_map = write_safetensors_shards(out, specs=_specs(sd), tensors=iter(sd.items()), max_shard_bytes=40_000,
                                          progress=seen.append)
    assert sum(seen) == sum(t.numel() * t.element_size() for t in sd.values())
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and (out / INDEX_NAME).is_file()
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == sum(seen)
    for fname in files:  # each shard within the limit unless it holds a single larger tensor
        size = os.path.getsize(out / fname)
        names = [n for n, f in weight_map.items() if f == fname]
        assert size <= 40_000 + 4096 or len(names) == 1
    loaded = {}
    for fname in files:
        loaded.update(load_file(str(out / fname)))
    assert set(loaded) == set(sd) and all(torch.equal(loaded[n], sd[n]) for n in sd)
    # transformers reads the directory (without the extra tensor, which it would warn about)
    sd.pop("extra.int_buffer")
    hf2 = tmp_path / "hf2"
    hf2.mkdir()
    write_safetensors_shards(hf2, specs=_specs(sd), tensors=iter(sd.items()), max_shard_bytes=10**9)
    assert sorted(os.listdir(hf2)) == ["model.safetensors"]  # one shard: HF's single-file name, no index
    model.config.save_pretrained(hf2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(hf2), dtype=torch.bfloat16)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, sd[name]), name


def test_writer_rejects_out_of_plan_tensors(tmp_path):
    a, b = torch.zeros(3), torch.ones(2, 2)
    specs = _specs({"a": a, "b": b})
    with pytest.raises(ValueError, match="out of order"):
        write_safetensors_shards(tmp_path, specs=specs, tensors=iter([("b", b), ("a", a)]), max_shard_bytes=100)
    with pytest.raises(ValueError, match=r"'b': got \(4,\)"):
        write_safetensors_shards(tmp_path, specs=specs, tensors=iter([("a", a), ("b", b.reshape(4))]), max_shard_bytes=100)
    with pytest.raises(ValueError, match="ended before 'b'"):
        write_safetensors_shards(tmp_path, specs=specs, tensors=iter([("a", a)]), max_shard_bytes=100)
    assert [len(s) for s in plan_shards(specs * 3, max_shard_bytes=16)] == [1, 1, 1, 1, 1, 1]
    assert [len(s) for s in plan_shards(specs * 3, max_shard_bytes=28)] == [2, 2, 2]


def test_reader_with_and_without_index(tmp_path):
    model = tiny_hf_model("qwen2", seed=2)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / INDEX_NAME).is_file() and not (tmp_path / "single" / INDEX_NAME).exists()
    sd = model.state_dict()
    for sub in ("single", "sharded"):
        reader = HFCheckpointReader(tmp_path / sub)
        assert "model.embed_tokens.weight" in reader and reader.dtype() == torch.float32
        for name in reader.names():
            assert torch.equal(reader.get(name), sd[name]) and reader.shape(name) == tuple(sd[name].shape)
        with pytest.raises(KeyError, match="model.layers.9.mlp"):
            reader.get("model.layers.9.mlp.up_proj.weight")
        reader.close()
    # a shard named by the index but missing on disk is reported with its path
    shard = sorted((tmp_path / "sharded").glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        HFCheckpointReader(tmp_path / "sharded")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HFCheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json"):
        HFCheckpointReader(tmp_path / "empty")


def test_copy_metadata_skips_weights(tmp_path):
    ref = tmp_path / "ref"
    tiny_hf_model("qwen3").save_pretrained(ref)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "merges.txt"):
        (ref / name).write_text("{}")
    (ref / "pytorch_model.bin").write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    copied = copy_hf_metadata(ref, out)
    assert sorted(copied) == ["config.json", "generation_config.json", "merges.txt", "special_tokens_map.json",
                              "tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(FileNotFoundError, match="config.json"):
        copy_hf_metadata(tmp_path / "out" / "missing", out)


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"1")
            raise RuntimeError("boom")
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing half-written, no temp left behind
    with atomic_output_dir(out) as tmp:
        assert tmp != out and not out.exists()
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(ValueError, match="not empty.*--force"):
        check_output_dir(out, force=False)
    with pytest.raises(ValueError, match="not empty"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):  # a failed forced overwrite keeps the old result
        with atomic_output_dir(out, force=True) as tmp:
            raise RuntimeError
    assert (out / "a").read_text() == "1"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(out)) == ["b"] and sorted(os.listdir(tmp_path)) == ["result"]
