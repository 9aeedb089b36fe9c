"""Every fenced code block of README.md and docs/*.md runs as written on a fresh checkout, offline.

What happens to each block:

- ```bash: every command (a line, with its ``\\`` continuations; a ``&&`` chain runs in order) matches one
  rule of ``RULES``: it is run as written in a fresh folder that holds the inputs it names (made by the
  test: ``models/clip-b32`` is a tiny CLIP, ``models/minilm`` the real all-MiniLM-L6-v2, ``texts.parquet``,
  ``photos/``, ``cat.jpg`` ...), or run in the modified form its rule states (``--port 0`` instead of a
  fixed port, a local checkpoint where a hub id is named, a local server where a remote host is named), or
  it is listed with the reason it cannot run here. A comment that holds a command (``# or: cp -rL ...``)
  counts as a command; other comments are prose. Every ``arrowengine`` command, run or not, must parse
  with the command's own parser.
- ```python: each block matches one rule of ``SNIPPETS``: run with ``exec`` (against a server the test
  starts from the docs' own ``arrowengine serve`` command where it needs one), or listed with the reason.
- ```json: the protocol's command document; it must parse as one.
- unlabelled blocks are diagrams or file listings, listed in ``PLAIN``.

A block, command or comment that no rule covers fails ``test_every_block_is_run_or_listed``, and so does a
rule that no longer matches anything. ``arrowengine`` commands other than ``serve`` run in this process
through the entry point pyproject.toml's [project.scripts] gives the ``arrowengine`` script (the function the
script calls, without an interpreter start per command); ``serve`` runs the installed ``arrowengine`` script.

A snippet that is known to fail as written goes in ``KNOWN_FAILURES`` (doc, first line) with the report
that says what is wrong: it is then expected to fail (strict xfail), so its fix shows up as an XPASS.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager, redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flight_fakes import make_self_signed_cert

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PHOTOS = Path(__file__).parent / "data" / "photos"
DOC_PORT = "8815"  # the port the docs use; a test server binds any free port instead
DOC_HTTP_PORT = "8080"  # the port the docs give --http-port
SERVER_START_S = 180  # bound for a served model to be ready (a few seconds here; generous on a loaded machine)


# ---- the docs' blocks and commands --------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    doc: str    # path relative to the repository
    line: int   # of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")


@dataclass(frozen=True)
class Part:
    """One command of a line (a ``&&`` chain has several)."""
    text: str                 # as written, continuations joined, comment cut
    argv: tuple[str, ...]

    @property
    def normalized(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True)
class Line:
    block: Block
    line: int
    parts: tuple[Part, ...]
    commented: bool           # written as a comment: "# or: cp -rL ... && arrowengine convert ..."

    @property
    def where(self) -> str:
        return f"{self.block.doc}:{self.line}"

    @property
    def key(self) -> str:
        return " && ".join(p.normalized for p in self.parts)


def doc_blocks() -> list[Block]:
    blocks = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        start = lang = None
        for number, line in enumerate(lines, 1):
            fence = re.match(r"^\s*```(\S*)\s*$", line)
            if not fence:
                continue
            if start is None:
                start, lang = number, fence.group(1)
            else:
                blocks.append(Block(str(path.relative_to(ROOT)), start, lang, "\n".join(lines[start:number - 1])))
                start = None
        assert start is None, f"{path.name}:{start}: a code fence that is never closed"
    return blocks


# A comment holds a command when, after an optional "label:" (such as "or:"), it starts with one of these.
COMMAND_WORDS = r"(?:arrowengine|python3?|pip|cp|rsync|git|curl|wget|docker|bash|sh|flight_client/\S+)"
COMMENTED_COMMAND = re.compile(rf"^#\s*(?:[^:`]{{1,60}}:\s+)?(?P<cmd>{COMMAND_WORDS}\s.*)$")


def bash_lines(block: Block) -> list[Line]:
    out: list[Line] = []
    raw = block.text.splitlines()
    i = 0
    while i < len(raw):
        number, text = block.line + 1 + i, raw[i].rstrip()
        while text.endswith("\\") and i + 1 < len(raw):
            i += 1
            text = text[:-1] + " " + raw[i].strip()
        i += 1
        stripped = text.strip()
        if not stripped:
            continue
        commented = stripped.startswith("#")
        if commented:
            match = COMMENTED_COMMAND.match(stripped)
            if not match:
                continue  # prose
            stripped = match.group("cmd")
        parts = []
        for piece in stripped.split(" && "):
            argv = tuple(shlex.split(piece, comments=True))
            if argv:
                parts.append(Part(piece.split("  #")[0].strip(), argv))
        out.append(Line(block, number, tuple(parts), commented))
    return out


BLOCKS = doc_blocks()
LINES = [line for block in BLOCKS if block.lang in ("bash", "sh", "shell", "console") for line in bash_lines(block)]


def distinct(lines: list[Line]) -> list[Line]:
    """Each command line once (README repeats some of docs/), in doc order."""
    seen: dict[str, Line] = {}
    for line in lines:
        seen.setdefault(line.key, line)
    return list(seen.values())


# ---- what is run, and what is listed -------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    pattern: str              # re.search on the command's normalized text
    run: str | None = None    # the runner's name; None: listed
    reason: str = ""          # for a listed command: why it cannot run here; else the modification, if any
    matched: list = field(default_factory=list, compare=False, hash=False)


RULES = [
    Rule(r"^pip install ", "pip",
         "modified: resolved against the environment the tests run in instead of PyPI (no network): every "
         "extra named exists in pyproject.toml and every other package named is installed at a version the "
         "line allows"),
    Rule(r"^python -m pytest\b", None, "the test suite itself, of which this test is a part"),
    Rule(r"^arrowengine serve .*\[--", "synopsis",
         "a synopsis ([optional] flags), not a command: every flag it names must be in `arrowengine serve --help`"),
    Rule(r"^arrowengine serve .*--device cuda", None,
         "needs a CUDA device (fp16 is CUDA-only); its arguments are parsed by the CLI's parser"),
    Rule(r"^arrowengine serve\b", "serve",
         "modified: --port 0 (any free port) instead of the fixed port, and --http-port 0 where one is given; run "
         "until ready, checked with a client (and over HTTP), then stopped with SIGTERM; with no --model, the model "
         "cache is a temporary folder (ARROWENGINE_CACHE)"),
    Rule(r"^curl .*127\.0\.0\.1:8080/rerank", "curl_rerank",
         "modified: against an HTTP API the test serves in process with a tiny reranker (built by the test) under "
         "the model name the docs give, no reranker's weights being at hand offline"),
    Rule(r"^curl .*127\.0\.0\.1:8080/", "curl",
         "modified: the HTTP port of the server the test starts from the docs' `arrowengine serve --http-port 8080`"),
    Rule(r"^arrowengine convert\b", "convert",
         "a hub id (openai/clip-vit-base-patch32, sentence-transformers/all-mpnet-base-v2) is replaced by a local "
         "checkpoint of the same kind (a tiny CLIP, the real all-MiniLM-L6-v2): no hub here; <revision> is the "
         "revision of a hub cache folder the test lays out"),
    Rule(r"^arrowengine inspect\b", "inspect"),
    Rule(r"^arrowengine embed\b", "embed",
         "a --server at the docs' port (grpc://h1:8815, grpc://127.0.0.1:8815) is replaced by a local server "
         "serving the named model on a free port; --resume runs after the same command without it"),
    Rule(r"^python -c .*snapshot_download", None, "downloads from the HuggingFace hub"),
    Rule(r"^rsync -a hubhost:", None,
         "copies from another machine (hubhost); the commands after it run on a hub cache folder the test lays "
         "out as rsync would copy it"),
    Rule(r"^cp -rL \S*/snapshots/<revision> ", "cp_snapshot",
         "`.../snapshots/<revision>` is a snapshot folder of a hub cache the test lays out (files linked into "
         "its repo folder's blobs/, as the hub writes them)"),
    Rule(r"^python flight_client/cpp/build\.py$", "cpp_build",
         "modified: with --out DIR (a temporary folder, not the checkout's flight_client/cpp/build/); the build is "
         "shared with test_cpp_client.py"),
    Rule(r"^flight_client/cpp/build/arrowengine_client ", "cpp_client",
         "modified: the binary built above, against the docs' own `arrowengine serve` on its free port"),
]


@dataclass(frozen=True)
class Snippet:
    pattern: str              # re.search (multiline) on the block's text
    run: str | None = None
    reason: str = ""
    matched: list = field(default_factory=list, compare=False, hash=False)


SNIPPETS = [
    Snippet(r"^import ray\b", None,
            "needs a running Ray cluster (ray.init(address='auto')) and S3 buckets; flight_client.ray.embed_dataset "
            "itself runs on a local Ray in tests/test_ray.py"),
    Snippet(r"pyarrow\.flight as fl", "plain_pyarrow",
            "modified: the port of the server the test starts from the docs' `arrowengine serve`"),
    Snippet(r"^import engine\b", "engine",
            "in a folder where models/clip-b32 is a tiny CLIP and cat.jpg a photo; `arrow_binary_array`, a "
            "placeholder in the snippet, is a pyarrow binary array of that photo and a broken image"),
    Snippet(r"^client = EmbeddingClient\(\"grpc://127\.0\.0\.1:8815\"\)$", "client",
            "modified: the port of the server the test starts from the docs' `arrowengine serve`"),
    Snippet(r"^import lance\b", "lance_search",
            "modified: the port of a local server serving the tiny CLIP as `clip`, in a folder where the docs' "
            "`arrowengine embed` command that writes the dataset the snippet opens ran first, against that server"),
    Snippet(r"^from openai import OpenAI", "openai",
            "modified: the HTTP port of the server the test starts from the docs' `arrowengine serve --http-port 8080`"),
    Snippet(r"^from engine import load_model\b", "reranker",
            "in a folder where models/ms-marco-minilm is a tiny BERT cross-encoder (tests/checkpoints.py)"),
    Snippet(r"^scores = client\.rerank\(", "reranker_client",
            "after the reranker snippet above (its `docs`), with `client` an EmbeddingClient of a server the test "
            "starts on a free port, serving that tiny cross-encoder as ms-marco"),
]

# Unlabelled blocks: (doc, first line) -> what they are.
PLAIN = {
    ("docs/architecture.md", "client (pyarrow.flight, C++, any Flight language)"): "a diagram of the layers",
    ("docs/weight-format.md", ("manifest.json        format, format_version, kind (clip | sentence-transformer | "
                               "store), architecture,")): "a listing of a model folder's files",
}

# (doc, first line of the block or the command as written) -> the report that says what fails and the fix.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}

# Where the docs name a model folder or a checkpoint, what the test puts there.
MODEL_FOLDERS = {"models/clip-b32": "clip", "models/minilm": "minilm",   # converted folders
                 "models/ms-marco-minilm": "reranker"}
SERVED_NAMES = {"minilm": "minilm", "clip": "clip", "all-MiniLM-L6-v2": "minilm"}  # --model NAME with --server
HUB_IDS = {"openai/clip-vit-base-patch32": "clip", "sentence-transformers/all-mpnet-base-v2": "minilm"}
LOCAL_CHECKPOINTS = {"./my-clip": "clip"}                                  # HF folders the docs convert
HUB_REPO = "models--openai--clip-vit-base-patch32"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def rule_for(part: Part) -> Rule:
    found = [rule for rule in RULES if re.search(rule.pattern, part.normalized)]
    assert found, f"no rule runs or lists the command {part.text!r}: add one to RULES in {Path(__file__).name}"
    return found[0]


def runner_of(part: Part) -> str | None:
    """The runner of a command, or None where it is listed or no rule covers it (the coverage test says so)."""
    found = [rule for rule in RULES if re.search(rule.pattern, part.normalized)]
    return found[0].run if found else None


def snippet_rule(block: Block) -> Snippet:
    found = [s for s in SNIPPETS if re.search(s.pattern, block.text, re.MULTILINE)]
    assert len(found) == 1, (f"{block.where}: {len(found)} rules of SNIPPETS match this python block (first line "
                             f"{block.first_line!r}); exactly one must run or list it")
    return found[0]


def known_failure(doc: str, first: str) -> str | None:
    return KNOWN_FAILURES.get((doc, first))


def xfail_if_known(request, doc: str, first: str) -> None:
    reason = known_failure(doc, first)
    if reason:
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


# ---- the coverage check (no command runs here) ----------------------------------------------------------------

def test_every_block_is_run_or_listed():
    problems = []
    for rule in RULES + SNIPPETS:
        rule.matched.clear()
    for block in BLOCKS:
        if block.lang in ("bash", "sh", "shell", "console"):
            continue
        if block.lang == "python":
            try:
                snippet_rule(block).matched.append(block.where)
            except AssertionError as exc:
                problems.append(str(exc))
        elif block.lang == "json":
            pass  # test_json_blocks_are_protocol_commands
        elif block.lang in ("", "text"):
            if (block.doc, block.first_line) not in PLAIN:
                problems.append(f"{block.where}: an unlabelled block that PLAIN does not list (first line "
                                f"{block.first_line!r}); label it (```bash, ```python, ```text) or list it")
        else:
            problems.append(f"{block.where}: a ```{block.lang} block: this test runs bash, python and json blocks "
                            "and lists unlabelled ones; teach it this language")
    for line in LINES:
        for part in line.parts:
            try:
                rule_for(part).matched.append(line.where)
            except AssertionError as exc:
                problems.append(f"{line.where}: {exc}")
    for rule in RULES + SNIPPETS:
        if not rule.matched:
            problems.append(f"the rule {rule.pattern!r} matches nothing in the docs any more: remove it")
    for doc, first in KNOWN_FAILURES:
        if not any(b.doc == doc and b.first_line == first for b in BLOCKS) and \
                not any(ln.block.doc == doc and any(p.text == first for p in ln.parts) for ln in LINES):
            problems.append(f"KNOWN_FAILURES names {doc}: {first!r}, which is no longer in the docs")
    assert not problems, "\n".join(problems)


def test_every_arrowengine_command_parses():
    """Run or not (a CUDA server, a synopsis aside), each arrowengine command's flags exist and parse."""
    parser = entry_point_module().build_parser()
    for line in distinct(LINES):
        for part in line.parts:
            if part.argv[0] != "arrowengine" or rule_for(part).run == "synopsis":
                continue
            try:
                parser.parse_args(list(part.argv[1:]))
            except SystemExit as exc:
                pytest.fail(f"{line.where}: `{part.text}` does not parse (exit {exc.code})")


