"""The gateway of ``benchmarks/fuzz.py``: ``tenantware serve --demo``, unchanged, except that
its built-in fake upstream reports hostile usage on a share of its answers.

``python fuzz_gateway.py --port 8931``; the demo's ledger goes where
``TENANTWARE_DEMO_LEDGER`` says (``fuzz.py`` sets it), else to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Any

# Run from a checkout without installing: the package is the parent of benchmarks/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tenantware.testing import upstream
from tenantware.types import Receive, Scope, Send

#: What the fake upstream reports, drawn per answer: ``(usage fields, omit usage)``. Half the
#: answers are honest; the rest are what issue 21 saw or could see from a broken upstream.
USAGE_FAULTS: list[tuple[dict[str, Any] | None, bool]] = [
    *[(None, False)] * 10,
    ({"completion_tokens": 10**16}, False),
    ({"prompt_tokens": 10**16, "completion_tokens": 10**30}, False),
    ({"prompt_tokens": -5_000, "completion_tokens": -5_000}, False),
    ({"completion_tokens": 1.5}, False),
    ({"prompt_tokens": "12", "completion_tokens": None}, False),
    ({"prompt_tokens_details": {"cached_tokens": 10**30}}, False),
    ({"completion_tokens_details": {"reasoning_tokens": -1}}, False),
    ({"completion_tokens_details": "x", "prompt_tokens": [1]}, False),
    ({"prompt_tokens": None}, False),
    (None, True),
]


class HostileUsageUpstream(upstream.FakeUpstream):
    """The demo's fake upstream with a usage fault drawn for each request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = random.Random(int(os.environ.get("TW_FUZZ_SEED", "21")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Concurrent answers may swap faults between them: the fuzz only needs a mix.
            self.config.usage_override, self.config.omit_usage = self.faults.choice(USAGE_FAULTS)
        await super().__call__(scope, receive, send)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8931)
    args = parser.parse_args()
    # ``tenantware.cli.build_app`` imports the fake upstream class when it builds the demo.
    upstream.FakeUpstream = HostileUsageUpstream  # type: ignore[misc]
    from tenantware.cli import main as tenantware_main

    return tenantware_main(["serve", "--demo", "--host", "127.0.0.1", "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())
