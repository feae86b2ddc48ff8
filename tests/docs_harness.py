"""Runs the code blocks of a Markdown page (docs/*.md, README.md), as docs/contributing.md says.

Parsing is Sybil's (fenced code blocks, ``<!-- skip: next "reason" -->``); what each language
does is here:

- ``python``: executed, every block of a page in one namespace, in the page's own temporary
  directory. A ``text`` block titled ``Output`` right after it must equal what it printed.
- ``toml``: loaded with ``parse_config``. A block titled with a file name (``title="x.toml"``;
  ``python`` blocks too) is also written to that file for the blocks after it.
- ``bash``/``sh``/``shell``: run with bash (``set -euo pipefail``), the package's ``bin``
  first on ``PATH``. Install steps (``python3 -m venv``, ``pip install``) are left out: CI
  has installed the package. A command that starts a server (``tenantware serve``,
  ``python -m tenantware.testing.upstream``, ``uvicorn``) is started in the background and
  must answer HTTP before the next command; it runs until the end of the page.
- Addresses: a page talks to ``127.0.0.1:PORT`` as a reader would; each port is replaced by
  a free one (but Redis's 6379 and PostgreSQL's 5432, the test machine's own). A block that
  uses ``127.0.0.1:8080`` (the demo gateway) or ``127.0.0.1:9000`` (the fake upstream) when
  the page has not started one gets one started for it.
- Anything else (``text``, ``console``, ``json``, ...) is shown, not run.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import SkipTest

import httpx
from sybil import Document, Example, Region, Sybil
from sybil.example import NotEvaluated
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer
from sybil.parsers.markdown.skip import SkipParser

from tenantware import parse_config

ROOT = Path(__file__).resolve().parent.parent
#: Where the demo gateway and the fake upstream listen by default (what the pages use).
DEMO_PORT = 8080
UPSTREAM_PORT = 9000
#: Servers a page may start, with the port each listens on when it gives no ``--port``.
_SERVERS = [
    (re.compile(r"^tenantware\s+serve\b"), 8080, "/healthz"),
    (re.compile(r"^python3?\s+-m\s+tenantware\.testing\.upstream\b"), 9000, "/healthz"),
    (re.compile(r"^uvicorn\b"), 8000, "/"),
]
#: Redis and PostgreSQL of the test machine (tests/servers.py): used where they are.
_SHARED_SERVICES = frozenset({6379, 5432})
_ADDRESS = re.compile(r"\b(127\.0\.0\.1|localhost):(\d{2,5})\b")
_PORT_OPTION = re.compile(r"--port[ =](\d+)")
_INSTALL_STEP = re.compile(r"^(python3?\s+-m\s+venv\b|(\S*/)?pip3?\s+install\b)")
_ENV_PREFIX = re.compile(r"^((?:[A-Z_][A-Z0-9_]*=\S*\s+)*)(.*)$", re.S)
_STARTUP_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Page:
    """What one page's blocks share: a directory, its ports, its servers, its namespace."""

    directory: Path
    ports: dict[int, int] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)
    servers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)
    #: Assignments (``B=...``, ``export X=...``) of earlier shell lines, for the later ones.
    shell_assignments: list[str] = field(default_factory=list)
    last_output: str | None = None

    def port(self, documented: int) -> int:
        if documented not in self.ports:
            self.ports[documented] = _free_port()
        return self.ports[documented]

    def localize(self, text: str) -> str:
        """``text`` with each ``127.0.0.1:PORT`` moved to this page's port for it (Redis's and
        PostgreSQL's stay: the pages use the machine's own)."""

        def moved(match: re.Match[str]) -> str:
            port = int(match[2])
            return match[0] if port in _SHARED_SERVICES else f"{match[1]}:{self.port(port)}"

        return _ADDRESS.sub(moved, text)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTWARE_")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # The page's files (app.py for uvicorn), then the repository's (examples/, tools/).
        env["PYTHONPATH"] = os.pathsep.join([str(self.directory), str(ROOT)])
        return env

    def ensure_defaults(self, text: str) -> None:
        """Start the demo gateway / fake upstream a block talks to, if none runs yet."""
        for match in _ADDRESS.finditer(text):
            documented = int(match[2])
            if documented in self.running:
                continue
            if documented == DEMO_PORT:
                self.start(f"tenantware serve --demo --port {self.port(DEMO_PORT)}", DEMO_PORT)
            elif documented == UPSTREAM_PORT:
                port = self.port(UPSTREAM_PORT)
                self.start(f"python -m tenantware.testing.upstream --port {port}", UPSTREAM_PORT)

    def start(self, command: str, documented: int, ready_path: str = "/healthz") -> None:
        log = self.directory / f"server-{documented}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.directory,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.servers.append((process, log))
        self.running.add(documented)
        url = f"http://127.0.0.1:{self.port(documented)}{ready_path}"
        deadline = time.monotonic() + _STARTUP_S
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"`{command}` exited with {process.returncode}:\n{log.read_text()}"
                )
            try:
                httpx.get(url, timeout=2.0)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"`{command}` did not answer {url}:\n{log.read_text()}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        for process, _ in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in self.servers:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.servers.clear()
        self.running.clear()


