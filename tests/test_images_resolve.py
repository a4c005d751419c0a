"""The container recipes resolve: tools/check_image_deps.py runs pip's own resolver (``pip install --dry-run
--report``) for every pip step of each Dockerfile against a throwaway environment that holds the base image's
preinstalled packages (docker/base_images/*.toml) under the image's constraints.

The network tests need PyPI (reachable in CI) and a CPython 3.12 (the images' Python); they run their five
Dockerfile checks concurrently (pip's answers are cached for a day: tools/check_image_deps.py). The single-image recipe this
repository used to ship (NGC PyTorch with SGLang installed into it) is kept as a fixture and must stay red.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "ngc_sglang_pre_split.Dockerfile")
TRAINER = os.path.join(REPO, "Dockerfile")
COLOCATED = os.path.join(REPO, "docker", "colocated.Dockerfile")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name; check_image_deps imports image_pip_env
    spec.loader.exec_module(module)
    return module


pipenv = _load_tool("image_pip_env")
cid = _load_tool("check_image_deps")


# ------------------------------------------------------------------ parsing (no network)
def test_expand_follows_the_shell():
    env = {"V": "0.5.23", "EMPTY": ""}
    assert cid.expand('"sglang[srt]${V:+==${V}}"', env) == '"sglang[srt]==0.5.23"'
    assert cid.expand('"sglang[srt]${EMPTY:+==${EMPTY}}"', env) == '"sglang[srt]"'
    assert cid.expand("${MISSING:-d} $V ${V}", env) == "d 0.5.23 0.5.23"
    assert cid.expand("'$V' \"$V\"", env) == "'$V' \"0.5.23\""  # no expansion inside single quotes


def test_split_commands_pipelines_and_redirections():
    cmds = cid.split_commands("pip list --format=freeze | grep -iE '^(torch|apex)==' > /tmp/c.txt && cat /tmp/c.txt; "
                              "PIP_CONSTRAINT=/tmp/c.txt pip install \"a==1\" b")
    assert cmds[0] == [["pip", "list", "--format=freeze"], ["grep", "-iE", "^(torch|apex)==", ">", "/tmp/c.txt"]]
    assert cmds[1] == [["cat", "/tmp/c.txt"]]
    assert cid.pip_argv(cmds[2][0]) == ({"PIP_CONSTRAINT": "/tmp/c.txt"}, ["install", "a==1", "b"])
    assert cid.pip_argv(["python3", "-m", "pip", "install", "x"]) == ({}, ["install", "x"])
    assert cid.pip_argv(["python", "-c", "import pip"]) is None


def test_instructions_join_continuations_and_skip_comments():
    ins = cid.read_instructions("FROM a\n# c\nRUN x \\\n    # inner comment\n    && y\nENV A=1 \\\n  B=2\n")
    assert [(i.line, i.op) for i in ins] == [(1, "FROM"), (3, "RUN"), (6, "ENV")]
    assert ins[1].arg.split() == ["x", "&&", "y"]


def test_manifests_are_complete_and_name_their_sources():
    for path in sorted(os.listdir(os.path.join(REPO, "docker", "base_images"))):
        full = os.path.join(REPO, "docker", "base_images", path)
        manifest = pipenv.load_manifest(full)
        assert "torch" in manifest.packages, path
        with open(full) as f:
            head = f.read().split("image =")[0]
        assert re.search(r"release notes|Dockerfile", head), f"{path}: no provenance comment"


def test_unknown_base_image_is_named(tmp_path):
    dockerfile = tmp_path / "x.Dockerfile"
    dockerfile.write_text("FROM example/unknown:1\nRUN pip install a==1\n")
    with pytest.raises(cid.CheckError, match="example/unknown:1"):
        cid.check_dockerfile(str(dockerfile))


def test_unpinned_requirement_fails_before_resolving():
    # The fixture's defaults leave SGLang unpinned: no single answer to check, and the check says so.
    ok, results = cid.check_dockerfile(FIXTURE)
    assert not ok and results[-1].line == 33
    assert "'sglang[srt]' is not pinned" in results[-1].detail


def test_constraint_file_written_by_the_dockerfile_is_modelled(tmp_path):
    # pip list | grep > FILE is evaluated on the simulated environment; an unknown file is an error.
    dockerfile = tmp_path / "x.Dockerfile"
    dockerfile.write_text("FROM nvcr.io/nvidia/pytorch:25.04-py3\nRUN pip install -c /nowhere.txt a==1\n")
    with pytest.raises(cid.CheckError, match="/nowhere.txt"):
        cid.check_dockerfile(str(dockerfile))


# ------------------------------------------------------------------ pip's resolver (PyPI)
@pytest.fixture(scope="module")
def resolved(tmp_path_factory):
    """Every network check at once (they wait on PyPI, not on the CPU)."""
    tmp = tmp_path_factory.mktemp("images")
    with open(COLOCATED) as f:
        text = f.read()
    assert '"nvdlfw-inspect==' in text
    broken = tmp / "colocated_without_nvdlfw.Dockerfile"
    broken.write_text(re.sub(r'"nvdlfw-inspect==[^"]*" ', "", text))
    ngc_sglang = tmp / "ngc_25.12_sglang.Dockerfile"
    ngc_sglang.write_text('FROM nvcr.io/nvidia/pytorch:25.12-py3\nRUN pip install "sglang==0.5.23"\n')
    jobs = {
        "pre_split": (FIXTURE, {"SGLANG_VERSION": "0.5.23"}),
        "ngc_25.12_sglang": (str(ngc_sglang), {}),
        "trainer": (TRAINER, {}),
        "colocated": (COLOCATED, {}),
        "colocated_without_te_dep": (str(broken), {}),
    }
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(cid.check_dockerfile, path, build_args=args) for k, (path, args) in jobs.items()}
        return {k: f.result() for k, f in futures.items()}


def _report(results):
    return "\n".join(f"line {r.line} {'ok' if r.ok else 'FAIL'}: {r.command}\n{r.detail}" for r in results)


@pytest.mark.slow
def test_pre_split_recipe_cannot_resolve(resolved):
    """NGC PyTorch 25.04 with SGLang 0.5.23 on top: SGLang pins torch==2.14.1, the image holds 2.7.0a0."""
    ok, results = resolved["pre_split"]
    assert not ok, _report(results)
    failed = results[-1]
    assert failed.line == 33 and "sglang[srt]==0.5.23" in failed.command
    assert "ResolutionImpossible" in failed.detail
    assert "sglang 0.5.23 depends on torch==2.14.1" in failed.detail
    assert re.search(r"\(constraint\) torch==2\.7\.0a0\+79aa17489c", failed.detail), failed.detail


@pytest.mark.slow
def test_ngc_constraint_file_forbids_sglang(resolved):
    """The image's own constraint file alone (no step of ours) keeps SGLang out of NGC 25.12."""
    ok, results = resolved["ngc_25.12_sglang"]
    assert not ok and "ResolutionImpossible" in results[-1].detail
    assert "(constraint) torch==2.10.0a0+b4e4ee81d3.nv25.12" in results[-1].detail, results[-1].detail


