"""Every recipe config loads and validates in both rollout arrangements (SGLang servers; colocated SGLang
engines) through the project's config loader and the engines' own settings classes, without building a model
or starting an engine; the server variants stay identical to their recipes outside the rollout section; the
launchers refuse what would hang a cluster job, and the server launcher passes only flags that SGLang's
ServerArgs defines (read from the sglang 0.5.23 wheel on PyPI)."""

from __future__ import annotations

import copy
import glob
import os
import re
import subprocess
import sys
import zipfile

import pytest
import yaml

from fipo_megatron.config import config_from_dict
from fipo_megatron.rollout.base import get_engine
from fipo_megatron.rollout.multi import MultiEngine
from fipo_megatron.rollout.sglang_engine import (
    SGLangEngineConfig,
    SGLangServerEngine,
    WeightSyncConfig,
    _sglang_replica,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "examples", "configs", "*.yaml")))
SERVER_VARIANTS = [c for c in CONFIGS if c.endswith("_servers.yaml")]

# Each arrangement's rollout section for a config: the recipe family's own file when it has one (the recipe and
# its _servers variant), else a minimal one (the CPU demo's embedded engine is neither SGLang arrangement).
GENERIC = {
    "colocated": {"engine": "sglang", "engine_kwargs": {"tp_size": 1}, "placement": "rank0"},
    "servers": {"engine": "sglang_server", "placement": "rank0",
                "engine_kwargs": {"base_url": "http://gen-0:30000",
                                  "weight_sync": {"master_port": 29600, "engine_world_size": 1}}},
}
ROLLOUT_KEYS = ("engine", "engine_kwargs", "placement")


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _family(path):
    base = os.path.basename(path).removesuffix(".yaml").removesuffix("_servers")
    return os.path.join(REPO, "examples", "configs", base + ".yaml"), os.path.join(REPO, "examples", "configs",
                                                                                  base + "_servers.yaml")


def _arrangement_rollout(path, arrangement):
    colocated, servers = _family(path)
    source = servers if arrangement == "servers" else colocated
    if os.path.exists(source):
        raw = _load(source)["rollout"]
        if raw.get("engine") == {"servers": "sglang_server", "colocated": "sglang"}[arrangement]:
            return {k: raw[k] for k in ROLLOUT_KEYS if k in raw}
    return copy.deepcopy(GENERIC[arrangement])


def validate_engine_settings(cfg):
    """The engine factory's own checks, short of starting anything: the servers' clients (no request is sent
    until the trainer connects) and the colocated engine's settings with each replica's GPU offset."""
    kwargs = dict(cfg.rollout.engine_kwargs)
    if cfg.rollout.engine == "sglang_server":
        engine = get_engine("sglang_server", model_path=cfg.model.path, **kwargs)
        servers = engine.engines if isinstance(engine, MultiEngine) else [engine]
        assert all(isinstance(s, SGLangServerEngine) for s in servers)
        ws = engine.weight_sync
        assert isinstance(ws, WeightSyncConfig), "servers need rollout.engine_kwargs.weight_sync"
        return [s.base_url for s in servers], ws.world_sizes(len(servers))
    assert cfg.rollout.engine == "sglang"
    num = kwargs.pop("num_engines", 1)
    if num == 1:  # get_engine builds the engine from these kwargs directly
        replicas = [SGLangEngineConfig(model_path=cfg.model.path, **kwargs)]
    else:  # each replica from the engine's own replica rule (it may refuse several)
        replicas = [_sglang_replica({"model_path": cfg.model.path, **kwargs}, i)["config"] for i in range(num)]
    assert all(isinstance(r, SGLangEngineConfig) for r in replicas)
    gpus = [g for r in replicas for g in range(r.base_gpu_id, r.base_gpu_id + r.tp_size)]
    assert len(set(gpus)) == len(gpus) <= 8, f"colocated replicas overlap or exceed a node's 8 GPUs: {gpus}"
    return replicas


@pytest.mark.parametrize("arrangement", ["servers", "colocated"])
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates_in_both_arrangements(path, arrangement):
    raw = _load(path)
    raw["rollout"] = {**{k: v for k, v in raw["rollout"].items() if k not in ROLLOUT_KEYS},
                      **_arrangement_rollout(path, arrangement)}
    cfg = config_from_dict(raw)
    assert (cfg.rollout.engine == "sglang_server") == (arrangement == "servers")
    validate_engine_settings(cfg)


def test_server_variants_exist_for_the_gpu_recipes():
    names = {os.path.basename(p) for p in SERVER_VARIANTS}
    assert {"qwen2.5_math_7b_fipo_servers.yaml", "qwen2.5_32b_fipo_servers.yaml"} <= names


@pytest.mark.parametrize("path", SERVER_VARIANTS, ids=os.path.basename)
def test_server_variant_matches_its_recipe_outside_rollout(path):
    base_path, _ = _family(path)
    base, variant = _load(base_path), _load(path)
    assert base["trainer"].pop("experiment_name") + "_servers" == variant["trainer"].pop("experiment_name")
    for section in set(base) | set(variant):
        if section == "rollout":
            strip = lambda d: {k: v for k, v in d.items() if k not in ROLLOUT_KEYS}  # noqa: E731
            assert strip(base[section]) == strip(variant[section])
        else:
            assert base.get(section) == variant.get(section), f"{os.path.basename(path)}: {section} differs"