def _page(example: Example) -> Page:
    page: Page = example.namespace["__page__"]
    return page


def _write_titled(example: Example, source: str) -> None:
    title = example.parsed.title
    if title and re.fullmatch(r"[\w.-]+\.(py|toml|yaml|yml|json)", title):
        (_page(example).directory / title).write_text(source)


def _padded(example: Example, source: str) -> str:
    """``source`` preceded by blank lines, so a traceback names the line in the page."""
    return "\n" * example.line + source


def evaluate_python(example: Example) -> None:
    page = _page(example)
    source = page.localize(str(example.parsed.source))
    _write_titled(example, source)
    page.ensure_defaults(str(example.parsed.source))
    code = compile(_padded(example, source), str(example.path), "exec")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, example.namespace)
    page.last_output = printed.getvalue()


def evaluate_output(example: Example) -> None:
    page = _page(example)
    expected = str(example.parsed.source)
    actual = page.last_output
    if actual is None:  # the python block above was skipped
        return
    page.last_output = None
    assert _lines(actual) == _lines(expected), (
        f"{example.path}, line {example.line}: the block above printed\n{actual}\n"
        f"not what the page shows:\n{expected}"
    )


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def evaluate_toml(example: Example) -> None:
    source = _page(example).localize(str(example.parsed.source))
    _write_titled(example, source)
    parse_config(source, source=f"{example.path}, line {example.line}")


def _logical_lines(source: str) -> Iterator[str]:
    """Lines of a shell block with backslash continuations joined, comments dropped."""
    pending = ""
    for raw in source.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            yield line


def _without_install_steps(line: str) -> str:
    steps = [step.strip() for step in line.split("&&")]
    kept = [re.sub(r"^\.venv/bin/", "", step) for step in steps if not _INSTALL_STEP.match(step)]
    return " && ".join(kept)


def evaluate_shell(example: Example) -> None:
    page = _page(example)
    page.ensure_defaults(
        "\n".join(line for line in _logical_lines(example.parsed.source) if not _server(line))
    )
    script: list[str] = []
    for line in _logical_lines(str(example.parsed.source)):
        line = _without_install_steps(line)
        if not line:
            continue
        server = _server(line)
        if server is None:
            script.append(page.localize(line))
            if re.match(r"^(export\s+)?[A-Za-z_][A-Za-z0-9_]*=", line):
                page.shell_assignments.append(page.localize(line))
            continue
        _run_shell(example, page, script)
        script = []
        command, default_port, ready_path = server
        ports = _PORT_OPTION.findall(command)
        documented = int(ports[0]) if ports else default_port
        if ports:
            command = _PORT_OPTION.sub(f"--port {page.port(documented)}", command)
        else:
            command += f" --port {page.port(documented)}"
        page.start(page.localize(command), documented, ready_path)
    _run_shell(example, page, script)


def _server(line: str) -> tuple[str, int, str] | None:
    """The command (environment prefix kept, ``&`` dropped) if ``line`` starts a server."""
    line = _without_install_steps(line).removesuffix("&").strip()
    match = _ENV_PREFIX.match(line)
    assert match is not None
    for pattern, port, ready_path in _SERVERS:
        if pattern.match(match[2]):
            return line, port, ready_path
    return None


#: ``curl`` in a page's shell blocks: as the reader's, but a 5xx answer fails the block (the
#: gateway never answers a documented call with a server error).
_CURL = r"""curl() {
    local out code
    out=$(command curl -sS -w '\n%{http_code}' "$@") || return $?
    code=${out##*$'\n'}
    printf '%s\n' "${out%$'\n'*}"
    if [ "$code" -ge 500 ]; then echo "curl: HTTP $code" >&2; return 22; fi
}"""


