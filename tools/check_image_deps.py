"""Check, without Docker and without a GPU, that every pip step of a Dockerfile resolves against the packages its
base image already holds, with pip's own resolver.

    python tools/check_image_deps.py                                   # Dockerfile and docker/*.Dockerfile
    python tools/check_image_deps.py docker/colocated.Dockerfile -v
    python tools/check_image_deps.py OLD.Dockerfile --build-arg SGLANG_VERSION=0.5.23

How: the ``FROM`` image is looked up in ``docker/base_images/*.toml`` (a manifest of the image's preinstalled
packages and versions, each with where it comes from, and whether the image pins them all with a pip constraint
file). A throwaway virtual environment of the image's Python minor version gets one metadata-only ``.dist-info``
per manifest package, so pip sees them as installed; then each ``pip install`` of the Dockerfile's ``RUN`` steps
runs as ``pip install --dry-run --report`` against that environment under the same constraints the build would
apply (the image's ``PIP_CONSTRAINT``, the step's own ``PIP_CONSTRAINT=`` / ``-c``, and constraint files the
Dockerfile writes with ``pip list --format=freeze [| grep ...] > FILE``). What a step would install is added to
the environment before the next step, and ``pip check`` runs after every step. A step that fails prints pip's
own explanation (``ResolutionImpossible`` and the conflicting requirements) under the step's line number.

A ``--no-build-isolation --no-deps`` source build whose metadata needs the image's real torch (Transformer
Engine's PyTorch extension) cannot run here; its requirements are read from the sdist's PKG-INFO on PyPI and
checked against the environment with ``pip check``.

pip's answer for a step is kept for a day in ~/.cache/fipo-image-check, keyed by everything it depends on here
(the simulated environment, the step's arguments, constraint files, the local project's pyproject.toml, pip's
version): IMAGE_CHECK_CACHE_TTL_S sets the lifetime, 0 always asks PyPI.

Needs PyPI and a CPython of each base image's minor version (``python3.12`` on PATH, a pyenv version, or
``IMAGE_CHECK_PYTHON_3_12=/path/to/python``). Exit status 1 when any step fails. Every requirement of a step
must be pinned, with ``==`` or by a constraint file the step applies: an unpinned one resolves to whatever the
index holds on the day of the build, so it has no single answer to check.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.parser import Parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MANIFESTS = os.path.join(REPO, "docker", "base_images")
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
    found = []
    for path in sorted(glob.glob(os.path.join(manifest_dir, "*.toml"))):
        manifest = load_manifest(path)
        if manifest.image == image:
            return manifest
        found.append(manifest.image)
    raise CheckError(f"no manifest in {manifest_dir} for base image {image!r} (manifests: {found})")


# ---------------------------------------------------------------------------------------------- Dockerfile
@dataclasses.dataclass
class Instruction:
    line: int
    op: str
    arg: str


def read_instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comment lines dropped."""
    out: list[Instruction] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i + 1, lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line]
        while parts[-1].rstrip().endswith("\\") and i < len(lines):
            parts[-1] = parts[-1].rstrip()[:-1]
            while i < len(lines) and lines[i].lstrip().startswith("#"):
                i += 1  # a comment inside a continued instruction is dropped, the continuation goes on
            if i < len(lines):
                parts.append(lines[i])
                i += 1
        joined = " ".join(p.strip() for p in parts)
        op, _, arg = joined.partition(" ")
        out.append(Instruction(start, op.upper(), arg.strip()))
    return out


def _expand_unquoted(text: str, env: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < len(text) and depth:  # the matching brace: words may hold ${...} themselves
                depth += {"{": 1, "}": -1}.get(text[j], 0) if text[j - 1] != "\\" else 0
                j += 1
            body = text[i + 2:j - 1]
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+])(.*))?", body, re.S)
            if m is None:
                raise CheckError(f"unsupported parameter expansion ${{{body}}}")
            value = env.get(m.group(1), "")
            if m.group(2) is None:
                out.append(value)
            elif m.group(2) in (":-", "-"):
                out.append(value if value else _expand_unquoted(m.group(3), env))
            else:
                out.append(_expand_unquoted(m.group(3), env) if value else "")
            i = j
            continue
        m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:])
        if m:
            out.append(env.get(m.group(1), ""))
            i += m.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def expand(text: str, env: dict[str, str]) -> str:
    """Shell parameter expansion of ``$V``, ``${V}``, ``${V:-w}``, ``${V:+w}`` (nested) outside single quotes."""
    out, quoted = [], False
    for piece in re.split(r"(')", text):
        if piece == "'":
            quoted = not quoted
            out.append(piece)
        else:
            out.append(piece if quoted else _expand_unquoted(piece, env))
    return "".join(out)


