"""Checkpoints and models a user may have downloaded: loading never runs code from them, and a model whose
files disagree with its config.json (fewer layers, extra tensors, NaN weights) is refused by name before
anything is written. One spawned rank does every conversion."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_model


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _error(fn, **kwargs) -> str:
    try:
        fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank, world_size, root: str):
    from safetensors.torch import load_file, save_file

    from fipo_megatron.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf
    from fipo_megatron.checkpoint.dist_ckpt import EXTRA_STATE_FILE

    root = Path(root)
    hf = root / "hf"
    ckpt = convert_hf_to_megatron(hf_dir=hf, out_dir=root / "ckpt")
    out: dict[str, str] = {}
    # hostile checkpoints: a doctored extra state (what the issue saw run) and a doctored DCP index
    for name, target in (("extra", EXTRA_STATE_FILE), ("metadata", ".metadata")):
        bad = root / f"ckpt_{name}"
        shutil.copytree(ckpt, bad)
        payload = _Payload(str(root / f"ran_{name}"))
        if name == "extra":
            torch.save({"scheduler": payload}, bad / target)
        else:
            (bad / target).write_bytes(pickle.dumps(payload))
        out[name] = _error(convert_megatron_to_hf, ckpt_dir=bad, hf_ref_dir=hf, out_dir=root / f"hf_{name}")
    # a good checkpoint still converts (the allow-list covers everything torch DCP and megatron-core write)
    convert_megatron_to_hf(ckpt_dir=ckpt, hf_ref_dir=hf, out_dir=root / "hf_back")
    # bad HF models
    weights = load_file(str(hf / "model.safetensors"))
    config = json.loads((hf / "config.json").read_text())
    nan = weights["model.layers.1.mlp.up_proj.weight"].clone().fill_(float("nan"))
    fewer = dict(config, num_hidden_layers=1)
    if "layer_types" in fewer:  # transformers checks that these agree
        fewer["layer_types"] = fewer["layer_types"][:1]
    cases = {
        "fewer_layers": (fewer, weights),
        "extra_tensor": (config, dict(weights, **{"model.vision_tower.proj.weight": torch.zeros(2, 2)})),
        "nan_weight": (config, dict(weights, **{"model.layers.1.mlp.up_proj.weight": nan})),
    }
    for name, (cfg, tensors) in cases.items():
        d = root / f"hf_{name}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        out[name] = _error(convert_hf_to_megatron, hf_dir=d, out_dir=root / f"ckpt_{name}")
    return out


@pytest.mark.distributed
def test_hostile_checkpoints_and_bad_models_are_refused(tmp_path):
    tiny_hf_model("qwen2", seed=3).save_pretrained(tmp_path / "hf")
    out = run_distributed(_worker, 1, args=(str(tmp_path),), timeout=300)[0]
    for name, file in (("extra", "fipo_extra_state.pt"), ("metadata", ".metadata")):
        assert not (tmp_path / f"ran_{name}").exists(), f"the {name} payload ran"
        assert "UnsafeCheckpointError" in out[name] and file in out[name] and "system" in out[name], out[name]
        assert not (tmp_path / f"hf_{name}").exists()
    assert (tmp_path / "hf_back" / "config.json").is_file() and list((tmp_path / "hf_back").glob("*.safetensors"))
    assert "num_hidden_layers=1 but the weights hold layers up to 1" in out["fewer_layers"], out["fewer_layers"]
    assert "model.vision_tower.proj.weight" in out["extra_tensor"], out["extra_tensor"]
    assert "'model.layers.1.mlp.up_proj.weight' holds NaN" in out["nan_weight"], out["nan_weight"]
    assert not any((tmp_path / f"ckpt_{n}").exists() for n in ("fewer_layers", "extra_tensor", "nan_weight"))
