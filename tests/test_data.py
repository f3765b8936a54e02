"""vae/data.py: IDX encoding and the checks that keep bad bytes out."""
import numpy as np
import pytest

from vae.data import MNIST_FILES, DataError, decode_idx, encode_idx, read_idx, verify_file


def test_idx_round_trip_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    for name, array in [("images", images), ("labels", labels)]:
        path = tmp_path / name
        path.write_bytes(encode_idx(array))
        np.testing.assert_array_equal(read_idx(path), array)
    assert encode_idx(images)[:4] == b"\x00\x00\x08\x03"  # the official magic numbers
    assert encode_idx(labels)[:4] == b"\x00\x00\x08\x01"


def test_a_truncated_or_overlong_file_is_rejected_with_sizes():
    raw = encode_idx(np.zeros((3, 28, 28), dtype=np.uint8))
    truncated = r"train-images-idx3-ubyte: truncated: 2000 bytes, header \(3, 28, 28\) needs 2368"
    with pytest.raises(DataError, match=truncated):
        decode_idx(raw[:2000], "train-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"has trailing bytes: 2369 bytes, header \(3, 28, 28\) needs 2368"):
        decode_idx(raw + b"\0", "train-images-idx3-ubyte")
    with pytest.raises(DataError, match="shorter than an IDX header"):
        decode_idx(raw[:5], "x")


def test_wrong_magic_is_rejected():
    raw = bytearray(encode_idx(np.zeros(4, dtype=np.uint8)))
    raw[3] = 0x07
    with pytest.raises(DataError, match="not an MNIST IDX file: magic number 0x00000807"):
        decode_idx(bytes(raw))


def test_corrupted_file_names_file_and_both_hashes(tmp_path, mnist_dir):
    name = "t10k-labels-idx1-ubyte"
    corrupted = bytearray((mnist_dir / name).read_bytes())
    corrupted[100] ^= 0xFF  # one flipped label byte
    path = tmp_path / name
    path.write_bytes(bytes(corrupted))
    with pytest.raises(DataError) as error:
        verify_file(path)
    message = str(error.value)
    assert name in message and MNIST_FILES[name].sha256 in message
    assert "got " in message and message.count("sha256") == 1


def test_verified_files_load_with_the_official_shapes(mnist_dir):
    from vae.data import load_split

    images, labels = load_split(mnist_dir, "test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert labels.min() == 0 and labels.max() == 9
