"""Data that is not what it seems (issue 18, item 4): each case builds a tiny input, runs the loader or `cli.py`
in-process, and checks the exit status, that no traceback was printed (a refusal is one `qreg: error` line
naming the file and the fix) and the files afterwards (no results rows, no stale cache served).

- ImageFolder: an empty class folder is refused; .webp (any type Pillow opens) is read; a 16-bit PNG is scaled
  to 8 bits, not clipped; each split prints its per-class counts.
- YOLO layout: a set without label files is refused before a run folder is written; a split with no ground
  truth never yields a -100 mAP row.
- Text files: a Latin-1 config or label file is one line, not a UnicodeDecodeError.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "qreg-yolo-settings"))
os.environ.setdefault("YOLO_OFFLINE", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import run_cli  # noqa: E402
from datamodules import CIFAR10DataModule, DataError, VOCDataModule  # noqa: E402
from datamodules.cifar import CIFAR10_CLASSES, list_image_folder, load_image_folder  # noqa: E402
from datamodules.corruptions.splits import CorruptedTest  # noqa: E402
from datamodules.yolo_format import parse_yolo_labels  # noqa: E402
from records.store import read_rows  # noqa: E402

NO_CORRUPTIONS = ["--data.init_args.corrupted_test.corruptions", "[]"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.unit]  # YOLO on 2 shared cores (conftest)


def image_folder(root: Path, per_class: int = 2, suffix: dict[str, str] | None = None) -> Path:
    """`root/{train,test}/<class>/<i>.png` of random 32x32 pixels; `suffix` maps a class to another type."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            (root / split / name).mkdir(parents=True)
            ext = (suffix or {}).get(name, ".png")
            options = {"lossless": True} if ext == ".webp" else {}
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}{ext}", **options)
    return root


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("qreg: error")]
    assert len(errors) == 1, err
    return errors[0]


def nothing_written(run: Path) -> None:
    """No run folder content of significance: no config, checkpoints or results rows."""
    for name in ("results.jsonl", "checkpoints", "config.yaml", "metrics.jsonl", "predictions.npz"):
        assert not (run / name).exists(), name


def cifar_fit(root: Path, run: Path) -> list[str]:
    return ["fit", "--data", "CIFAR10DataModule", "--data.init_args.root", str(root), "--model", "ClassificationModule",
            "--data.init_args.val_size", "2", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run),
            *QUIET, *NO_CORRUPTIONS, "--flatness.enabled", "false"]


# ------------------------------------------------------------------------------------------------ ImageFolder
def test_an_empty_class_folder_is_refused_before_a_run_folder_is_written(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    for file in (root / "test" / "cat").iterdir():
        file.unlink()
    (root / "test" / "cat" / "notes.txt").write_text("the cats are elsewhere")
    run = tmp_path / "run"
    assert run_cli(*cifar_fit(root, run)) == 2
    line = one_error_line(capsys)
    assert f"class folder {root / 'test' / 'cat'} has no images (only 1 other files, e.g. notes.txt)" in line
    nothing_written(run)


def test_webp_images_are_read_and_a_newly_accepted_file_is_not_served_from_the_cache(tmp_path):
    root = image_folder(tmp_path, per_class=3, suffix={"cat": ".webp"})
    images, labels = load_image_folder(root / "test", list(CIFAR10_CLASSES))
    assert np.bincount(labels).tolist() == [3] * 10  # 30 of 30: the .webp class is there
    cat = CIFAR10_CLASSES.index("cat")
    lossless = np.asarray(Image.open(root / "test" / "cat" / "0.webp").convert("RGB"))
    assert np.array_equal(images[np.flatnonzero(labels == cat)[0]], lossless)
    # another accepted file changes the cache key: the next load decodes it rather than serving the old array
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "cat" / "3.bmp")
    again, labels = load_image_folder(root / "test", list(CIFAR10_CLASSES))
    assert len(again) == 31 and np.bincount(labels)[cat] == 4
    assert len(list((root / ".qreg-cache").glob("test-*.npy"))) == 2


