"""The pip side of tools/check_image_deps.py: base-image manifests, the fake environment pip sees as the image
(one metadata-only ``.dist-info`` per preinstalled package in a throwaway virtual environment), running pip against
it (``pip install --dry-run --report`` with a cache of its answers, ``pip check``), the informative part of pip's
failures, an sdist's requirements read from PyPI, and deriving a manifest from pip's resolution.

Nothing here reads a Dockerfile; the check and its command line are in tools/check_image_deps.py.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.parser import Parser

PIP_TIMEOUT_S = 900


class CheckError(Exception):
    """A Dockerfile step that does not resolve, or a Dockerfile the check cannot interpret."""


# ---------------------------------------------------------------------------------------------- manifests
@dataclasses.dataclass
class BaseImage:
    """A base image's preinstalled packages (``docker/base_images/*.toml``)."""

    image: str
    python: str                       # "3.12"
    packages: dict[str, str]          # distribution name -> version
    requires: dict[str, list[str]]    # optional Requires-Dist per package
    constraint_file: str | None       # the image's pip constraint file (pins every package listed)
    constraint_env: bool              # the image sets PIP_CONSTRAINT to that file
    path: str


def load_manifest(path: str) -> BaseImage:
    """The manifest at ``path``, checked: required keys, a minor Python version, [requires] naming listed packages."""
    import tomllib

    with open(path, "rb") as f:
        raw = tomllib.load(f)
    for key in ("image", "python", "packages"):
        if key not in raw:
            raise CheckError(f"{path}: missing key {key!r}")
    if not re.fullmatch(r"3\.\d+", raw["python"]):
        raise CheckError(f"{path}: python must be a minor version like '3.12', got {raw['python']!r}")
    packages = {str(k): str(v) for k, v in raw["packages"].items()}
    requires = {str(k): [str(r) for r in v] for k, v in raw.get("requires", {}).items()}
    unknown = sorted(set(requires) - set(packages))
    if unknown:
        raise CheckError(f"{path}: [requires] names packages not in [packages]: {unknown}")
    return BaseImage(image=raw["image"], python=raw["python"], packages=packages, requires=requires,
                     constraint_file=raw.get("constraint_file"), constraint_env=bool(raw.get("constraint_env")),
                     path=path)


def find_manifest(image: str, manifest_dir: str) -> BaseImage:
    """The manifest in ``manifest_dir`` whose ``image`` is ``image``; a CheckError naming the known images otherwise."""
    found = []
    for path in sorted(glob.glob(os.path.join(manifest_dir, "*.toml"))):
        manifest = load_manifest(path)
        if manifest.image == image:
            return manifest
        found.append(manifest.image)
    raise CheckError(f"no manifest in {manifest_dir} for base image {image!r} (manifests: {found})")