def test_serve_synopsis_names_only_real_flags(capsys):
    synopses = [part for line in LINES for part in line.parts if rule_for(part).run == "synopsis"]
    assert synopses
    with pytest.raises(SystemExit):
        entry_point_main()(["serve", "--help"])
    help_text = capsys.readouterr().out
    for part in synopses:
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", part.text))
        missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text))
        assert not missing, f"the serve synopsis names flags that `arrowengine serve --help` lacks: {missing}"


def test_json_blocks_are_protocol_commands():
    from flight_server import protocol

    blocks = [b for b in BLOCKS if b.lang == "json"]
    assert blocks
    for block in blocks:
        command = protocol.parse_command(block.text.encode())
        assert command.input in protocol.INPUT_KINDS, block.where


def test_pip_lines_name_what_is_installed():
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    extras = set(pyproject()["project"]["optional-dependencies"])
    lines = [(line, part) for line in distinct(LINES) for part in line.parts if rule_for(part).run == "pip"]
    assert lines
    for line, part in lines:
        args = list(part.argv[2:])
        while args:
            arg = args.pop(0)
            if arg == "-e":
                target = args.pop(0)
                match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
                assert match, f"{line.where}: -e {target}: expected . or .[extra,...]"
                unknown = set(filter(None, (match.group(1) or "").split(","))) - extras
                assert not unknown, f"{line.where}: `{part.text}` names extras pyproject.toml lacks: {unknown}"
            elif arg.startswith("-"):
                pytest.fail(f"{line.where}: `{part.text}`: the test does not know pip's {arg}")
            else:
                req = Requirement(arg)
                try:
                    installed = version(req.name)
                except PackageNotFoundError:
                    pytest.fail(f"{line.where}: `{part.text}` installs {req.name}, which the tests' environment "
                                "lacks")
                assert req.specifier.contains(installed, prereleases=True), \
                    f"{line.where}: `{part.text}` asks for {req}; the tests run with {installed}"


