"""The suite's slow tool runs (mypy, lint-imports, mkdocs), started as the session starts.

Each takes seconds of one core and waits for nothing the other tests do, so ``conftest.py``
starts the ones the selected tests need (``@pytest.mark.early_check(name)``) right after
collection, in the background at the lowest priority (``nice -n 19``): they use the cores
while other tests sleep or wait on sockets, and the test that checks one waits only for
what is left of it. Each still runs once, on the tree as it is when the session starts, and
its test asserts on its exit status and output as before.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Bounds a check's wait; far above any of them on a loaded host.
TIMEOUT_S = 300.0


def tool(name: str) -> str | None:
    """A console script of this virtualenv, else one on ``PATH``."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


@dataclass(frozen=True)
class Finished:
    """What a check printed and how it ended; ``output_dir`` holds what it wrote (the
    site, for mkdocs)."""

    returncode: int
    stdout: str
    stderr: str
    output_dir: Path


def _argv(name: str, workdir: Path) -> list[str]:
    if name == "mypy":
        found = tool("mypy")
        return [found] if found else []
    if name == "lint-imports":
        found = tool("lint-imports")
        return [found, "--no-cache"] if found else []
    if name == "mkdocs":
        return [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(workdir)]
    raise ValueError(f"no early check named {name!r}")


class _Check:
    """One check's process; its output goes to files (a pipe nobody reads could fill)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix=f"tenantware-{name}-"))
        argv = _argv(name, self.workdir / "out")
        self.missing = not argv
        self.out = (self.workdir / "stdout").open("w+")
        self.err = (self.workdir / "stderr").open("w+")
        self.process: subprocess.Popen[str] | None = None
        if argv:
            nice = shutil.which("nice")
            self.process = subprocess.Popen(
                [nice, "-n", "19", *argv] if nice else argv,
                cwd=ROOT,
                stdout=self.out,
                stderr=self.err,
                text=True,
            )

    def finish(self) -> Finished:
        assert self.process is not None
        returncode = self.process.wait(timeout=TIMEOUT_S)
        self.out.seek(0)
        self.err.seek(0)
        return Finished(returncode, self.out.read(), self.err.read(), self.workdir / "out")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.out.close()
        self.err.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


_RUNNING: dict[str, _Check] = {}


def start(name: str) -> None:
    """Start check ``name`` unless it is running already."""
    if name not in _RUNNING:
        _RUNNING[name] = _Check(name)


def finish(name: str) -> Finished:
    """Wait for check ``name`` (started now if it was not); raises ``LookupError`` when its
    tool is not installed."""
    start(name)
    check = _RUNNING[name]
    if check.missing:
        raise LookupError(f"{name} is not installed (it is in the [test] extra)")
    return check.finish()


def stop_all() -> None:
    """Kill what still runs and remove every check's files (at the end of the session)."""
    for check in _RUNNING.values():
        check.stop()
    _RUNNING.clear()