def split_commands(run: str) -> list[list[list[str]]]:
    """A RUN line -> commands (split on ``&&``, ``||``, ``;``), each a pipeline of argv lists (split on ``|``);
    redirections stay in the argv as ``>`` followed by the target."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|>")
    lexer.whitespace_split = True
    commands: list[list[list[str]]] = [[[]]]
    for token in lexer:
        if token in ("&&", "||", ";", "&"):
            commands.append([[]])
        elif token == "|":
            commands[-1].append([])
        else:
            commands[-1][-1].append(token)
    return [[argv for argv in cmd if argv] for cmd in commands if any(cmd)]


_PIP = re.compile(r"^(pip3?|python3?(\.\d+)?\s+-m\s+pip)$")


def pip_argv(argv: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """``[VAR=v ...] pip|pip3|python[3] -m pip ARGS`` -> (env prefix, ARGS), else None."""
    env: dict[str, str] = {}
    i = 0
    while i < len(argv) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[i]):
        key, _, value = argv[i].partition("=")
        env[key] = value
        i += 1
    rest = argv[i:]
    if rest and re.fullmatch(r"pip3?", os.path.basename(rest[0])):
        return env, rest[1:]
    if len(rest) >= 3 and re.fullmatch(r"python3?(\.\d+)?", os.path.basename(rest[0])) and rest[1:3] == ["-m", "pip"]:
        return env, rest[3:]
    return None


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
        old = self.dists.pop(canonical(name), None)
        if old is not None:
            shutil.rmtree(os.path.join(self.site, _dist_dir_name(*old)))

    def freeze(self) -> list[str]:
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
    cmd = [sys.executable, "-m", "pip", "--python", fake.python, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=pip_env(), timeout=PIP_TIMEOUT_S)


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


# ---------------------------------------------------------------------------------------------- the check
@dataclasses.dataclass
class StepResult:
    line: int
    command: str
    ok: bool
    detail: str
    seconds: float
    installs: list[str] = dataclasses.field(default_factory=list)  # name==version this step would install


class DockerfileCheck:
    """Walks one Dockerfile's instructions, simulating its pip steps on a fake environment of the base image."""

    def __init__(self, dockerfile: str, *, build_args: dict[str, str], manifest_dir: str, workdir: str,
                 context: str, verbose: bool = False):
        self.dockerfile = dockerfile
        self.build_args = build_args
        self.manifest_dir = manifest_dir
        self.tmp = workdir
        self.context = context
        self.verbose = verbose
        self.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "fipo-image-check")
        self.results: list[StepResult] = []
        self.files: dict[str, str] = {}        # container path -> host file (constraint files we can model)
        self.project_dirs: dict[str, str] = {}  # container dir -> context dir holding a pyproject.toml

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def run(self) -> list[StepResult]:
        with open(self.dockerfile) as f:
            instructions = read_instructions(f.read())
        args: dict[str, str] = {}
        env: dict[str, str] = {}
        fake: FakeEnv | None = None
        workdir = "/"
        for ins in instructions:
            scope = {**args, **env}
            if ins.op == "ARG":
                name, eq, default = ins.arg.partition("=")
                default = default.strip().strip('"').strip("'")
                args[name.strip()] = self.build_args.get(name.strip(), expand(default, scope) if eq else "")
            elif ins.op == "FROM":
                if fake is not None:
                    raise CheckError(f"{self.dockerfile}:{ins.line}: multi-stage builds are not supported")
                image = expand(ins.arg.split()[0], scope)
                manifest = find_manifest(image, self.manifest_dir)
                fake = self._base_env(manifest)
                env = {}
                if manifest.constraint_env and manifest.constraint_file:
                    env["PIP_CONSTRAINT"] = manifest.constraint_file
                self.log(f"{ins.line}: FROM {image}: {len(manifest.packages)} packages from "
                         f"{os.path.relpath(manifest.path, REPO)}, Python {manifest.python}")
            elif ins.op == "ENV":
                for key, value in _parse_env(ins.arg).items():
                    env[key] = expand(value, scope)
            elif ins.op == "WORKDIR":
                workdir = os.path.normpath(os.path.join(workdir, expand(ins.arg, scope)))
            elif ins.op in ("COPY", "ADD"):
                self._copy(expand(ins.arg, scope), workdir)
            elif ins.op == "RUN":
                if fake is None:
                    raise CheckError(f"{self.dockerfile}:{ins.line}: RUN before FROM")
                self._run(ins, expand(ins.arg, scope), {**scope, **env}, fake, workdir)
        if fake is None:
            raise CheckError(f"{self.dockerfile}: no FROM")
        return self.results

    def _base_env(self, manifest: BaseImage) -> FakeEnv:
        fake = FakeEnv(os.path.join(self.tmp, "venv"), find_python(manifest.python))
        for name, version in manifest.packages.items():
            fake.add(name, version, requires=manifest.requires.get(name, []))
        if manifest.constraint_file:
            host = os.path.join(self.tmp, "image-constraints.txt")
            with open(host, "w") as f:
                f.write("\n".join(f"{n}=={v}" for n, v in manifest.packages.items()) + "\n")
            self.files[manifest.constraint_file] = host
        return fake

    def _copy(self, arg: str, workdir: str) -> None:
        parts = [p for p in shlex.split(arg) if not p.startswith("--")]
        if len(parts) < 2:
            return
        *srcs, dest = parts
        dest_dir = os.path.normpath(os.path.join(workdir, dest))
        for src in srcs:
            if os.path.basename(src.rstrip("*")) == "pyproject.toml":
                self.project_dirs[dest_dir] = os.path.normpath(os.path.join(self.context, os.path.dirname(src)))

    def _run(self, ins: Instruction, run: str, env: dict[str, str], fake: FakeEnv, workdir: str) -> None:
        for pipeline in split_commands(run):
            first = pip_argv(pipeline[0])
            text = " | ".join(" ".join(a) for a in pipeline)
            if first is None:
                if any(re.fullmatch(r"uv|pipx|conda|mamba", os.path.basename(a[0])) and "install" in a
                       for a in pipeline):
                    raise CheckError(f"{self.dockerfile}:{ins.line}: cannot check {text!r}: only pip installs are "
                                     "understood")
                continue
            prefix, args = first
            if args and args[0] in ("list", "freeze"):
                self._freeze(ins, pipeline, args, fake, workdir)
            elif args and args[0] == "uninstall":
                for name in args[1:]:
                    if not name.startswith("-"):
                        fake.remove(name)
            elif args and args[0] == "install":
                if len(pipeline) > 1:
                    raise CheckError(f"{self.dockerfile}:{ins.line}: a pip install inside a pipeline: {text!r}")
                self._install(ins, text, args[1:], {**env, **prefix}, fake, workdir)

    def _freeze(self, ins: Instruction, pipeline: list[list[str]], args: list[str], fake: FakeEnv, workdir: str):
        """``pip list --format=freeze | grep ... > FILE`` / ``pip freeze > FILE``: a constraint file of what is
        installed at this point, filtered by grep as the shell would."""
        lines = fake.freeze()
        target = None
        for k, argv in enumerate(pipeline):
            if ">" in argv:
                idx = argv.index(">")
                target, argv = argv[idx + 1], argv[:idx]
            if k == 0:
                if args[0] == "list" and "--format=freeze" not in argv:
                    raise CheckError(f"{self.dockerfile}:{ins.line}: pip list without --format=freeze")
                continue
            if os.path.basename(argv[0]) != "grep":
                raise CheckError(f"{self.dockerfile}:{ins.line}: cannot model {' '.join(argv)!r} in a pipeline")
            flags = "".join(a[1:] for a in argv[1:] if a.startswith("-"))
            patterns = [a for a in argv[1:] if not a.startswith("-")]
            if len(patterns) != 1 or set(flags) - set("iEv"):
                raise CheckError(f"{self.dockerfile}:{ins.line}: unsupported grep {' '.join(argv)!r}")
            rx = re.compile(patterns[0], re.IGNORECASE if "i" in flags else 0)
            lines = [l for l in lines if bool(rx.search(l)) != ("v" in flags)]
        if target is None:
            return
        path = os.path.normpath(os.path.join(workdir, target))
        host = os.path.join(self.tmp, f"constraints-{len(self.files)}.txt")
        with open(host, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.files[path] = host
        self.log(f"{ins.line}: {path} pins {len(lines)} packages as installed here")

    def _host_file(self, ins: Instruction, path: str, workdir: str) -> str:
        path = os.path.normpath(os.path.join(workdir, path))
        if path not in self.files:
            raise CheckError(f"{self.dockerfile}:{ins.line}: constraint file {path} is not the image's own nor written "
                             "by an earlier 'pip list --format=freeze ... > FILE' step")
        return self.files[path]

    def _install(self, ins: Instruction, text: str, args: list[str], env: dict[str, str], fake: FakeEnv,
                 workdir: str) -> None:
        t0 = time.perf_counter()
        options, reqs, constraints = [], [], []
        for value in filter(None, env.get("PIP_CONSTRAINT", "").split()):
            constraints.append(self._host_file(ins, value, workdir))
        no_deps = no_isolation = False
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-c", "--constraint"):
                constraints.append(self._host_file(ins, args[i + 1], workdir))
                i += 2
                continue
            if a.startswith("--constraint="):
                constraints.append(self._host_file(ins, a.split("=", 1)[1], workdir))
            elif a in ("-e", "--editable"):
                reqs.append(self._local(ins, args[i + 1], workdir))
                i += 2
                continue
            elif a in ("-r", "--requirement", "-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
                raise CheckError(f"{self.dockerfile}:{ins.line}: {a} is not supported by the check (PyPI only)")
            elif a == "--no-deps":
                no_deps = True
                options.append(a)
            elif a == "--no-build-isolation":
                no_isolation = True
                options.append(a)
            elif a in ("--pre", "-U", "--upgrade", "--upgrade-strategy=eager", "--upgrade-strategy=only-if-needed"):
                options.append(a)
            elif a in ("-q", "--quiet", "-v", "--no-cache-dir", "--break-system-packages", "--root-user-action=ignore",
                       "--no-compile", "--progress-bar=off", "--force-reinstall"):
                pass
            elif a.startswith("-"):
                raise CheckError(f"{self.dockerfile}:{ins.line}: pip option {a} is not understood by the check")
            elif a.startswith((".", "/")):
                reqs.append(self._local(ins, a, workdir))
            else:
                reqs.append(a)
            i += 1
        pinned: set[str] = set()
        for c in constraints:
            with open(c) as f:
                pinned |= {canonical(re.split(r"[=<>!~;\s\[]", l.strip(), maxsplit=1)[0]) for l in f if "==" in l}
        for req in reqs:
            name = re.split(r"[=<>!~;\s\[]", req, maxsplit=1)[0]
            if not os.path.isabs(req) and "==" not in req and canonical(name) not in pinned:
                self._fail(ins, text, f"{req!r} is not pinned (== here or in a constraint file): it resolves to "
                                      "whatever the index holds on the day of the build", t0)
        report = os.path.join(self.tmp, "report.json")
        pip_args = ["install", "--dry-run", "--report", report,
                    *options, *[x for c in constraints for x in ("-c", c)], *reqs]
        self.log(f"{ins.line}: pip {' '.join(pip_args[:1] + args)}")
        returncode, out, items = self._resolve(fake, pip_args, report, reqs, constraints)
        if returncode != 0:
            if no_deps and no_isolation and "metadata-generation-failed" in out:
                self._source_build(ins, text, reqs, fake, t0)
                return
            self._fail(ins, text, pip_failure_summary(out), t0)
            return
        for item in items:
            meta = item["metadata"]
            fake.add(meta["name"], meta["version"], requires=meta.get("requires_dist", []),
                     provides_extra=meta.get("provides_extra", []), requires_python=meta.get("requires_python"))
        requested = ", ".join(f"{it['metadata']['name']}=={it['metadata']['version']}" for it in items if it.get("requested"))
        installs = [f"{it['metadata']['name']}=={it['metadata']['version']}" for it in items]
        self._after(ins, text, f"resolves; installs {len(items)} packages ({requested})", fake, t0, installs)

    def _resolve(self, fake: FakeEnv, pip_args: list[str], report: str, reqs: list[str], constraints: list[str]):
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
        path = os.path.join(self.cache_dir, "resolve", key + ".json")
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

    def _source_build(self, ins: Instruction, text: str, reqs: list[str], fake: FakeEnv, t0: float) -> None:
        built = []
        for req in reqs:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^;\s]+)", req)
            if m is None:
                self._fail(ins, text, f"source build of {req!r}: pin it (name==version) so its sdist can be read", t0)
                return
            requires, requires_python = sdist_requires(m.group(1), m.group(2), self.cache_dir)
            fake.add(m.group(1), m.group(2), requires=requires, requires_python=requires_python or None)
            built.append(f"{m.group(1)}=={m.group(2)}")
        self._after(ins, text, f"source build against the image's torch ({', '.join(built)}: metadata needs torch "
                               "importable); its sdist's Requires-Dist are met", fake, t0, built)

    def _after(self, ins: Instruction, text: str, detail: str, fake: FakeEnv, t0: float,
               installs: list[str] | None = None) -> None:
        check = run_pip(fake, ["check"])
        if check.returncode != 0:
            problems = "\n".join(l for l in check.stdout.splitlines() if l.strip())
            self._fail(ins, text, f"pip check after this step:\n{problems}", t0)
            return
        self.results.append(StepResult(ins.line, text, True, detail, time.perf_counter() - t0, installs or []))
        self.log(f"{ins.line}: OK ({time.perf_counter() - t0:.1f} s) {detail}")

    def _fail(self, ins: Instruction, text: str, detail: str, t0: float) -> None:
        self.results.append(StepResult(ins.line, text, False, detail, time.perf_counter() - t0))
        raise _StepFailed()

    def _local(self, ins: Instruction, path: str, workdir: str) -> str:
        m = re.fullmatch(r"(?P<path>[^\[]+)(?P<extras>\[.*\])?", path)
        container = os.path.normpath(os.path.join(workdir, m.group("path")))
        if container not in self.project_dirs:
            raise CheckError(f"{self.dockerfile}:{ins.line}: {path} is not a directory the Dockerfile copied a "
                             "pyproject.toml into")
        return self.project_dirs[container] + (m.group("extras") or "")