def _run_shell(example: Example, page: Page, lines: list[str]) -> None:
    if not lines:
        return
    script = "\n".join(["set -euo pipefail", _CURL, *page.shell_assignments, *lines])
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=page.directory,
        env=page.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"{example.path}, line {example.line}: exit {done.returncode}\n$ "
        + "\n$ ".join(lines)
        + f"\n{done.stdout}\n{done.stderr}"
    )


@dataclass(frozen=True)
class Block:
    source: str
    language: str
    title: str | None


_INFO = re.compile(r"(?P<language>[\w+-]*)(?P<attributes>[^\n]*)$\n", re.MULTILINE)
_TITLE = re.compile(r'title="([^"]*)"')
_EVALUATORS = {
    "python": evaluate_python,
    "py": evaluate_python,
    "toml": evaluate_toml,
    "bash": evaluate_shell,
    "sh": evaluate_shell,
    "shell": evaluate_shell,
}


class CodeBlocks:
    """A Sybil parser: one region per fenced block whose language runs (or is an Output)."""

    lexer = RawFencedCodeBlockLexer(
        info_pattern=_INFO,
        mapping={"language": "language", "attributes": "attributes", "source": "source"},
    )

    def __call__(self, document: Document) -> Iterator[Region]:
        for lexed in self.lexer(document):
            language = lexed.lexemes["language"]
            title_match = _TITLE.search(lexed.lexemes["attributes"])
            title = title_match[1] if title_match else None
            evaluator = _EVALUATORS.get(language)
            if language == "text" and title == "Output":
                evaluator = evaluate_output
            if evaluator is None:
                continue
            block = Block(str(lexed.lexemes["source"]), language, title)
            yield Region(lexed.start, lexed.end, block, evaluator)


class ReasonedSkips(SkipParser):
    """Sybil's ``<!-- skip: next "reason" -->``, with the reason required."""

    def __call__(self, document: Document) -> Iterator[Region]:
        fenced = [(block.start, block.end) for block in CodeBlocks.lexer(document)]
        for region in super().__call__(document):
            # A marker shown as code (in a fence, or `inline`) is an example, not a marker.
            quoted = document.text[region.start - 1 : region.start] == "`"
            if quoted or any(start < region.start < end for start, end in fenced):
                continue
            action, reason = region.parsed
            if action in ("next", "start") and not (reason or "").strip():
                line = document.text.count("\n", 0, region.start) + 1
                raise ValueError(f"{document.path}, line {line}: say why the block is skipped")
            yield region


SYBIL = Sybil(parsers=[CodeBlocks(), ReasonedSkips()])


def pages() -> list[Path]:
    """Every page whose blocks run: README.md and docs/**/*.md (not the benchmark results,
    whose commands take minutes and run by hand)."""
    docs = ROOT / "docs"
    found = [ROOT / "README.md"]
    for path in sorted(docs.rglob("*.md")):
        if (docs / "benchmarks") in path.parents:
            continue
        found.append(path)
    return found


@dataclass
class Outcome:
    ran: int = 0
    skipped: int = 0


def run_page(path: Path) -> Outcome:
    """Evaluate every block of ``path`` in order, in a temporary directory of its own."""
    document = SYBIL.parse(path)
    page = Page(Path(tempfile.mkdtemp(prefix="tenantware-docs-")))
    document.namespace.update({"__page__": page, "__name__": "__docs__"})
    previous = Path.cwd()
    outcome = Outcome()
    try:
        os.chdir(page.directory)
        for example in document.examples():
            counted = isinstance(example.parsed, Block)
            try:
                example.evaluate()
            except (SkipTest, NotEvaluated):
                outcome.skipped += counted
                continue
            outcome.ran += counted
    finally:
        os.chdir(previous)
        page.stop()
        _release(document.namespace)
    return outcome


def _release(namespace: dict[str, Any]) -> None:
    """Close the SDK clients a page left open (a reader's snippet need not), then collect."""
    for value in list(namespace.values()):
        module = type(value).__module__.split(".")[0]
        close = getattr(value, "close", None)
        if module in ("openai", "anthropic", "httpx") and callable(close):
            close()
    namespace.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