@pytest.mark.slow
def test_trainer_image_resolves_and_keeps_ngc_torch(resolved):
    ok, results = resolved["trainer"]
    assert ok, _report(results)
    with open(TRAINER) as f:
        pip_lines = [i + 1 for i, l in enumerate(f) if l.startswith("RUN pip install")]
    assert [r.line for r in results] == pip_lines and len(pip_lines) == 2
    installs = {i.split("==")[0].lower().replace("_", "-") for r in results for i in r.installs}
    assert {"megatron-core", "nvidia-modelopt", "fipo-megatron"} <= installs
    # The image's own builds stay: none of them is (re)installed by any step.
    assert not installs & {"torch", "transformer-engine", "apex", "flash-attn", "triton", "sglang", "vllm"}


@pytest.mark.slow
def test_colocated_image_resolves_against_sglang_image(resolved):
    ok, results = resolved["colocated"]
    assert ok, _report(results)
    installs = {i.split("==")[0].lower().replace("_", "-") for r in results for i in r.installs}
    assert {"transformer-engine", "transformer-engine-torch", "megatron-core", "fipo-megatron"} <= installs
    assert not installs & {"torch", "sglang", "transformers", "triton"}
    te_build = next(r for r in results if "transformer-engine-torch" in r.command)
    assert "--no-build-isolation" in te_build.command and "source build" in te_build.detail


@pytest.mark.slow
def test_source_build_requirements_are_checked(resolved):
    """Negative control: without one of TE's PyTorch-extension requirements, pip check fails at that step."""
    ok, results = resolved["colocated_without_te_dep"]
    assert not ok
    assert "transformer-engine-torch" in results[-1].command
    assert "requires nvdlfw-inspect, which is not installed" in results[-1].detail


def test_dockerfiles_document_the_check():
    for path in (TRAINER, COLOCATED):
        with open(path) as f:
            text = f.read()
        assert "tools/check_image_deps.py" in text, path
    with open(COLOCATED) as f:
        assert "FROM SOURCE" in f.read()  # the TE compile is stated plainly
    with open(TRAINER) as f:
        text = f.read()
    assert not re.search(r"pip install[^\n]*sglang", text), "the trainer image installs no rollout engine"