# ---- helpers: what a fresh folder holds, the CLI, servers ----------------------------------------------------

def pyproject() -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # 3.10: pip's own copy of the same parser
        try:
            import tomli as tomllib
        except ImportError:
            from pip._vendor import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def entry_point() -> str:
    """``module:function`` of the ``arrowengine`` script, as pyproject.toml's [project.scripts] declares it."""
    return pyproject()["project"]["scripts"]["arrowengine"]


def entry_point_module():
    return importlib.import_module(entry_point().partition(":")[0])


def entry_point_main():
    module, _, func = entry_point().partition(":")
    return getattr(importlib.import_module(module), func)


def arrowengine_script() -> str:
    script = Path(sys.executable).parent / "arrowengine"
    found = str(script) if script.exists() else shutil.which("arrowengine")
    assert found, "no `arrowengine` script beside this Python nor on PATH: pip install -e . first"
    return found


def link_tree(source: Path, dest: Path) -> Path:
    """A copy of ``source`` at ``dest`` whose files are hard links where the file system allows."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(source, dest, copy_function=link)
    return dest


@dataclass
class Materials:
    """The test's stand-ins for what the docs name."""
    converted: dict[str, Path]     # "clip" | "minilm" | "reranker" -> converted model folder
    checkpoints: dict[str, Path]   # "clip" | "minilm" -> HF checkpoint folder
    cache: Path                    # ARROWENGINE_CACHE of the docs' default server and in-process embeds

    def model_folder(self, rel: str, workdir: Path) -> Path:
        kind = MODEL_FOLDERS.get(rel.rstrip("/"))
        assert kind, f"the docs name a model folder {rel!r} that the test cannot make: add it to MODEL_FOLDERS"
        dest = workdir / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_tree(self.converted[kind], dest)
        return dest

    def hub_cache_repo(self, parent: Path) -> Path:
        """``models--openai--clip-vit-base-patch32`` as the hub writes it: snapshot files link into blobs/."""
        repo = parent / HUB_REPO
        if repo.exists():
            return repo
        snapshot = repo / "snapshots" / REVISION
        (repo / "blobs").mkdir(parents=True)
        snapshot.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REVISION)
        for file in sorted(self.checkpoints["clip"].iterdir()):
            if file.is_file():
                blob = repo / "blobs" / f"blob-{file.name}"
                shutil.copy2(file, blob)
                (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
        return repo


def cat_jpeg() -> bytes:
    import cv2

    picture = cv2.imread(str(PHOTOS / "chelsea.png"), cv2.IMREAD_COLOR)
    return cv2.imencode(".jpg", picture)[1].tobytes()


TEXTS = ["a photo of a cat", "a cup of coffee", "an astronaut", "a rocket on its pad", "a camera", "the retina"]


def make_input(rel: str, workdir: Path) -> int:
    """Create the input a bulk-job command names; returns its row count."""
    path = workdir / rel
    if rel.endswith(".parquet"):
        pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), path)
        return len(TEXTS)
    if rel.rstrip("/") == "photos":
        path.mkdir()
        photos = sorted(PHOTOS.glob("*.jpg")) + sorted(PHOTOS.glob("*.png"))[:1]
        for photo in photos:
            shutil.copy(photo, path / photo.name)
        return len(photos)
    if rel.rstrip("/") == "ds":
        path.mkdir()
        pq.write_table(pa.table({"id": [0, 1, 2], "text": TEXTS[:3]}), path / "part-0.parquet")
        pq.write_table(pa.table({"id": [3, 4, 5], "text": TEXTS[3:]}), path / "part-1.parquet")
        return len(TEXTS)
    pytest.fail(f"the docs' bulk job reads {rel!r}, an input the test cannot make: add it to make_input")


