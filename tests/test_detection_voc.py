"""Real VOC2007 images (../shared/data/voc2007-dev, 800 train / 400 val) at 320 px on CPU: slow, skipped
without the shared data.

- a short FP32 and a short DoReFa W4 run (the shipped configs with configs/data/voc_dev.yaml) lower the
  training loss and evaluate mAP;
- the FP32 model is evaluated on the dev split under all 19 corruptions x 5 severities, timed, and the
  results store gets P / mPC inputs for every split.

    pytest -m slow tests/test_detection_voc.py -s       # prints the figures
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / "qreg-yolo-settings"))
os.environ.setdefault("YOLO_OFFLINE", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import REPO, SHARED_DATA, run_cli  # noqa: E402
from datamodules.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS  # noqa: E402
from records.run_files import read_epoch_metrics  # noqa: E402
from records.store import read_rows  # noqa: E402

VOC_DEV = SHARED_DATA / "voc2007-dev" / "VOCdevkit"
EPOCHS = int(os.environ.get("QREG_VOC_DEV_EPOCHS", "3"))
# One intra-op thread by default: on a shared 2-core machine two OpenMP threads under load ran 10x slower.
THREADS = int(os.environ.get("QREG_TEST_THREADS", "1"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VOC_DEV.is_dir(), reason="../shared/data/voc2007-dev is not available"),
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


def dev_args(config: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "configs" / config),
        "--data", str(REPO / "configs" / "data" / "voc_dev.yaml"),
        "--data.init_args.root", str(VOC_DEV),
        "--trainer.max_epochs", str(EPOCHS),
        "--model.init_args.warmup_epochs", "1",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.corrupted_test.corruptions", "[]",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for name in ("fp32", "dorefa4"):
        run_dir = tmp_path_factory.mktemp(f"voc-dev-{name}")
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            assert run_cli("fit", *dev_args(f"yolo_voc_{name}.yaml", run_dir)) == 0
        finally:
            torch.set_num_threads(threads)
        print(f"\n{name}: {EPOCHS} epochs of 800 images at 320 px in {time.perf_counter() - start:.0f} s")
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("name", ["fp32", "dorefa4"])
def test_a_short_run_lowers_the_training_loss_and_evaluates_map(trained, name):
    run_dir = trained[name]
    epochs = read_epoch_metrics(run_dir / "metrics.jsonl")
    losses = [row["train/loss"] for row in epochs]
    print(f"{name}: train/loss by epoch {[round(x, 3) for x in losses]}, "
          f"val/loss {[round(row['val/loss'], 3) for row in epochs]}, "
          f"val/map50 {[round(row['val/map50'], 2) for row in epochs]}")
    assert len(losses) == EPOCHS and losses[-1] < losses[0]
    rows = {r["metric"]: r["value"] for r in read_rows(run_dir / "results.jsonl") if r["corruption"] == "clean"}
    print(f"{name}: clean mAP50 {rows['map50']:.2f} %, mAP50-95 {rows['map50_95']:.2f} % (400 dev val images)")
    assert 0.0 <= rows["map50_95"] <= rows["map50"] <= 100.0


def test_all_19_corruptions_x_5_severities_on_the_dev_split(trained):
    run_dir = trained["fp32"]
    start = time.perf_counter()
    status = run_cli(
        "test", *dev_args("yolo_voc_fp32.yaml", run_dir, "--data.init_args.corrupted_test.corruptions", "all"),
        "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
    )
    seconds = time.perf_counter() - start
    assert status == 0
    rows = [r for r in read_rows(run_dir / "results.jsonl") if r["metric"] == "map50"]
    latest = {(r["corruption"], r["severity"]): r["value"] for r in rows}  # the test's rows come last
    assert {c for c, _ in latest} == {"clean", *CORRUPTIONS} and len(latest) == 1 + 19 * 5
    p = latest[("clean", 0)]
    mpc = sum(v for (c, _), v in latest.items() if c in BENCHMARK_CORRUPTIONS) / 75
    print(f"\n19 x 5 corrupted evaluation of 400 images (96 splits, 38,400 images) in {seconds:.0f} s: "
          f"P {p:.2f}, mPC {mpc:.2f}, rPC {100 * mpc / p if p else float('nan'):.1f} %")
