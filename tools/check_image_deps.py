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

This file reads the Dockerfile (instructions, shell expansion, pip command lines), walks its steps and holds the
command line; the pip side (manifests, the fake environment, running pip, sdist metadata) is tools/image_pip_env.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shlex
import sys
import tempfile
import time

# tools/ is sys.path[0] when this file runs as a script; a loader that imports it by path needs it for image_pip_env,
# appended so that tools/' scripts never shadow installed packages of the same name (tools/evaluate.py).
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from image_pip_env import (  # noqa: E402
    BaseImage, CheckError, FakeEnv, canonical, derive_manifest, find_manifest, find_python, pip_failure_summary,
    resolve, run_pip, sdist_requires,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MANIFESTS = os.path.join(REPO, "docker", "base_images")


# ---------------------------------------------------------------------------------------------- Dockerfile
@dataclasses.dataclass
class Instruction:
    """One Dockerfile instruction: its first line number, upper-cased op and argument text."""

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


# ---------------------------------------------------------------------------------------------- the check
@dataclasses.dataclass
class StepResult:
    """What the check found for one pip step of a Dockerfile."""

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
        """Print ``msg`` when verbose."""
        if self.verbose:
            print(msg, flush=True)

    def run(self) -> list[StepResult]:
        """Check every pip step in order; a failing step ends the walk."""
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
        returncode, out, items = resolve(fake, pip_args, report=report, reqs=reqs, constraints=constraints,
                                         cache_dir=self.cache_dir)
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


def default_dockerfiles() -> list[str]:
    """The repository's Dockerfile and docker/*.Dockerfile."""
    found = [os.path.join(REPO, "Dockerfile")] if os.path.exists(os.path.join(REPO, "Dockerfile")) else []
    return found + sorted(glob.glob(os.path.join(REPO, "docker", "*.Dockerfile")))


def main(argv: list[str] | None = None) -> int:
    """The command line; exit status 1 when any Dockerfile fails."""
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
