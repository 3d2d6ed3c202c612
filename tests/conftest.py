"""Shared pytest fixtures.

S3 without a network: ``s3_server`` runs moto's ``ThreadedMotoServer`` on 127.0.0.1 (a random free
port) once per session, the way s3fs tests itself; ``s3_bucket`` gives each test a fresh bucket and
points every AWS client at that server. Use them like this::

    def test_something(s3_bucket):            # s3_bucket == "s3://test-<random>"
        out = s3_bucket + "/run1"             # any s3:// URL under it works with fsspec/s3fs,
        fs, path = filesystem(out)            # cytosynth.storage picks up AWS_ENDPOINT_URL

    def test_raw(s3_server):                  # the endpoint URL, "http://127.0.0.1:<port>"
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, key="testing", secret="testing")

``storage_root`` runs a test once per backend (local folder, ``memory://``, moto ``s3://``) and
``make_tile`` builds a small tile image plus a valid sample annotation.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

import numpy as np
import pytest

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Remote model bundles are cached under a session folder, never in the user's ~/.cache
    (set before any Ray starts, so replicas inherit it)."""
    with pytest.MonkeyPatch.context() as env:
        folder = str(tmp_path_factory.mktemp("model-cache"))
        env.setenv("CYTOSYNTH_CACHE", folder)
        yield folder


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server living for the whole session."""
    moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh empty bucket on ``s3_server``; returns ``"s3://<bucket>"``.

    For the test's duration AWS_ENDPOINT_URL points at the server, fake credentials are set, and
    the user's real AWS config files and profile are hidden.
    """
    s3fs = pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Cached instances may carry another test's endpoint or credentials.
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(params=["local", "memory", "s3"])
def storage_root(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """An empty output URL on each backend in turn: a local folder, ``memory://``, moto ``s3://``."""
    if request.param == "local":
        yield str(tmp_path / "out")
    elif request.param == "memory":
        import fsspec

        url = f"memory://test-{uuid.uuid4().hex}/out"
        yield url
        fs = fsspec.filesystem("memory")
        root = url.removeprefix("memory://").split("/")[0]
        if fs.exists(root):
            fs.rm(root, recursive=True)
    else:
        yield request.getfixturevalue("s3_bucket") + "/out"


@pytest.fixture
def make_tile() -> Callable[..., tuple[np.ndarray, dict[str, Any]]]:
    """Factory ``make_tile(tile_index, size=64, boxes=None, labels=None) -> (image, annotation)``.

    The image is seeded by ``tile_index`` (different tiles, same bytes on every call); the
    annotation follows docs/design.md §3, with one ASC-US box by default.
    """

    def make(
        tile_index: int,
        size: int = 64,
        boxes: list[list[int]] | None = None,
        labels: list[str] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        image = np.random.default_rng(tile_index).integers(0, 256, (size, size, 3), dtype=np.uint8)
        boxes = [[4, 6, 20, 30]] if boxes is None else boxes
        labels = ["ASC-US"] * len(boxes) if labels is None else labels
        annotation = {
            "tile_index": tile_index,
            "seed": 1000 + tile_index,
            "width": size,
            "height": size,
            "boxes": boxes,
            "labels": labels,
            "normal_boxes": [[30, 30, 40, 44]],
            "source": "synthetic",
            "params": {"steps": 25},
            "models": {"unet": "tiny"},
        }
        return image, annotation

    return make


# --------------------------------------------------------------------------- scheduling

# The suite runs a file at a time on each of 2 xdist workers (--dist loadfile), handed out in
# collection order (--no-loadscope-reorder: xdist would sort them by test count). The files that
# take minutes (Ray clusters, DeepSpeed runs) go first, longest first, so that neither worker is
# left with one of them at the end while the other idles.
LONGEST_FILES_FIRST = (  # seconds each took in a run of the whole suite, 2026-12-08
    "test_distributed.py",  # 460
    "test_train_detector.py",  # 284
    "test_generate_job.py",  # 209
    "test_finetune_normal.py",  # 177
    "test_model_selection.py",  # 103
    "test_finetune_abnormal.py",  # 100
    "test_training_harness.py",  # 98
    "test_autoscaling.py",  # 90
    "test_fid_job.py",  # 89
    "test_readme_commands.py",  # 84
    "test_driver_imports.py",  # 45
    "test_storage_readers.py",  # 43
    "test_eval_detector.py",  # 43
    "test_detector_arch.py",  # 39
    "test_miniature.py",  # 39
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


# --------------------------------------------------------------------------- ending the session

_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the process with pytest's own status once everything is reported.

    After the last test, the interpreter's teardown of native extensions loaded in this process
    (Ray's driver threads, DeepSpeed's compiled ops, s3fs' event-loop thread) crashed once with
    SIGSEGV after every test had passed (CI exit 139). Nothing is left to report by now, so skip
    that teardown rather than let it decide the exit code.
    """
    import os
    import sys

    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])


def one_error_line(capsys, *fragments: str) -> str:
    """What the CLI printed to stderr: one `error:` line, no traceback, holding each fragment."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def as_markers_before_image_offsets(out_url: str, shards: list[int] | None = None) -> None:
    """Rewrite the commit markers of ``out_url`` (``shards``, default all committed) as cytosynth
    wrote them before their sample rows recorded ``image_offset``: an older version's output."""
    from cytosynth import storage
    from cytosynth.storage.jsonio import json_bytes

    for index in sorted(storage.committed_shards(out_url)) if shards is None else shards:
        stats = storage.read_shard_stats(out_url, index)
        stats["samples"] = [{k: v for k, v in row.items() if k != "image_offset"} for row in stats["samples"]]
        storage.put_bytes(storage.stats_url(out_url, index), json_bytes(stats))
