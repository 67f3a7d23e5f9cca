import gzip

import pytest
import torch

from pfq_edge.data import load_split, read_idx
from pfq_edge.errors import DataError


def test_test_split_is_real_fashion_mnist(test_split):
    assert test_split.images.shape == (10000, 1, 28, 28)
    assert test_split.images.dtype == torch.float32
    assert test_split.labels.shape == (10000,) and test_split.labels.dtype == torch.int64
    assert float(test_split.images.min()) == 0.0 and float(test_split.images.max()) == 1.0
    # Fashion-MNIST's test set is balanced: 1,000 images per class
    assert torch.bincount(test_split.labels).tolist() == [1000] * 10


def test_missing_dataset_names_the_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_split("test", tmp_path)


def test_truncated_idx_file_is_rejected(tmp_path):
    src = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    raw = gzip.open(src).read()
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match="header declares"):
        read_idx(tmp_path / "bad.gz")


def test_non_idx_file_is_rejected(tmp_path):
    (tmp_path / "x").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(tmp_path / "x")
