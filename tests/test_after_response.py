"""After the response, the quota settle and the admission release leave in one call.

On one Redis server the quota layer asked for the seat in its reservation call; the admission
layer leaves what the release charges on the seat request, and the quota layer settles and
releases in one script call (``tenantware.joint``), answered in one wait. Both still happen
exactly once: every counter and seat is back after each request (JSON, stream, refused
upstream). (Where the two are separate calls, the admission layer sends its release into
``ctx.after_response`` and both leave in one write: ``test_joint_reserve.py``.)
"""

from __future__ import annotations

import time

import pytest

from tenantware.admission import redis as admission_redis
from tenantware.joint import redis as joint_redis
from tenantware.quota import redis as quota_redis
from tenantware.testing.upstream import FakeUpstreamConfig
from tests.support import CHAT
from tests.support import script_sha as _sha
from tests.test_stack import backend_settings, running_stack


def _joined_writes(writes: list[list[bytes]], expected: int) -> list[list[str]]:
    """What each write carried, once ``expected`` settle + release calls went out (they
    follow the response; bounded wait)."""
    deadline = time.monotonic() + 10.0
    while True:
        after = [_kinds(batch) for batch in list(writes)]
        if after.count(["settle+release"]) >= expected or time.monotonic() > deadline:
            return after
        time.sleep(0.01)


def _kinds(batch: list[bytes]) -> list[str]:
    settle, admission = _sha(quota_redis._SETTLE), _sha(admission_redis._SCRIPT)
    both = _sha(joint_redis._SETTLE_RELEASE)
    kinds = []
    for command in batch:
        if both in command:
            kinds.append("settle+release")
        elif settle in command:
            kinds.append("settle")
        elif admission in command and b"$7\r\nrelease\r\n" in command:
            kinds.append("release")
    return sorted(kinds)


@pytest.mark.parametrize("stream", [False, True])
def test_settle_and_release_are_one_call_and_every_book_agrees(
    request: pytest.FixtureRequest, writes: list[list[bytes]], stream: bool
) -> None:
    with running_stack(gateway=backend_settings("redis", request)) as stack:
        for _ in range(3):
            with stack.http() as client:
                body = {**CHAT, "stream": stream}
                response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
        stack.wait_upstream_idle()
        after = _joined_writes(writes, 3)
        assert after.count(["settle+release"]) == 3, after
        assert not [kinds for kinds in after if "settle" in kinds or "release" in kinds]
        assert stack.quota("acme")["slots"] == 0
        assert stack.seats() == {"*": (0, 0)}


def test_a_failed_upstream_releases_and_refunds_once(
    request: pytest.FixtureRequest, writes: list[list[bytes]]
) -> None:
    fake = FakeUpstreamConfig(failure_status=400, failure_rate=1.0)
    with running_stack(fake, gateway=backend_settings("redis", request)) as stack:
        with stack.http() as client:
            response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 400, response.text
        stack.wait_upstream_idle()
        after = _joined_writes(writes, 1)
        assert after.count(["settle+release"]) == 1, after
        assert not [kinds for kinds in after if "settle" in kinds or "release" in kinds]
        assert stack.quota("acme") == {"tokens": 0, "spend": 0, "slots": 0}
        assert stack.seats() == {"*": (0, 0)}
