"""Every code block of the guide (docs/) and of the README runs (docs/contributing.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs_harness import ROOT, pages, run_page


@pytest.mark.parametrize("page", pages(), ids=lambda path: str(path.relative_to(ROOT)))
def test_every_block_of_the_page_runs(page: Path) -> None:
    outcome = run_page(page)
    assert outcome.ran + outcome.skipped > 0 or "```" not in page.read_text()


OLD_STREAMING_SNIPPET = """
```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="sk-demo-acme")
for chunk in client.chat.completions.create(
    model="gpt-4.1", messages=[{"role": "user", "content": "hi"}], stream=True
):
    print(chunk.choices[0].delta.content if chunk.choices else "", end="")
```

```text title="Output"
tok tok tok tok tok
```
"""


def test_a_snippet_whose_output_differs_from_the_page_fails(tmp_path: Path) -> None:
    """The streaming snippet the README had printed ``None`` after the last chunk."""
    page = tmp_path / "page.md"
    page.write_text(OLD_STREAMING_SNIPPET)
    with pytest.raises(AssertionError, match="tok tok tok tok tok None"):
        run_page(page)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("```toml\n[gateway]\nreplicas = 0\n```\n", "replicas"),
        ("```bash\nfalse\n```\n", "exit 1"),
        ("```python\nraise KeyError('nope')\n```\n", "nope"),
        ("<!-- skip: next -->\n```python\npass\n```\n", "say why the block is skipped"),
    ],
    ids=["toml", "shell", "python", "skip-without-reason"],
)
def test_a_broken_block_fails_its_page(tmp_path: Path, text: str, error: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(text)
    with pytest.raises((AssertionError, ValueError, KeyError), match=error):
        run_page(page)


def test_skipped_blocks_are_counted_not_run(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text('<!-- skip: next "needs a key" -->\n```python\nraise SystemExit\n```\n')
    outcome = run_page(page)
    assert (outcome.ran, outcome.skipped) == (0, 1)
