"""Small correctness debts from the audit (issue 18, item 6): the measurement images come shuffled, the report
names the corruption sets its measures are over, and a non-editable install holds every package `cli.py`
imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from conftest import REPO
from datamodules.base import ArrayImageDataset
from datamodules.subsets import stratified_indices
from records.splits import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS
from records.store import append_rows


# ------------------------------------------------------------------------------ measurement images, shuffled
def class_ordered(classes: int = 10, per_class: int = 100) -> SimpleNamespace:
    """A DataModule-like object over a class-ordered training set, as an image folder gives."""
    labels = np.repeat(np.arange(classes), per_class)
    images = np.zeros((len(labels), 4, 4, 3), dtype=np.uint8)
    return SimpleNamespace(train_set=ArrayImageDataset(images, labels), split_seed=0,
                           normalize=lambda pixels: pixels.float())


def test_measurement_images_are_shuffled_so_the_first_batch_holds_every_class():
    """Eq. 4's term takes the first batch of the measurement images (128 of 256): drawn sorted, on class-ordered
    data it saw classes 0-4 only."""
    from callbacks.flatness import training_batches

    batches = training_batches(class_ordered(), 256, 128, torch.device("cpu"))
    first = batches[0][1].numpy()
    assert len(first) == 128 and set(first.tolist()) == set(range(10))
    every = np.concatenate([labels.numpy() for _, labels in batches])
    assert np.bincount(every).tolist() == [26] * 6 + [25] * 4  # still stratified: 256 over 10 classes
    again = training_batches(class_ordered(), 256, 128, torch.device("cpu"))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))  # seeded: every run the same


def test_shuffled_draw_is_the_sorted_draw_reordered_and_evaluation_subsets_stay_sorted():
    labels = np.repeat(np.arange(10), 50)
    sorted_draw = stratified_indices(labels, 120, seed=3)
    shuffled = stratified_indices(labels, 120, seed=3, shuffle=True)
    assert np.array_equal(np.sort(shuffled), sorted_draw) and not np.array_equal(shuffled, sorted_draw)
    assert np.array_equal(shuffled, stratified_indices(labels, 120, seed=3, shuffle=True))
    assert np.all(np.diff(sorted_draw) > 0)  # test_subset / val_subset: the set's order, as stored records expect
    whole = stratified_indices(labels, 10_000, seed=3, shuffle=True)
    assert sorted(whole.tolist()) == list(range(500)) and not np.array_equal(whole, np.arange(500))


def test_report_no_longer_says_the_first_training_images():
    from study.report.markdown import MECHANISM_TEXT

    assert "first training images" not in MECHANISM_TEXT
    assert "class-stratified" in MECHANISM_TEXT and "shuffled" in MECHANISM_TEXT


# ------------------------------------------------------------------------- the corruption sets, named
def store(folder: Path, corruptions: tuple[str, ...]) -> Path:
    rows = []
    for run, method, bits, clean, level in (("fp32-seed0", "fp32", 32, 90.0, 80.0),
                                            ("lsq-w4a4-seed0", "lsq", 4, 91.0, 79.0)):
        identity = dict(run=run, study="sets", model="resnet20", dataset="cifar10", method=method, weight_bits=bits,
                        act_bits=bits, seed=0, epoch=1, step=10)
        rows.append({**identity, "split": "test", "corruption": "clean", "severity": 0, "metric": "accuracy",
                     "value": clean})
        rows += [{**identity, "split": "test", "corruption": c, "severity": s, "metric": "accuracy", "value": level}
                 for c in corruptions for s in (1, 2)]
    append_rows(folder / "results.jsonl", rows)
    return folder


def robustness_section(folder: Path) -> str:
    from study.report import write_report

    text = write_report(folder, log_to_wandb=False).read_text()
    return text.split("the measures say")[0]  # the section's text, up to its table's header


def test_report_names_the_corruption_sets_of_the_measures_that_vote(tmp_path):
    """The mean corrupted accuracy and relative robustness are over every corruption tested, mCE over the 15
    benchmark ones: with the 4 extra ones tested (the default 19), the report says so and names them."""
    section = robustness_section(store(tmp_path, ("fog", "snow", "spatter", "saturate")))
    assert "**Corruption sets.**" in section, section[-2000:]
    assert ("are over all 4 corruptions tested (2 benchmark ones and spatter, saturate); mCE is over the 2 "
            "benchmark ones only, leaving out spatter, saturate") in section


def test_report_with_benchmark_corruptions_only_says_the_sets_are_one(tmp_path):
    section = robustness_section(store(tmp_path, ("fog", "snow")))
    assert "Every measure here is over the same 2 corruptions, all of them benchmark ones: snow, fog." in section


def test_the_19_are_the_15_benchmark_and_4_extra_corruptions():
    assert len(BENCHMARK_CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4


# ----------------------------------------------------------------------------------- the installed wheel
def top_level_packages() -> list[str]:
    return sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")


def test_pyproject_packages_every_top_level_package():
    found = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    missing = [name for name in top_level_packages() if not any(fnmatch(name, p) for p in found["include"])]
    assert not missing, f"pyproject.toml's packages leave out {missing}"


BOOTSTRAP = """
import json, runpy, sys
site, names = sys.argv[1], json.loads(sys.argv[2])
# only the installed wheel: not the editable install's finder (it maps names to the source checkout) nor the cwd
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path.insert(0, site)
sys.argv = ["cli.py", "--help"]
try:
    runpy.run_module("cli", run_name="__main__")
    code = 0
except SystemExit as done:
    code = done.code
import importlib
import importlib.util
found = {n: importlib.import_module(n).__file__ for n in names}  # a namespace package (no __init__.py) gives None
found["cli"] = importlib.util.find_spec("cli").origin  # it ran as __main__
print("MODULES " + json.dumps(found))
sys.exit(code)
"""


def test_a_non_editable_install_runs_cli_help(tmp_path):
    """Build the wheel from a copy of the sources (nothing written into the checkout), install it without its
    dependencies into a folder of its own, and run `cli.py --help` from it with the source checkout not
    importable (isolated mode, another working directory, the editable install's finder removed)."""
    source = tmp_path / "source"
    source.mkdir()
    modules = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    for name in ("pyproject.toml", "README.md", "LICENSE", *(f"{module}.py" for module in modules)):
        shutil.copy(REPO / name, source / name)
    for name in top_level_packages():
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "WANDB_MODE": "disabled"}
    pip = [sys.executable, "-m", "pip", "--no-input", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(source)],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheels").glob("qreg-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], cwd=tmp_path, env=env,
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ours = [*top_level_packages(), *(m for m in modules if m != "cli")]  # every package and module of ours
    done = subprocess.run([sys.executable, "-I", "-c", BOOTSTRAP, str(site), json.dumps(ours)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "usage:" in done.stdout and "fit" in done.stdout
    modules = json.loads(done.stdout.rsplit("MODULES ", 1)[1])
    outside = {name: path for name, path in modules.items() if path is None or not Path(path).is_relative_to(site)}
    assert not outside, outside  # every package of ours came from the wheel, none from the checkout
