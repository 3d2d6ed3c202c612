"""Storage errors (docs/design.md §4, invariants 5 and 6): transient failures are retried with backoff,
permanent ones fail at once with a one-line StorageError, unreachable outputs fail fast."""

from __future__ import annotations

import errno
import socket
import time

import aiohttp
import fsspec
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from fsspec.implementations.memory import MemoryFileSystem

from cytosynth.storage import (
    Retry,
    ShardWriter,
    StorageError,
    committed_shards,
    ensure_writable,
    is_transient,
    read_samples,
    retrying,
)

FAST = Retry(attempts=4, base_delay=0.001, max_delay=0.01)


class FlakyFileSystem(MemoryFileSystem):
    """``flaky://``: an in-memory store whose writes fail with ``error`` the next ``failures`` times."""

    protocol = "flaky"
    store: dict = {}  # its own store, not memory://'s
    pseudo_dirs = [""]
    failures = 0
    error: Exception = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    writes = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).replace("flaky://", "memory://", 1))

    def pipe_file(self, path, value, *args, **kwargs):
        type(self).writes += 1
        if type(self).failures > 0:
            type(self).failures -= 1
            raise type(self).error
        return super().pipe_file(path, value, *args, **kwargs)


@pytest.fixture
def flaky():
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.store.clear()
    FlakyFileSystem.failures, FlakyFileSystem.writes = 0, 0
    yield FlakyFileSystem
    FlakyFileSystem.error = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _wrapped(cause: BaseException) -> OSError:
    # What s3fs raises: a plain OSError whose __cause__ is the botocore error.
    err = OSError(errno.EIO, str(cause))
    err.__cause__ = cause
    return err


@pytest.mark.parametrize("error", [
    ConnectionResetError(errno.ECONNRESET, "reset"),
    TimeoutError("timed out"),
    OSError(errno.EBUSY, "Please reduce your request rate."),  # s3fs' SlowDown
    _client_error("SlowDown", 503),
    _client_error("InternalError", 500),
    _wrapped(_client_error("ServiceUnavailable", 503)),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    aiohttp.ServerDisconnectedError(),
], ids=repr)
def test_transient_errors_are_recognised(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    FileNotFoundError(errno.ENOENT, "The specified bucket does not exist"),
    PermissionError(errno.EACCES, "Access Denied"),
    _client_error("AccessDenied", 403),
    _wrapped(_client_error("NoSuchBucket", 404)),
    ValueError("bad input"),
], ids=repr)
def test_permanent_errors_are_not_retried(error):
    assert not is_transient(error)
    calls = []

    def fail():
        calls.append(1)
        raise error

    with pytest.raises(StorageError):
        retrying(fail, "s3://bucket/x", policy=FAST)
    assert len(calls) == 1


def test_retrying_backs_off_exponentially(monkeypatch):
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    attempts = iter([TimeoutError("t1"), TimeoutError("t2"), TimeoutError("t3")])

    def flaky_call():
        error = next(attempts, None)
        if error:
            raise error
        return "ok"

    assert retrying(flaky_call, "memory://x", policy=Retry(attempts=4, base_delay=1.0, max_delay=3.0)) == "ok"
    assert len(sleeps) == 3
    # base * 2**i capped at max_delay, jittered down by at most half
    for sleep, nominal in zip(sleeps, [1.0, 2.0, 3.0]):
        assert nominal / 2 <= sleep <= nominal


def test_flaky_store_is_retried_and_the_shard_commits(flaky, make_tile):
    flaky.failures = 2
    writer = ShardWriter("flaky://out", 0, retry=FAST)
    writer.add(0, *make_tile(0))
    writer.commit()
    assert flaky.writes == 4  # tar: 2 failures + 1 success, then the marker
    assert committed_shards("flaky://out") == {0}
    assert [s["key"] for s in read_samples("flaky://out")] == ["000000000"]


def test_persistent_failure_raises_one_line_storage_error(flaky, make_tile):
    flaky.failures = 100
    writer = ShardWriter("flaky://out", 3, retry=FAST)
    writer.add(30, *make_tile(30))
    with pytest.raises(StorageError) as failure:
        writer.commit()
    message = str(failure.value)
    assert message.startswith("cannot write flaky://out/shards/000003.tar after 4 attempts")
    assert "ConnectionResetError" in message and "\n" not in message
    assert flaky.writes == 4
    assert committed_shards("flaky://out") == set()


def test_storage_error_messages_hide_url_passwords():
    def fail():
        raise ConnectionRefusedError("refused by sftp://user:pa55word@host/out")

    with pytest.raises(StorageError) as failure:
        retrying(fail, "sftp://user:pa55word@host/out", policy=Retry(attempts=1))
    assert "pa55word" not in str(failure.value) and "sftp://***@host/out" in str(failure.value)


def test_ensure_writable_accepts_good_outputs(tmp_path, s3_bucket):
    ensure_writable(str(tmp_path / "new" / "out"))
    ensure_writable(s3_bucket + "/out")
    ensure_writable("memory://somewhere/out")
    assert list((tmp_path / "new" / "out").iterdir()) == []  # the probe is removed


def _assert_one_line_storage_error(url):
    # How fast it fails is a benchmark matter (bench/, never a test): the probe's own timeout and
    # single attempt are what make it fast, and a slow machine must not fail this test.
    with pytest.raises(StorageError) as failure:
        ensure_writable(url, timeout=2)
    message = str(failure.value)
    assert message.startswith(f"output {url} is not writable: ") and "\n" not in message
    return message


def test_ensure_writable_rejects_a_local_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    _assert_one_line_storage_error(str(tmp_path / "file" / "out"))


def test_ensure_writable_rejects_a_missing_bucket(s3_bucket):
    message = _assert_one_line_storage_error(s3_bucket + "-missing/out")
    assert "FileNotFoundError" in message


def test_ensure_writable_fails_fast_when_the_endpoint_is_down(s3_bucket, monkeypatch):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    message = _assert_one_line_storage_error(s3_bucket + "/out")
    assert "EndpointConnectionError" in message