class _StepFailed(Exception):
    pass


def _parse_env(arg: str) -> dict[str, str]:
    parts = shlex.split(arg)
    if parts and "=" not in parts[0]:  # legacy "ENV KEY value"
        return {parts[0]: " ".join(parts[1:])}
    return dict(p.split("=", 1) for p in parts)


def check_dockerfile(dockerfile: str, *, build_args: dict[str, str] | None = None, manifest_dir: str = DEFAULT_MANIFESTS,
                     context: str = REPO, verbose: bool = False) -> tuple[bool, list[StepResult]]:
    """Check one Dockerfile; returns (every step resolved, the steps checked up to the first failure)."""
    with tempfile.TemporaryDirectory(prefix="image-check-") as tmp:
        check = DockerfileCheck(dockerfile, build_args=build_args or {}, manifest_dir=manifest_dir, workdir=tmp,
                                context=context, verbose=verbose)
        try:
            results = check.run()
        except _StepFailed:
            return False, check.results
        return all(r.ok for r in results), results


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


def default_dockerfiles() -> list[str]:
    found = [os.path.join(REPO, "Dockerfile")] if os.path.exists(os.path.join(REPO, "Dockerfile")) else []
    return found + sorted(glob.glob(os.path.join(REPO, "docker", "*.Dockerfile")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dockerfiles", nargs="*", help="default: Dockerfile and docker/*.Dockerfile")
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--manifests", default=DEFAULT_MANIFESTS, help="folder of base-image manifests (*.toml)")
    parser.add_argument("--context", default=REPO, help="the docker build context (for COPY'd projects)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--derive", metavar="REQUIREMENT",
                        help="print a manifest for an image that is 'pip install REQUIREMENT' (needs --image, --python)")
    parser.add_argument("--image", help="with --derive: the image reference the manifest describes")
    parser.add_argument("--python", help="with --derive: the image's Python minor version, e.g. 3.12")
    parser.add_argument("--header", default="", help="with --derive: comment lines (provenance) for the manifest")
    opts = parser.parse_args(argv)
    if opts.derive:
        if not (opts.image and opts.python):
            parser.error("--derive needs --image and --python")
        sys.stdout.write(derive_manifest(opts.derive, python=opts.python, image=opts.image, header=opts.header))
        return 0
    build_args = dict(a.split("=", 1) for a in opts.build_arg)
    failed = 0
    for dockerfile in opts.dockerfiles or default_dockerfiles():
        t0 = time.perf_counter()
        name = os.path.relpath(dockerfile)
        try:
            ok, results = check_dockerfile(dockerfile, build_args=build_args, manifest_dir=opts.manifests,
                                           context=opts.context, verbose=opts.verbose)
        except CheckError as e:
            print(f"FAIL {name}: {e}")
            failed += 1
            continue
        for r in results:
            print(f"  {'ok  ' if r.ok else 'FAIL'} line {r.line} ({r.seconds:.1f} s): {r.command}")
            if not r.ok or opts.verbose:
                print("\n".join("        " + l for l in r.detail.splitlines()))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {sum(r.ok for r in results)} pip steps resolve"
              f"{'' if ok else ', then a step fails'} ({time.perf_counter() - t0:.1f} s)")
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