@pytest.mark.parametrize("path", SERVER_VARIANTS, ids=os.path.basename)
def test_server_variant_names_a_launcher_layout(path):
    """The header's launcher line (NUM_SERVERS x TP_SIZE) matches the servers and group sizes the config lists."""
    with open(path) as f:
        text = f.read()
    m = re.search(r"NUM_SERVERS=(\d+) TP_SIZE=(\d+) bash examples/launch_sglang_servers\.sh", text)
    assert m, "the header shows the launcher command"
    per_node, tp = int(m.group(1)), int(m.group(2))
    cfg = config_from_dict(_load(path))
    urls, sizes = validate_engine_settings(cfg)
    hosts = {re.match(r"http://([^:/]+)", u).group(1) for u in urls}
    assert len(urls) == per_node * len(hosts) and set(sizes) == {tp} and per_node * tp <= 8


# ------------------------------------------------------------------ launchers
def _bash(script, env, *args):
    clean = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MODEL")}
    return subprocess.run(["bash", os.path.join(REPO, "examples", script), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR is not set"),
    ({"NNODES": "2", "MASTER_ADDR": "node0"}, "NODE_RANK is not set"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "node0"}, "NODE_RANK must be in 0..1"),
    ({"NNODES": "two"}, "NNODES must be a positive integer"),
])
def test_launch_multinode_refuses_an_incomplete_cluster(env, message):
    out = _bash("launch_multinode.sh", {**env, "DRY_RUN": "1"}, "examples/configs/tiny_cpu.yaml")
    assert out.returncode == 2 and message in out.stderr and not out.stdout


def test_launch_multinode_command(tmp_path):
    out = _bash("launch_multinode.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "DRY_RUN": "1",
                                        "RUN_DIR": str(tmp_path / "r")}, "examples/configs/tiny_cpu.yaml", "a.b=1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1",
                                  "--nproc-per-node", "8", "--master-addr", "node0", "--master-port", "29500", "-m",
                                  "fipo_megatron", "--config", "examples/configs/tiny_cpu.yaml",
                                  f"trainer.run_dir={tmp_path / 'r'}", "a.b=1"]
    single = _bash("launch_multinode.sh", {"DRY_RUN": "1", "RUN_DIR": str(tmp_path / "r")}, "x.yaml")
    assert "--master-addr 127.0.0.1" in single.stdout  # one node: loopback is right


def _server_commands(env):
    out = _bash("launch_sglang_servers.sh", {"DRY_RUN": "1", "MODEL": "/models/m", "ADVERTISE_HOST": "gen-0", **env})
    assert out.returncode == 0, out.stderr
    *commands, override = out.stdout.strip().splitlines()
    return [c.split() for c in commands], override


def test_server_launcher_layout_and_override():
    commands, override = _server_commands({"NUM_SERVERS": "4", "TP_SIZE": "2"})
    assert [c[c.index("--base-gpu-id") + 1] for c in commands] == ["0", "2", "4", "6"]
    assert [c[c.index("--port") + 1] for c in commands] == ["30000", "30001", "30002", "30003"]
    assert all("--skip-tokenizer-init" in c and "--enable-memory-saver" not in c for c in commands)
    from fipo_megatron.config_loader import parse_overrides

    kwargs = parse_overrides(override.split())["rollout"]["engine_kwargs"]
    assert kwargs["base_urls"] == [f"http://gen-0:{p}" for p in range(30000, 30004)]
    assert kwargs["weight_sync"] == {"engine_world_size": 2}
    bad = _bash("launch_sglang_servers.sh", {"DRY_RUN": "1", "MODEL": "/m", "NUM_SERVERS": "5", "TP_SIZE": "2"})
    assert bad.returncode == 2 and "10 GPUs" in bad.stderr


def _sglang_cli_flags(wheel_dir):
    """Flags of ``sglang.launch_server`` in the sglang 0.5.23 wheel: ServerArgs fields annotated for the CLI
    (``--`` + field name, plus Arg aliases) and the flags server_args.py registers by hand."""
    wheel = glob.glob(os.path.join(wheel_dir, "sglang-0.5.23-*.whl"))[0]
    flags = set()
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("sglang/srt/arg_groups/fields/") and name.endswith(".py"):
                text = z.read(name).decode()
                flags |= {"--" + f.replace("_", "-") for f in re.findall(r"^    (\w+): A\[", text, re.M)}
                for aliases in re.findall(r"aliases=\[([^\]]*)\]", text):
                    flags |= set(re.findall(r'"(--[\w-]+)"', aliases))
            elif name == "sglang/srt/server_args.py":
                flags |= set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', z.read(name).decode()))
    return flags


@pytest.mark.slow
def test_server_launcher_flags_exist_in_sglang(tmp_path):
    """Needs PyPI: the sglang wheel the servers' image holds (39 MB, from pip's cache after the first run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--platform", "manylinux_2_34_x86_64", "sglang==0.5.23",
                    "-d", str(tmp_path)], check=True, capture_output=True, env=env, timeout=600)
    known = _sglang_cli_flags(str(tmp_path))
    assert {"--model-path", "--tp-size", "--port"} <= known  # the reader found ServerArgs
    commands, _ = _server_commands({"NUM_SERVERS": "2", "TP_SIZE": "4", "CONTEXT_LENGTH": "22528"})
    used = {a for c in commands for a in c if a.startswith("--")}
    assert used <= known, f"flags sglang 0.5.23 does not define: {sorted(used - known)}"