@contextmanager
def in_folder(path: Path, env: dict[str, str] | None = None):
    old_cwd, old_env = Path.cwd(), {k: os.environ.get(k) for k in (env or {})}
    os.chdir(path)
    os.environ.update(env or {})
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_cli(argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> int:
    """``arrowengine ARGV`` in ``workdir``, in this process, through the script's entry point."""
    with in_folder(workdir, env):
        try:
            return entry_point_main()(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1


class ServeProcess:
    """``arrowengine serve ...`` in a subprocess; ``port`` once it listens, ``wait_ready()``."""

    def __init__(self, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.proc = subprocess.Popen([arrowengine_script(), *argv], cwd=workdir, env={**os.environ, **env},
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        threading.Thread(target=self._read, daemon=True).start()
        self.port: int | None = None
        self.http_port: int | None = None  # with --http-port

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_ready(self, timeout: float = SERVER_START_S) -> int:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.log.append(line)
            listening = re.search(r"listening on grpc\+\w+://\S+:(\d+) ", line)
            if listening:
                self.port = int(listening.group(1))
            http = re.search(r"HTTP API on https?://\S+:(\d+)/v1", line)
            if http:
                self.http_port = int(http.group(1))
            if re.search(r"\bready$", line):
                assert self.port, "ready before it said where it listens"
                return self.port
        raise AssertionError(f"`arrowengine {' '.join(self.argv)}` was not ready within {timeout:g} s (exit "
                             f"{self.proc.poll()}); its log:\n" + "\n".join(self.log[-40:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"`arrowengine {' '.join(self.argv)}` did not stop within 60 s of SIGTERM") \
                from None


def serve_argv(part: Part) -> list[str]:
    """The serve command with --port 0 (any free port) instead of a fixed one, and --http-port 0 if it has one."""
    argv = list(part.argv[1:])
    if "--port" in argv:
        argv[argv.index("--port") + 1] = "0"
    else:
        argv += ["--port", "0"]
    if "--http-port" in argv:
        argv[argv.index("--http-port") + 1] = "0"
    return argv


def model_specs(argv: list[str]) -> list[str]:
    """The [NAME=]DIR specs of a serve command, in the order the server takes them (positional, then --model)."""
    args = entry_point_module().build_parser().parse_args(argv)
    return list(args.models) + list(args.model)


def served_names(argv: list[str]) -> list[str]:
    """The names a serve command serves, by the docs' rule: NAME=DIR, or DIR named after its folder."""
    return [spec.partition("=")[0] if "=" in spec else Path(spec).name for spec in model_specs(argv)]


def prepare_serve(part: Part, workdir: Path, materials: Materials) -> tuple[list[str], dict]:
    """Make what a serve command names in ``workdir``; returns (argv, client options)."""
    argv = serve_argv(part)
    for spec in model_specs(argv):
        materials.model_folder(spec.partition("=")[2] if "=" in spec else spec, workdir)
    options: dict = {}
    if "--tls-cert" in argv:
        cert, key = make_self_signed_cert(workdir, "made")
        shutil.copy(cert, workdir / argv[argv.index("--tls-cert") + 1])
        shutil.copy(key, workdir / argv[argv.index("--tls-key") + 1])
        options["tls_root_certs"] = workdir / argv[argv.index("--tls-cert") + 1]
    if "--auth-token-file" in argv:
        (workdir / argv[argv.index("--auth-token-file") + 1]).write_text("docs-test-token\n")
        options["token"] = "docs-test-token"
    return argv, options


def check_server(port: int, options: dict, names: list[str]) -> None:
    from flight_client import EmbeddingClient

    scheme, host = ("grpc+tls", "localhost") if "tls_root_certs" in options else ("grpc", "127.0.0.1")
    with EmbeddingClient(f"{scheme}://{host}:{port}", retries=0, **options) as client:
        assert client.health()["status"] == "ok"
        assert client.ready()["ready"] is True
        models = client.models()
        assert [m["name"] for m in models] == names
        for meta in models:
            if "text" in meta["modalities"]:
                vecs = client.embed_texts(["a photo of a cat"], model=meta["name"])
                assert vecs.shape == (1, meta["dimension"])
            if "image" in meta["modalities"]:
                assert client.embed_images([cat_jpeg()], model=meta["name"]).shape == (1, meta["dimension"])


@contextmanager
def local_servers(hosts: list[str], model_name: str, materials: Materials):
    """One in-process server per remote host the docs name, each serving ``model_name``."""
    import engine
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    if not hosts:
        yield {}
        return
    kind = SERVED_NAMES.get(model_name)
    assert kind, f"the docs' --server serves {model_name!r}, which the test cannot serve: add it to SERVED_NAMES"
    with ExitStack() as stack:
        ports = {}
        for host in hosts:
            model = engine.load_model(materials.converted[kind])
            ports[host] = stack.enter_context(EmbeddingServer({model_name: model}, ServerConfig(port=0))).port
        yield ports


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def materials(tiny_clip_dir, tiny_clip_source, minilm_model_dir, minilm_source, checkpoints,
              tmp_path_factory) -> Materials:
    reranker = checkpoints.converted(checkpoints.reranker_source("bert"), "reranker-bert")
    return Materials(converted={"clip": tiny_clip_dir, "minilm": minilm_model_dir, "reranker": reranker},
                     checkpoints={"clip": tiny_clip_source, "minilm": minilm_source},
                     cache=tmp_path_factory.mktemp("arrowengine-cache"))


def default_serve_part() -> tuple[Line, Part]:
    for line in LINES:
        for part in line.parts:
            if part.argv == ("arrowengine", "serve"):
                return line, part
    raise AssertionError("the docs no longer show a bare `arrowengine serve` (the default model); the python "
                         "snippets need a server: start one in default_server another way")


@pytest.fixture(scope="module")
def default_server(materials, tmp_path_factory):
    """The README's `arrowengine serve` (all-MiniLM-L6-v2 converted on first use) with --port 0 and an empty
    model cache; yields its port. The in-process embeds share its cache (converted once)."""
    _, part = default_serve_part()
    server = ServeProcess(serve_argv(part), tmp_path_factory.mktemp("default-serve"),
                          {"ARROWENGINE_CACHE": str(materials.cache)})
    try:
        port = server.wait_ready()
        yield port
    finally:
        assert server.stop() == 0


def http_serve_part() -> tuple[Line, Part]:
    for line in LINES:
        for part in line.parts:
            if part.argv[:2] == ("arrowengine", "serve") and "--http-port" in part.argv:
                return line, part
    raise AssertionError("the docs no longer show `arrowengine serve --http-port`; the curl and openai examples "
                         "need one: start one in http_server another way")


@pytest.fixture(scope="module")
def http_server(materials, tmp_path_factory):
    """The docs' `arrowengine serve --http-port 8080` with --port 0 and --http-port 0; yields (Flight port, HTTP
    port). Its model cache is the default server's (all-MiniLM-L6-v2 converted once)."""
    _, part = http_serve_part()
    server = ServeProcess(serve_argv(part), tmp_path_factory.mktemp("http-serve"),
                          {"ARROWENGINE_CACHE": str(materials.cache)})
    try:
        port = server.wait_ready()
        assert server.http_port, "the server did not say where its HTTP API listens"
        yield port, server.http_port
    finally:
        assert server.stop() == 0


def check_http(port: int, names: list[str]) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as resp:
        assert [m["id"] for m in json.loads(resp.read())["data"]] == names
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=30) as resp:
        assert json.loads(resp.read())["ready"] is True


# ---- running the commands ------------------------------------------------------------------------------------

def lines_running(*runners: str) -> list[Line]:
    return [line for line in distinct(LINES) if any(runner_of(p) in runners for p in line.parts)]


SERVE_LINES = lines_running("serve")
OTHER_LINES = lines_running("convert", "inspect", "embed", "cp_snapshot")
CPP_LINES = lines_running("cpp_build", "cpp_client")


def test_serve_commands(materials, default_server, http_server, tmp_path):
    """Every `arrowengine serve` line (but the CUDA one and the synopsis), served at once, each checked with a
    client: health, ready, the names the docs' naming rule gives, an embedding per modality; with --http-port,
    the HTTP API's models and readiness too."""
    started: list[tuple[Line, ServeProcess, dict, list[str]]] = []
    failures = []
    _, http_part = http_serve_part()
    try:
        for n, line in enumerate(SERVE_LINES):
            for part in line.parts:
                if rule_for(part).run != "serve" or part.argv in (("arrowengine", "serve"), http_part.argv):
                    continue  # served by the default_server and http_server fixtures
                workdir = tmp_path / f"serve-{n}"
                workdir.mkdir()
                argv, options = prepare_serve(part, workdir, materials)
                process = ServeProcess(argv, workdir, {"ARROWENGINE_CACHE": str(tmp_path / f"cache-{n}")})
                started.append((line, process, options, served_names(argv)))
        assert started, "the docs show no `arrowengine serve` with models"
        check_server(default_server, {}, ["all-MiniLM-L6-v2"])
        check_server(http_server[0], {}, ["all-MiniLM-L6-v2"])
        check_http(http_server[1], ["all-MiniLM-L6-v2"])
        for line, process, options, names in started:
            try:
                check_server(process.wait_ready(), options, names)
                if process.http_port:
                    check_http(process.http_port, names)
            except Exception as exc:  # noqa: BLE001 - report every line, not only the first that fails
                failures.append(f"{line.where}: `{line.key}`: {type(exc).__name__}: {exc}")
    finally:
        for line, process, _, _ in started:
            rc = process.stop()
            if rc != 0:
                failures.append(f"{line.where}: exit {rc} after SIGTERM; log:\n" + "\n".join(process.log[-20:]))
    assert not failures, "\n".join(failures)


def run_part(part: Part, workdir: Path, materials: Materials, where: str) -> None:
    rule = rule_for(part)
    argv = list(part.argv)
    if rule.run == "cp_snapshot":
        hub = workdir / "hub-cache"
        hub.mkdir(exist_ok=True)
        snapshot = materials.hub_cache_repo(hub) / "snapshots" / REVISION
        source = argv[2]
        argv[2] = str(snapshot) + source.split("/snapshots/<revision>", 1)[1]
        done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{where}: {' '.join(argv)}: {done.stderr}"
        return
    if rule.run == "inspect":
        materials.model_folder(argv[2], workdir)
        assert run_cli(argv[1:], workdir) == 0, f"{where}: `{part.text}` failed"
        return
    if rule.run == "convert":
        run_convert(argv, workdir, materials, where, part)
        return
    if rule.run == "embed":
        run_embed(argv, workdir, materials, where, part)
        return
    pytest.fail(f"{where}: no runner for {rule.run!r}")


def run_convert(argv: list[str], workdir: Path, materials: Materials, where: str, part: Part) -> None:
    outputs: list[Path] = []
    if "--manifest" in argv:
        manifest = argv[argv.index("--manifest") + 1]
        out_root = workdir / argv[argv.index("--out-root") + 1]
        jobs = [{"name": "clip-keep", "source": "./my-clip"},
                {"name": "clip-bf16", "source": "./my-clip", "dtype": "bfloat16", "format": "parquet"}]
        (workdir / manifest).write_text(json.dumps(jobs))
        link_tree(materials.checkpoints[LOCAL_CHECKPOINTS["./my-clip"]], workdir / "my-clip")
        outputs = [out_root / job["name"] for job in jobs]
    else:
        source, out = argv[2], argv[3]
        if "<revision>" in source:
            materials.hub_cache_repo(workdir / Path(source.split("/snapshots/")[0]).parent)
            argv[2] = source.replace("<revision>", REVISION)
        elif source in HUB_IDS:
            argv[2] = str(materials.checkpoints[HUB_IDS[source]])  # no hub here: a local checkpoint of that kind
        elif (workdir / source).exists():
            pass  # made by the command before it on the line (cp -rL ...)
        elif source in LOCAL_CHECKPOINTS:
            link_tree(materials.checkpoints[LOCAL_CHECKPOINTS[source]], workdir / source)
        else:
            pytest.fail(f"{where}: `{part.text}` converts {source!r}, which the test cannot make: add it to "
                        "LOCAL_CHECKPOINTS or HUB_IDS")
        outputs = [workdir / out]
    assert run_cli(argv[1:], workdir) == 0, f"{where}: `{part.text}` failed"
    for out in outputs:
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["tensors"] > 0, f"{where}: {out} holds no tensors"


def run_embed(argv: list[str], workdir: Path, materials: Materials, where: str, part: Part,
              ports: dict[str, int] | None = None) -> None:
    """Run a docs' embed command in ``workdir``; ``ports``: servers already standing in for its --server hosts
    (default: started here for the command)."""
    rows = make_input(argv[2], workdir)
    model = argv[argv.index("--model") + 1] if "--model" in argv else None
    servers = [argv[i + 1] for i, a in enumerate(argv) if a == "--server"]
    if model and not servers:
        materials.model_folder(model, workdir)
    hosts = list(dict.fromkeys(re.match(rf"grpc://([^:/]+):{DOC_PORT}$", s).group(1) for s in servers))
    env = {"ARROWENGINE_CACHE": str(materials.cache)}
    with ExitStack() as stack:
        if ports is None:
            ports = stack.enter_context(local_servers(hosts, model or "all-MiniLM-L6-v2", materials))
        for host in hosts:
            argv = [a.replace(f"grpc://{host}:{DOC_PORT}", f"grpc://127.0.0.1:{ports[host]}") for a in argv]
        argv.append("--no-progress")
        if "--resume" in argv:  # "after a crash or kill": the same job has run before
            first = [a for a in argv if a != "--resume"]
            assert run_cli(first[1:], workdir, env) == 0, f"{where}: the run before `{part.text}` failed"
        assert run_cli(argv[1:], workdir, env) == 0, f"{where}: `{part.text}` failed"
    if argv[3].endswith(".lance") or ("--format" in argv and argv[argv.index("--format") + 1] == "lance"):
        import lance

        table = lance.dataset(str(workdir / argv[3])).to_table()  # as the docs read the result
        assert table.schema.field("embedding").type.list_size > 0, f"{where}: {table.schema}"
    else:
        table = pq.read_table(workdir / argv[3])  # as the docs read the result
    assert table.num_rows == rows and table.column("error").null_count == rows, f"{where}: {table}"
    if "--passthrough" in argv:
        assert table.column(argv[argv.index("--passthrough") + 1]).to_pylist() == list(range(rows))
    elif argv[2].rstrip("/") == "photos":
        assert table.column("path").to_pylist() == sorted(p.name for p in (workdir / "photos").iterdir())
    else:  # the default: every input column but the embedded one, here the input's id
        assert table.column_names[0] == "id" and table.column("id").to_pylist() == list(range(rows))


@pytest.mark.parametrize("line", OTHER_LINES, ids=lambda line: line.where)
def test_convert_inspect_and_embed_commands(line, materials, default_server, tmp_path, request):
    """Each line in a fresh folder; the default model's cache is the one the docs' server converted into."""
    xfail_if_known(request, line.block.doc, line.parts[0].text)
    for part in line.parts:
        if rule_for(part).run in (None, "pip"):
            continue  # listed, or checked by test_pip_lines_name_what_is_installed (a pip install before &&)
        run_part(part, tmp_path, materials, line.where)


CURL_LINES = lines_running("curl")


def test_curl_commands(http_server, tmp_path):
    """Each curl line as the docs give it, against the docs' `arrowengine serve --http-port` on its free port."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on PATH")
    assert CURL_LINES
    for line in CURL_LINES:
        for part in line.parts:
            argv = [a.replace(f"127.0.0.1:{DOC_HTTP_PORT}/", f"127.0.0.1:{http_server[1]}/") for a in part.argv]
            done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, f"{line.where}: `{part.text}`:\n{done.stdout}\n{done.stderr}"
            doc = json.loads(done.stdout)
            assert [len(d["embedding"]) for d in doc["data"]] == [384, 384], f"{line.where}: {done.stdout[:300]}"


RERANK_LINES = lines_running("curl_rerank")


def test_curl_rerank_commands(checkpoints, tmp_path):
    """Each `curl .../rerank` line as the docs give it, against a tiny reranker served under the name it names."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on PATH")
    import engine
    from engine.scheduler import Scheduler
    from flight_server.config import ServerConfig
    from flight_server.servicer import EmbeddingServer

    assert RERANK_LINES
    model = engine.load_model(checkpoints.converted(checkpoints.reranker_source("bert"), "reranker-bert"))
    for line in RERANK_LINES:
        for part in line.parts:
            body = json.loads(part.argv[part.argv.index("-d") + 1])
            scheduler = Scheduler(model)
            server = EmbeddingServer({body["model"]: scheduler}, ServerConfig(port=0, http_port=0))
            try:
                argv = [a.replace(f"127.0.0.1:{DOC_HTTP_PORT}/", f"127.0.0.1:{server.http_port}/") for a in part.argv]
                done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
            finally:
                server.shutdown()
                scheduler.close()
            assert done.returncode == 0, f"{line.where}: `{part.text}`:\n{done.stdout}\n{done.stderr}"
            doc = json.loads(done.stdout)
            assert sorted(r["index"] for r in doc) == list(range(len(body["texts"]))), f"{line.where}: {doc}"
            scores = [r["score"] for r in doc]
            assert scores == sorted(scores, reverse=True), f"{line.where}: not best first: {doc}"


@pytest.mark.slow  # builds the C++ client
def test_cpp_client_commands(cpp_client_binary, default_server, tmp_path):
    """`python flight_client/cpp/build.py` (as cpp_client_binary: with --out), then the client command as the
    docs give it, against the docs' default server."""
    assert CPP_LINES
    ran = False
    for line in CPP_LINES:
        for part in line.parts:
            if rule_for(part).run != "cpp_client":
                continue
            argv = [str(cpp_client_binary)] + [a.replace(f":{DOC_PORT}", f":{default_server}") for a in part.argv[1:]]
            source = argv[argv.index("--source") + 1]
            (tmp_path / source).write_text("\n".join(TEXTS) + "\n")
            done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, f"{line.where}: `{part.text}`:\n{done.stdout}\n{done.stderr}"
            with pa.OSFile(str(tmp_path / argv[argv.index("--output") + 1]), "rb") as f:
                table = pa.ipc.open_file(f).read_all()
            assert table.num_rows == len(TEXTS) and table.column("error").null_count == len(TEXTS)
            ran = True
    assert ran


# ---- the python snippets -------------------------------------------------------------------------------------

def python_blocks_to_run() -> list[Block]:
    """Each python block once (README repeats python-api.md's client) whose one rule runs it."""
    found: dict[str, Block] = {}
    for block in BLOCKS:
        rules = [s for s in SNIPPETS if re.search(s.pattern, block.text, re.MULTILINE)] if block.lang == "python" \
            else []
        if len(rules) == 1 and rules[0].run:
            found.setdefault(block.text, block)
    return list(found.values())


def exec_snippet(block: Block, source: str, namespace: dict) -> str:
    out = StringIO()
    with redirect_stdout(out):
        exec(compile(source, block.where, "exec"), namespace)  # noqa: S102 - the docs' own snippet
    return out.getvalue()


@pytest.mark.parametrize("block", python_blocks_to_run(), ids=lambda b: b.where)
def test_python_snippets(block, materials, default_server, tmp_path, request):
    rule = snippet_rule(block)
    xfail_if_known(request, block.doc, block.first_line)
    source = block.text.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{default_server}")
    namespace: dict = {"__name__": "__docs__"}
    if rule.run == "client":
        printed = exec_snippet(block, source, namespace)
        vecs = namespace["vecs"]
        assert vecs.shape == (2, 384) and vecs.dtype == np.float32  # as the snippet's comment says
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
        assert "(2, 384)" in printed and "all-MiniLM-L6-v2" in printed
    elif rule.run == "openai":
        port = request.getfixturevalue("http_server")[1]
        printed = exec_snippet(block, block.text.replace(f"127.0.0.1:{DOC_HTTP_PORT}/", f"127.0.0.1:{port}/"),
                               namespace)
        assert printed.split() == ["2", "384", "13"], printed  # as the snippet's comment says
    elif rule.run == "plain_pyarrow":
        exec_snippet(block, source, namespace)
        out = namespace["out"]
        assert out.schema.names == ["embedding", "error"] and out.num_rows == 2
        assert out.column("error").null_count == 2
    elif rule.run == "engine":
        materials.model_folder("models/clip-b32", tmp_path)
        photo = cat_jpeg()
        (tmp_path / "cat.jpg").write_bytes(photo)
        namespace["arrow_binary_array"] = pa.array([photo, b"not an image"], pa.binary())
        with in_folder(tmp_path):
            exec_snippet(block, source, namespace)
        t, i, res = namespace["t"], namespace["i"], namespace["res"]
        assert t.shape[0] == 1 and i.shape == t.shape and t.flags.c_contiguous
        assert res.errors[0] is None and res.errors[1] and not res.embeddings[1].any()
    elif rule.run == "lance_search":
        run_lance_search(block, materials, tmp_path)
    elif rule.run == "reranker":
        materials.model_folder("models/ms-marco-minilm", tmp_path)
        with in_folder(tmp_path):
            exec_snippet(block, source, namespace)
        res, pairs = namespace["res"], namespace["pairs"]
        assert res.scores.shape == (2,) and res.scores.dtype == np.float32 and res.errors == [None, None]
        assert sorted(namespace["ranked"]) == sorted(namespace["docs"])
        assert pairs.errors[0] is None and pairs.errors[1].startswith("query: null")
    elif rule.run == "reranker_client":
        from flight_client import EmbeddingClient
        from flight_server.config import ServerConfig
        from flight_server.servicer import EmbeddingServer

        import engine

        model = engine.load_model(materials.converted["reranker"])
        earlier = next(b for b in BLOCKS if b.doc == block.doc and re.search(r"^from engine import load_model\b",
                                                                                  b.text, re.MULTILINE))
        namespace["docs"] = ast.literal_eval(re.search(r"^docs = (\[.*\])$", earlier.text, re.MULTILINE).group(1))
        with EmbeddingServer({"ms-marco": model}, ServerConfig(port=0)) as server, \
                EmbeddingClient(f"grpc://127.0.0.1:{server.port}") as client:
            namespace["client"] = client
            exec_snippet(block, source, namespace)
        scores = namespace["scores"]
        assert scores.shape == (2,) and scores.dtype == np.float32
    else:
        pytest.fail(f"{block.where}: no runner for {rule.run!r}")


def run_lance_search(block: Block, materials: Materials, workdir: Path) -> None:
    """The docs' embed command that writes the dataset the snippet opens, then the snippet, both against one
    local server serving the tiny CLIP as `clip`; the hits are the nearest photos by exact cosine distance."""
    import lance

    dataset = re.search(r'lance\.dataset\("([^"]+)"\)', block.text).group(1)
    writers = [(line, part) for line in distinct(LINES) for part in line.parts
               if runner_of(part) == "embed" and part.argv[3] == dataset]
    assert writers, f"{block.where}: no `arrowengine embed` command in the docs writes {dataset}"
    line, part = writers[0]
    with local_servers(["127.0.0.1"], "clip", materials) as ports:
        run_embed(list(part.argv), workdir, materials, line.where, part, ports)
        source = block.text.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{ports['127.0.0.1']}")
        namespace: dict = {"__name__": "__docs__"}
        with in_folder(workdir):
            printed = exec_snippet(block, source, namespace)
    table = lance.dataset(str(workdir / dataset)).to_table()
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    query = np.asarray(namespace["query"], np.float32)
    distances = 1 - vectors @ query / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(query))
    nearest = [table.column("path")[int(i)].as_py() for i in np.argsort(distances)[:3]]
    hits = namespace["hits"]
    assert hits.column("path").to_pylist() == nearest, (hits, distances)
    np.testing.assert_allclose(hits.column("_distance").to_numpy(), np.sort(distances)[:3], atol=1e-5)
    assert str(nearest) in printed
