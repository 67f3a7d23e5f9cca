"""A Python dataset factory as users write one: scikit-learn's bundled digits (1,797 real 8×8 images)."""

import numpy as np
import torch


class Digits(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.targets = images, labels.tolist()
        self.classes = [str(i) for i in range(10)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i][None] / 16.0).float(), self.targets[i]


def digits_splits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return {"train": Digits(d.images[:1500], d.target[:1500]), "test": Digits(d.images[1500:], d.target[1500:])}


def failing():
    raise RuntimeError("the dataset server is down")


class _Words(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return "hello", 0


def not_images():
    return {"train": _Words(), "test": _Words()}