def test_an_image_file_that_does_not_decode_is_named(tmp_path):
    root = image_folder(tmp_path)
    (root / "train" / "dog" / "2.webp").write_bytes(b"RIFF not a webp")
    with pytest.raises(DataError, match=r"cannot decode image .*dog/2\.webp.*remove or replace it"):
        load_image_folder(root / "train", list(CIFAR10_CLASSES))


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    root = image_folder(tmp_path)
    values = np.array([0, 128, 129, 385, 386, 32767, 65406, 65407, 65535], dtype=np.uint16)
    grey = np.resize(values, (32, 32)).astype(np.uint16)
    grey[1:] = np.linspace(0, 65535, 31 * 32).reshape(31, 32)  # the whole 16-bit range
    path = root / "test" / "bird" / "0.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode == "I;16"  # what Pillow reads a 16-bit greyscale PNG as
    images, labels = load_image_folder(root / "test", list(CIFAR10_CLASSES))
    decoded = images[np.flatnonzero(labels == CIFAR10_CLASSES.index("bird"))[0]]
    expected = np.rint(grey / 257.0).astype(np.uint8)  # 65535 -> 255, 32767 -> 127, 128 -> 0, 129 -> 1
    assert np.array_equal(decoded, np.repeat(expected[..., None], 3, axis=2))
    assert decoded[0, :9, 0].tolist() == [0, 0, 1, 1, 2, 127, 254, 255, 255]
    assert (decoded == 255).mean() < 0.01  # clipped, 99.6 % of these pixels were 255


def test_each_split_prints_how_many_images_of_each_class_were_read(tmp_path, capsys):
    root = image_folder(tmp_path, per_class=3)
    (root / "test" / "airplane" / "2.png").unlink()
    (root / "test" / "ship" / "._0.png").write_bytes(b"macOS resource fork")  # hidden: never an image
    data = CIFAR10DataModule(root=str(root), val_size=5, corrupted_test=CorruptedTest([]))
    data.setup("test")
    lines = capsys.readouterr().out.splitlines()
    assert "train: 10 classes, 30 images (3 each)" in lines
    test = next(line for line in lines if line.startswith("test:"))
    assert test.startswith("test: 10 classes, 29 images (airplane 2, automobile 3, bird 3, ")
    assert test.endswith("; ignored 1 other files (not images Pillow opens, or hidden), e.g. test/ship/._0.png")
    assert len(data.test_sets["clean"]) == 29
    listing = list_image_folder(root / "test", list(CIFAR10_CLASSES))
    assert listing.summary() == test


