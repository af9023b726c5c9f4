"""The Redis finder/starter behind `make test` and `make demo` (a private server, never 6379)."""

from __future__ import annotations

import sys

import pytest
import redis

from celery_fleet.testing import redis_server
from celery_fleet.testing.redis_server import RedisServer, answers, free_port


def test_private_server_starts_answers_and_stops() -> None:
    server = RedisServer().start()
    try:
        assert server.port != 6379 and answers(server.url)
        client = redis.Redis.from_url(server.url)
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
    finally:
        server.stop()
    assert not answers(server.url)


def test_main_runs_the_command_with_redis_url(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with RedisServer() as server:
        monkeypatch.setenv("REDIS_URL", server.url)
        out = tmp_path / "url"
        code = redis_server.main(
            [
                "--",
                sys.executable,
                "-c",
                f"import os; open({str(out)!r}, 'w').write(os.environ['REDIS_URL'])",
            ]
        )
        assert code == 0 and out.read_text() == server.url


def test_main_refuses_a_redis_url_that_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}")
    assert redis_server.main(["--", sys.executable, "-c", "pass"]) == 1


def test_main_starts_a_private_redis_when_none_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """What `make test` does on a fresh machine: nothing on 6379, no REDIS_URL."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(redis_server, "DEFAULT_URL", f"redis://127.0.0.1:{free_port()}")
    out = tmp_path / "seen"
    probe = (
        "import os, redis; url = os.environ['REDIS_URL']; "
        f"open({str(out)!r}, 'w').write(url + ' ' + str(redis.Redis.from_url(url).ping()))"
    )
    assert redis_server.main(["--", sys.executable, "-c", probe]) == 0
    url, pong = out.read_text().split()
    assert pong == "True" and url != redis_server.DEFAULT_URL
    assert not answers(url)  # stopped again afterwards
