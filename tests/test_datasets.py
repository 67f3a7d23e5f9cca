"""--data forms on real images: Fashion-MNIST as an image folder, scikit-learn's digits as .npz and as a Python
dataset; preprocessing; and the one-line errors for bad data."""

import numpy as np
import pytest
import torch

from pfq_edge.datasets import load_dataset, make_spec
from pfq_edge.datasets.preprocess import Preprocess
from pfq_edge.errors import DataError
from userdata import FOLDER_CLASSES, digits_npz, fashion_folder


@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    return fashion_folder(tmp_path_factory.mktemp("grey"), 12, 4)


def test_image_folder_classes_counts_and_pixels(grey_folder, test_split):
    ds = load_dataset(make_spec(str(grey_folder)), validation_images=6)
    assert ds.classes == tuple(sorted(FOLDER_CLASSES)) and ds.shape == (1, 28, 28)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54, 6, 20)
    assert ds.record["images"] == {"train": 54, "validation": 6, "test": 20} and len(ds.record["sha256"]) == 64
    assert ds.train.streamed and ds.test.take(3).images.shape == (3, 1, 28, 28)
    # PNG round trip: the folder's pixels are Fashion-MNIST's (the first T-shirt of the test split, label 0)
    first = test_split.images[(test_split.labels == 0).nonzero()[0, 0]]
    tshirt = ds.classes.index("T-shirt-top")
    images = ds.test.take(len(ds.test))
    picked = images.images[images.labels == tshirt]
    assert min(float((p - first).abs().max()) for p in picked) <= 0.5 / 255 + 1e-6
    # the fixed shuffle mixes the classes: the first 10 test images are not all one class
    assert len(set(ds.test.labels[:10].tolist())) > 1


def test_image_folder_resize_and_rgb(grey_folder):
    ds = load_dataset(make_spec(str(grey_folder), image_size=(32,), channels=3))
    x = ds.test.take(2).images
    assert ds.shape == (3, 32, 32) and x.shape == (2, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and 0 <= float(x.min()) and float(x.max()) <= 1
    crop = load_dataset(make_spec(str(grey_folder), image_size=(20, 16), center_crop=True))
    assert crop.shape == (1, 20, 16)


def test_digits_npz(tmp_path):
    ds = load_dataset(make_spec(str(digits_npz(tmp_path / "digits.npz"))))
    assert ds.shape == (1, 8, 8) and ds.classes == tuple(str(i) for i in range(10))
    assert (len(ds.train), len(ds.test)) == (1500, 297) and not ds.train.streamed
    assert float(ds.train.images.max()) == 1.0 and ds.record["kind"] == "arrays"
    # the same labels, reordered by the fixed shuffle
    from sklearn.datasets import load_digits

    assert sorted(ds.test.labels.tolist()) == sorted(load_digits().target[1500:].tolist())


def test_python_dataset_and_toml(tmp_path):  # examples/userland is on sys.path (conftest.py)
    ds = load_dataset(make_spec("user_datasets:digits_splits"))
    assert ds.shape == (1, 8, 8) and len(ds.test) == 297 and ds.train.streamed and len(ds.classes) == 10
    toml = tmp_path / "data.toml"
    digits_npz(tmp_path / "d.npz")
    toml.write_text('[data]\nsource = "d.npz"\nimage_size = [16, 16]\nchannels = 3\nmean = [0.5]\nstd = [0.25]\n')
    spec = make_spec(str(toml))
    ds = load_dataset(spec)
    assert ds.shape == (3, 16, 16) and ds.normalization == ((0.5,) * 3, (0.25,) * 3)
    assert make_spec(str(toml), image_size=(8, 8)).preprocess.image_size == (8, 8)  # options override the file


def test_preprocess_matches_the_packaged_run_py():
    from PIL import Image

    from pfq_edge.export.device.run import preprocess_image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    for size, crop in (((24, 24), False), ((24, 30), True), (None, False)):
        pre = Preprocess(image_size=size, center_crop=crop, channels=1)
        ours = pre.pil(im).numpy()
        theirs = preprocess_image(im, 1, size, crop)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs)