# ---------------------------------------------------------------------------------------------- the fake env
def find_python(minor: str) -> str:
    """A CPython ``minor`` ("3.12") interpreter: $IMAGE_CHECK_PYTHON_3_12, python3.12 on PATH, pyenv versions."""
    candidates = [os.environ.get("IMAGE_CHECK_PYTHON_" + minor.replace(".", "_"), "")]
    candidates.append(shutil.which(f"python{minor}") or "")
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    for root in filter(None, roots):
        candidates += sorted(glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", f"python{minor}")), reverse=True)
    candidates += [f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}"]
    if sys.version_info[:2] == tuple(int(x) for x in minor.split(".")):
        candidates.insert(0, sys.executable)
    for cand in filter(None, candidates):
        if not os.path.exists(cand):
            continue
        try:
            got = subprocess.run([cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if got == minor:
            return cand
    raise CheckError(f"no CPython {minor} found (the base image's Python; markers and Requires-Python depend on "
                     f"it): put python{minor} on PATH or set IMAGE_CHECK_PYTHON_{minor.replace('.', '_')}")


def _dist_dir_name(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"


def canonical(name: str) -> str:
    """A distribution name normalised as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class FakeEnv:
    """A venv (no pip inside) whose site-packages holds metadata-only dist-infos: what pip sees as installed."""

    def __init__(self, root: str, python: str):
        subprocess.run([python, "-m", "venv", "--without-pip", root], check=True, capture_output=True)
        self.python = os.path.join(root, "bin", "python")
        self.python_version = subprocess.run([self.python, "-c", "import sys; print(sys.version)"], check=True,
                                             capture_output=True, text=True).stdout.strip()
        self.site = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip()
        self.dists: dict[str, tuple[str, str]] = {}  # canonical name -> (name, version)

    def add(self, name: str, version: str, *, requires: list[str] = (), provides_extra: list[str] = (),
            requires_python: str | None = None) -> None:
        """Install ``name==version`` as metadata only, replacing any other version of it."""
        self.remove(name)
        path = os.path.join(self.site, _dist_dir_name(name, version))
        os.makedirs(path)
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        if requires_python:
            lines.append(f"Requires-Python: {requires_python}")
        lines += [f"Provides-Extra: {e}" for e in provides_extra]
        lines += [f"Requires-Dist: {r}" for r in requires]
        with open(os.path.join(path, "METADATA"), "w") as f:
            f.write("\n".join(lines) + "\n")
        for fname, text in (("INSTALLER", "pip\n"), ("RECORD", "")):
            with open(os.path.join(path, fname), "w") as f:
                f.write(text)
        self.dists[canonical(name)] = (name, version)

    def remove(self, name: str) -> None:
        """Uninstall ``name`` if present."""
        old = self.dists.pop(canonical(name), None)
        if old is not None:
            shutil.rmtree(os.path.join(self.site, _dist_dir_name(*old)))

    def freeze(self) -> list[str]:
        """``name==version`` of every installed package, sorted by canonical name (as ``pip freeze``)."""
        return [f"{name}=={version}" for name, version in sorted(self.dists.values(), key=lambda nv: canonical(nv[0]))]


def pip_env() -> dict[str, str]:
    """The environment pip runs in: this machine's pip configuration (local wheel folders, index mirrors, caps)
    is switched off so that only PyPI answers, as in a Docker build."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    for keep in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_CACHE_DIR"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    if os.environ.get("IMAGE_CHECK_INDEX_URL"):
        env["PIP_INDEX_URL"] = os.environ["IMAGE_CHECK_INDEX_URL"]
    return env


def run_pip(fake: FakeEnv, args: list[str]) -> subprocess.CompletedProcess:
    """This interpreter's pip run on ``fake``'s environment (``pip --python``), output captured."""
    cmd = [sys.executable, "-m", "pip", "--python", fake.python, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=pip_env(), timeout=PIP_TIMEOUT_S)


def resolve(fake: FakeEnv, pip_args: list[str], *, report: str, reqs: list[str], constraints: list[str],
            cache_dir: str) -> tuple[int, str, list[dict]]:
    """pip's dry run, or its answer to the same question within the cache's lifetime. The key holds everything
    the answer depends on here: the simulated environment, the arguments, the constraint files' and local
    projects' contents, pip's version; PyPI itself changes slowly, hence IMAGE_CHECK_CACHE_TTL_S (1 day;
    0 turns the cache off)."""
    import hashlib

    ttl = float(os.environ.get("IMAGE_CHECK_CACHE_TTL_S", "86400"))
    key_parts = [sys.version, subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                                             text=True).stdout, fake.python_version, *fake.freeze(),
                 *[a for a in pip_args if a != report and a not in constraints]]  # temp paths vary
    for c in constraints:
        with open(c) as f:
            key_parts.append(f.read())
    for req in reqs:
        project = os.path.join(re.sub(r"\[.*\]$", "", req), "pyproject.toml")
        if os.path.isabs(req) and os.path.exists(project):
            with open(project) as f:
                key_parts.append(f.read())
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()
    path = os.path.join(cache_dir, "resolve", key + ".json")
    if ttl > 0 and os.path.exists(path) and time.time() - os.path.getmtime(path) < ttl:
        with open(path) as f:
            cached = json.load(f)
        return cached["returncode"], cached["output"], cached["items"]
    proc = run_pip(fake, pip_args)
    items = []
    if proc.returncode == 0:
        with open(report) as f:
            items = json.load(f)["install"]
    if ttl > 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"returncode": proc.returncode, "output": proc.stdout + proc.stderr, "items": items}, f)
        os.replace(path + ".tmp", path)
    return proc.returncode, proc.stdout + proc.stderr, items


def pip_failure_summary(output: str) -> str:
    """The informative part of pip's error output: the conflict explanation, or its ERROR lines."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "conflict is caused by" in line or line.startswith("ERROR: Cannot install"):
            block = [l for l in lines[i:] if l.strip() and not l.startswith("To fix this") and not re.match(r"\d\. ", l)]
            return "\n".join(block)
    errors = [l for l in lines if l.startswith(("ERROR", "error:", "×", "╰─>"))]
    return "\n".join(errors[-8:] or lines[-8:])


# ---------------------------------------------------------------------------------------------- PyPI sdist metadata
def sdist_requires(name: str, version: str, cache_dir: str) -> tuple[list[str], str]:
    """Requires-Dist of ``name==version``'s sdist, from its PKG-INFO (PyPI simple API, PEP 691), cached."""
    import tarfile

    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, f"{canonical(name)}-{version}.PKG-INFO")
    if not os.path.exists(cached):
        index = os.environ.get("IMAGE_CHECK_INDEX_URL", "https://pypi.org/simple").rstrip("/")
        req = urllib.request.Request(f"{index}/{canonical(name)}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}.tar.gz"
        url = next((f["url"] for f in files if f["filename"].lower() == stem), None)
        if url is None:
            raise CheckError(f"{name}=={version}: no sdist {stem} on the index")
        with tempfile.TemporaryDirectory() as tmp:
            archive = os.path.join(tmp, stem)
            urllib.request.urlretrieve(url, archive)
            with tarfile.open(archive) as tar:
                member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
                text = tar.extractfile(member).read().decode()
        with open(cached + ".tmp", "w") as f:
            f.write(text)
        os.replace(cached + ".tmp", cached)
    with open(cached) as f:
        meta = Parser().parsestr(f.read())
    return list(meta.get_all("Requires-Dist") or []), meta.get("Requires-Python") or ""


# ---------------------------------------------------------------------------------------------- manifests from pip
def derive_manifest(requirement: str, *, python: str, image: str, header: str) -> str:
    """A manifest for an image that is ``pip install REQUIREMENT`` on CPython ``python`` (no constraint file):
    pip's resolution of it today, with every package's Requires-Dist (so ``pip check`` guards its pins)."""
    with tempfile.TemporaryDirectory(prefix="image-derive-") as tmp:
        fake = FakeEnv(os.path.join(tmp, "venv"), find_python(python))
        report = os.path.join(tmp, "report.json")
        proc = run_pip(fake, ["install", "--dry-run", "--report", report, requirement])
        if proc.returncode != 0:
            raise CheckError(f"{requirement} does not resolve on Python {python}:\n"
                             f"{pip_failure_summary(proc.stdout + proc.stderr)}")
        with open(report) as f:
            items = sorted(json.load(f)["install"], key=lambda it: canonical(it["metadata"]["name"]))
    out = [*(f"# {l}".rstrip() for l in header.splitlines()), f"image = {json.dumps(image)}",
           f"python = {json.dumps(python)}", "", "[packages]"]
    out += [f"{json.dumps(it['metadata']['name'])} = {json.dumps(it['metadata']['version'])}" for it in items]
    out += ["", "[requires]"]
    for it in items:  # pip check reads only the requirements outside extras
        needs = [r for r in it["metadata"].get("requires_dist", []) if not re.search(r"\bextra\s*==", r)]
        if needs:
            out.append(f"{json.dumps(it['metadata']['name'])} = {json.dumps(needs)}")
    return "\n".join(out) + "\n"