# ------------------------------------------------------------------------------------------------ YOLO layout
def yolo_folder(root: Path, labels: dict[str, str]) -> Path:
    """images/train/{a,b}.jpg; `labels` maps a stem to its label file's text (a stem left out has none)."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for stem in ("a", "b"):
        Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(root / "images" / "train" / f"{stem}.jpg")
    for stem, text in labels.items():
        (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    return root


def yolo_args(root: Path, run: Path, command: str = "fit", *extra: str) -> list[str]:
    return [command, "--data", "VOCDataModule", "--model", "DetectionModule", "--data.init_args.root", str(root),
            "--data.init_args.class_names", "2", "--data.init_args.train_sets", "[train]",
            "--data.init_args.val_sets", "[train]", "--data.init_args.test_sets", "[train]",
            "--data.init_args.image_size", "64", "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(run), *QUIET, *NO_CORRUPTIONS, *extra]


def test_yolo_images_without_any_label_file_are_refused_with_no_results(tmp_path, capsys):
    root = yolo_folder(tmp_path / "yolo", labels={})
    run = tmp_path / "run"
    assert run_cli(*yolo_args(root, run)) == 2
    line = one_error_line(capsys)
    assert (f"none of the 2 images in {root / 'images' / 'train'} has a label file: expected "
            f"{root / 'labels' / 'train'}/<image name>.txt") in line
    nothing_written(run)


def test_yolo_images_without_a_labels_folder_name_it(tmp_path):
    root = yolo_folder(tmp_path / "yolo", labels={})
    (root / "labels" / "train").rmdir()
    (root / "labels").rmdir()
    with pytest.raises(DataError, match="has images/ but no labels/"):
        VOCDataModule(str(root), train_sets=["train"], val_sets=["train"], test_sets=["train"], class_names=2)


def test_yolo_images_without_labels_among_labelled_ones_warn_once_with_the_count(tmp_path):
    root = yolo_folder(tmp_path / "yolo", labels={"a": "0 0.5 0.5 0.2 0.2\n"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        VOCDataModule(str(root), train_sets=["train"], val_sets=["train"], test_sets=["train"], class_names=2)
    messages = [str(w.message) for w in caught if "label file" in str(w.message)]
    assert messages == [f"1 of the 2 images in {root / 'images' / 'train'} have no label file in "
                        f"{root / 'labels' / 'train'}: they are read as background images (no objects)"]


def test_an_evaluation_set_with_no_objects_is_refused_before_training(tmp_path, capsys):
    root = yolo_folder(tmp_path / "yolo", labels={"a": "", "b": "\n"})  # label files, all empty
    run = tmp_path / "run"
    assert run_cli(*yolo_args(root, run)) == 2
    assert "the val set (2 images) has no labelled objects" in one_error_line(capsys)
    nothing_written(run)


def test_a_split_with_no_ground_truth_never_stores_a_minus_100_map(tmp_path):
    """COCO evaluation returns -1 for "no ground truth"; the module leaves such a split out instead of storing
    -100. Reached at run time when the images holding every object fail to decode (on_bad_image: skip)."""
    from torchmetrics.detection import MeanAveragePrecision

    from callbacks.results import ResultsCallback
    from lightning_modules import DetectionModule
    from lightning_modules.detection import map_percent

    found = [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
    one_object = [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([0])}]
    no_object = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    metric.update(found, no_object)
    scores = metric.compute()
    assert scores["map_50"].item() == -1.0 and map_percent(scores) is None
    module = DetectionModule(model="yolov5n", num_classes=2)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(test_split_names=["clean", "fog/3"]), is_global_zero=True,
                              default_root_dir=str(tmp_path), current_epoch=0, global_step=0, callbacks=[], loggers=[])
    module._trainer = trainer
    module.on_test_epoch_start()
    module._test_split = 0
    module.test_map.update(found, one_object)
    module._finish_test_split()  # clean: one object, found
    module._test_split = 1
    module.test_map.update(found, no_object)  # fog/3: the images holding objects were skipped
    with pytest.warns(UserWarning, match="test split fog/3: .* no ground-truth objects"):
        module._finish_test_split()
    assert module.test_results == {"clean": {"map50": 100.0, "map50_95": 100.0}}
    callback = ResultsCallback()
    callback.on_test_end(trainer, module)
    rows = read_rows(tmp_path / "results.jsonl")
    assert {(row["corruption"], row["metric"]) for row in rows} == {("clean", "map50"), ("clean", "map50_95")}
    assert all(row["value"] >= 0 for row in rows)
    logged = []  # validation likewise logs no val/map50 rather than -100
    module.log = lambda name, value, **kwargs: logged.append((name, value))
    module.val_map.update(found, no_object)
    with pytest.warns(UserWarning, match="validation images scored have no ground-truth objects"):
        module.on_validation_epoch_end()
    module.val_map.update(found, one_object)
    module.on_validation_epoch_end()
    assert logged == [("val/map50", 100.0), ("val/map50_95", 100.0)]


# ------------------------------------------------------------------------------------------------ text files
def test_a_latin1_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("# données du café\ntrainer:\n  max_epochs: 1\n".encode("latin-1"))
    run = tmp_path / "run"
    for form in (["--config", str(config)], [f"--config={config}"]):
        assert run_cli("fit", *form, "--trainer.default_root_dir", str(run)) == 2
        line = one_error_line(capsys)
        assert line == f"qreg: error: config file {config} is not UTF-8 text (byte 6 is 0xe9); save it as UTF-8"
    assert not run.exists()


def test_a_latin1_label_file_is_a_data_error(tmp_path):
    label = tmp_path / "a.txt"
    label.write_bytes("0 0.5 0.5 0.2 0.2 # été\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"label file .*a\.txt is not UTF-8 text \(byte 20\); save it as UTF-8"):
        parse_yolo_labels(label, 2)
