"""MkDocs hooks (mkdocs.yml ``hooks:``): the configuration reference page, rendered from the
schema at every build, so it is never out of date and never checked in."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mkdocs.structure.files import File, Files

from tools.config_reference import PAGE_URI, render


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, PAGE_URI, content=render()))
    return files