def _write_png(path, size=(28, 28), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


@pytest.mark.parametrize("case", ["no-folder", "no-test", "empty-class", "not-an-image", "mixed-sizes",
                                  "truncated"])
def test_bad_image_folders(tmp_path, case):
    root = tmp_path / "d"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            _write_png(root / split / cls / "0.png")
    expect = {"no-folder": "no such folder", "no-test": "no test/ folder", "empty-class": "holds no images",
              "not-an-image": "bad.png", "mixed-sizes": "--image-size", "truncated": "cut.png"}[case]
    source = str(root)
    if case == "no-folder":
        source = str(tmp_path / "missing")
    elif case == "no-test":
        import shutil

        shutil.rmtree(root / "test")
    elif case == "empty-class":
        (root / "train" / "c").mkdir()
    elif case == "not-an-image":
        (root / "train" / "a" / "bad.png").write_bytes(b"not a png")
    elif case == "mixed-sizes":
        _write_png(root / "train" / "b" / "1.png", (30, 28))
    elif case == "truncated":
        data = (root / "test" / "a" / "0.png").read_bytes()
        (root / "test" / "a" / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=expect) as err:
        ds = load_dataset(make_spec(source))
        ds.test.take(len(ds.test))  # a truncated image is found when it is decoded, named
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["nan", "label-range", "range", "missing-key", "shape"])
def test_bad_arrays(tmp_path, case):
    x = np.zeros((10, 8, 8), np.float32)
    y = np.arange(10) % 3
    arrays = {"x_train": x, "y_train": y, "x_test": x[:4], "y_test": y[:4], "classes": np.array(["a", "b", "c"])}
    expect = {"nan": "NaN", "label-range": "label 7", "range": r"\[0, 1\]", "missing-key": "y_test",
              "shape": "expected \\(N, H, W\\)"}[case]
    if case == "nan":
        arrays["x_train"] = x.copy()
        arrays["x_train"][3, 2, 2] = np.nan
    elif case == "label-range":
        arrays["y_test"] = np.array([0, 1, 7, 2])
    elif case == "range":
        arrays["x_test"] = x[:4] - 0.5
    elif case == "missing-key":
        del arrays["y_test"]
    elif case == "shape":
        arrays["x_train"] = np.zeros((10, 8), np.float32)
    np.savez(tmp_path / "a.npz", **arrays)
    with pytest.raises(DataError, match=expect):
        load_dataset(make_spec(str(tmp_path / "a.npz")))


def test_bad_options_and_factories():
    with pytest.raises(DataError, match="the dataset server is down"):
        load_dataset(make_spec("user_datasets:failing"))
    with pytest.raises(DataError, match="mean and std"):
        make_spec(None, mean=(0.5,))
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        make_spec(None, channels=2)


def test_scalar_and_broadcast_mean_std(tmp_path):
    digits_npz(tmp_path / "d.npz")
    toml = tmp_path / "data.toml"
    toml.write_text('source = "d.npz"\nchannels = 3\nmean = 0.3\nstd = [0.2, 0.2, 0.2]\n')
    assert load_dataset(make_spec(str(toml))).normalization == ((0.3,) * 3, (0.2,) * 3)
    with pytest.raises(DataError, match="give 2 values; the images have 3 channel"):
        load_dataset(make_spec(str(toml), mean=(0.1, 0.2), std=(0.2, 0.2)))
    with pytest.raises(DataError, match="^data options: give mean and std together$"):
        make_spec(None, mean=(0.5,))


def test_a_dataset_item_that_is_not_an_image():
    with pytest.raises(DataError, match="item 0 holds a str as its image"):
        load_dataset(make_spec("user_datasets:not_images"))


def test_inferred_class_count_is_said(tmp_path):
    from pfq_edge.compilation import InputSpec
    from pfq_edge.steps import check_data_fits
    from user_models import digits_net

    d = np.load(digits_npz(tmp_path / "d.npz"))
    arrays = {k: d[k] for k in d.files if k != "classes"}
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][5] = 12
    np.savez(tmp_path / "bad.npz", **arrays)
    ds = load_dataset(make_spec(str(tmp_path / "bad.npz")))
    spec = InputSpec(ds.shape, ds.classes)
    with pytest.raises(DataError, match=r"13 classes .*inferred from the labels .*largest label, 12, is in y_test"):
        check_data_fits(digits_net(), "digits", spec, ds)


def test_default_data_is_named_when_it_does_not_fit(test_split):
    from pfq_edge.compilation import InputSpec
    from pfq_edge.steps import check_data_fits
    from user_models import rgb_net

    ds = load_dataset(make_spec(None))
    with pytest.raises(DataError, match="pass --channels 3; this is the default data, Fashion-MNIST: pass your"):
        check_data_fits(rgb_net(), "rgb", InputSpec(ds.shape, ds.classes), ds)


def test_model_arg_of_the_wrong_type_is_not_called_a_wrong_name():
    from pfq_edge.errors import ModelError
    from pfq_edge.zoo import load_model

    with pytest.raises(ModelError, match="failed") as err:
        load_model("user_models:rgb_net", model_args={"num_classes": "3"})
    assert "does not take" not in str(err.value)
    with pytest.raises(ModelError, match=r"does not take \['depth'\]"):
        load_model("user_models:rgb_net", model_args={"depth": 3})
