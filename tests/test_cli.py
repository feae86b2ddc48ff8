"""The command line: key hashing and ``serve --demo`` answering real requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tenantware import KeyHasher
from tenantware.cli import main
from tenantware.demo import DEMO_KEYS, DEMO_UPSTREAM_PATH
from tests.servers import find_free_port


def test_hash_key_prints_the_stored_form(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "sk-abc"]) == 0
    assert capsys.readouterr().out.strip() == KeyHasher().hash("sk-abc")


def test_new_key_prints_a_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new-key", "--prefix", "sk"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.strip().splitlines())
    key = lines["key"].strip()
    assert key.startswith("sk-")
    assert lines["hash"].strip() == KeyHasher().hash(key)


def test_serve_rejects_a_bad_config_file(
    tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(str(tmp_path), "bad.toml")
    with open(path, "w") as handle:
        handle.write("[[tenants]]\nid = 3\n")
    assert main(["serve", "--config", path]) == 2
    assert "$.tenants[0].id" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_demo_answers_completions_with_the_demo_key(tmp_path: Path) -> None:
    port = find_free_port()
    root = Path(__file__).resolve().parent.parent
    started_in, temporary = tmp_path / "cwd", tmp_path / "tmp"
    started_in.mkdir()
    temporary.mkdir()
    env = {**os.environ, "PYTHONPATH": str(root), "TMPDIR": str(temporary)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tenantware.cli", "serve", "--demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=started_in,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "gateway exited"
            assert time.monotonic() < deadline, "gateway did not become healthy"
            time.sleep(0.1)
        headers = {"authorization": f"Bearer {DEMO_KEYS['acme']}"}
        body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=5)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"]
        denied = httpx.post(
            base + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {DEMO_KEYS['hobby']}"},
            timeout=5,
        )
        assert denied.status_code == 403
        # The fake upstream behind the demo answers only the gateway (its own random key).
        for fake_headers in ({}, headers):
            direct = httpx.post(
                base + DEMO_UPSTREAM_PATH + "/v1/chat/completions",
                json=body,
                headers=fake_headers,
                timeout=5,
            )
            assert direct.status_code == 401
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert f"{base}/v1" in output
    assert DEMO_KEYS["acme"] in output
    # The ledger went to a temporary directory, not where the demo was started.
    assert list(started_in.iterdir()) == []
    ledgers = list(temporary.glob("tenantware-demo-*/ledger.db"))
    assert len(ledgers) == 1
    assert f"ledger: sqlite:///{ledgers[0]}" in output
    # The request log is one JSON object per line (``--log-format json``, the default).
    request_lines = [line for line in output.splitlines() if '"event":"request"' in line]
    assert request_lines
    assert all(line.startswith("{") for line in request_lines)


def test_json_logging_renders_one_json_object_per_line() -> None:
    import io
    import json

    import structlog

    from tenantware.logs import configure_json_logging

    sink = io.BytesIO()
    configure_json_logging(sink)
    try:
        with structlog.contextvars.bound_contextvars(request_id="req_1"):
            structlog.get_logger("t").info("request", tenant_id="acme", cost_nanousd=48000)
    finally:
        structlog.reset_defaults()
    (line,) = sink.getvalue().decode().splitlines()
    event = json.loads(line)
    assert event["event"] == "request"
    assert event["request_id"] == "req_1"
    assert event["tenant_id"] == "acme"
    assert event["level"] == "info"
    assert event["timestamp"].endswith("Z")


def test_json_logging_carries_the_exception_text() -> None:
    import io
    import json

    import structlog

    from tenantware.logs import configure_json_logging

    sink = io.BytesIO()
    configure_json_logging(sink)
    try:
        try:
            raise OSError("disk full while writing the ledger")
        except OSError:
            structlog.get_logger("t").exception("usage ledger flush failed")
    finally:
        structlog.reset_defaults()
    (line,) = sink.getvalue().decode().splitlines()
    event = json.loads(line)
    assert event["event"] == "usage ledger flush failed"
    assert event["level"] == "error"
    assert "Traceback" in event["exception"]
    assert event["exception"].rstrip().endswith("OSError: disk full while writing the ledger")
    assert "exc_info" not in event


def test_request_lines_in_bulk_match_structlog_and_stop_when_structlog_is_reconfigured() -> None:
    import io
    import json

    import structlog

    from tenantware.logs import bulk_sink, configure_json_logging
    from tenantware.metering.telemetry import _request_fields, log_records, request_log
    from tests.test_ledger import make_records

    records = make_records(3)
    bulk, single = io.BytesIO(), io.BytesIO()
    try:
        configure_json_logging(single)
        # No logger caching: the module's cached request logger would outlive this test.
        structlog.configure(cache_logger_on_first_use=False)
        (sink,) = [bulk_sink()]
        assert sink is not None
        with structlog.testing.capture_logs() as captured:
            assert bulk_sink() is None  # someone else renders now: structlog's path
            log_records(records)
        assert [entry["request_id"] for entry in captured] == ["req-0", "req-1", "req-2"]
        for record in records:  # what structlog renders for one event...
            request_log.info("request", **_request_fields(record))
        sink.sink = bulk
        log_records(records)  # ...and what the bulk path writes for the batch
    finally:
        structlog.reset_defaults()
    assert bulk_sink() is None
    one_by_one = [json.loads(line) for line in single.getvalue().splitlines()]
    batched = [json.loads(line) for line in bulk.getvalue().splitlines()]
    assert len(batched) == 3
    for a, b in zip(one_by_one, batched, strict=True):
        assert a.pop("timestamp")[:16] == b.pop("timestamp")[:16]
        assert list(a) == list(b)  # same keys, same order
        assert a == b


def test_serve_ledger_option_is_for_the_demo_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ok.toml"
    path.write_text("")
    assert main(["serve", "--config", str(path), "--ledger", "memory://"]) == 2
    assert "metering.ledger_url" in capsys.readouterr().err
