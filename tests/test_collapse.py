"""Collapsed runs: a dead model (clean accuracy at chance, or a quantized layer on one level) is recorded as
collapsed and kept out of every comparison; and the cause of the demo's collapses, the LSQ steps' learning rate."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli
from quantizers import LSQQuantizer, QuantSpec, QuantSpecError, parameter_groups, quantize_model
from quantizers.health import COLLAPSED_LEVEL_SHARE, collapsed_layers, dominant_level_share
from records.measures import COLLAPSED_METRIC, chance_bound
from records.run_files import PREDICTIONS_FILE, save_predictions
from records.splits import CORRUPTIONS, split_name
from records.store import append_rows, read_rows
from study.grid import Cell
from study.layout import cell_dir
from study.report import write_report
from study.runner import Outcome, summary_line

BASE = ["--data", "DigitsDataModule", "--model", "ClassificationModule", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--flatness.enabled", "false", "--data.init_args.corrupted_test.corruptions", "[]"]
LSQ8 = ["--quantization.method", "lsq", "--quantization.weight_bits", "8"]


def rows_for(run, method, bits, seed, clean, corrupted):
    identity = dict(run=run, study="fab", model="resnet20", dataset="digits", method=method, weight_bits=bits,
                    act_bits=bits, seed=seed, epoch=11, step=228)
    rows = [{**identity, "split": "test", "corruption": "clean", "severity": 0, "metric": "accuracy", "value": clean}]
    for name, values in corrupted.items():
        rows += [{**identity, "split": "test", "corruption": name, "severity": severity, "metric": "accuracy",
                  "value": value} for severity, value in enumerate(values, start=1)]
    return rows


def small_lsq_net(bits: int = 8) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    return quantize_model(net, QuantSpec(method="lsq", weight_bits=bits))


# ------------------------------------------------------------------------------------------------ the math
def test_chance_bound_is_chance_plus_2_326_binomial_standard_errors():
    assert chance_bound(10.0, 360) == pytest.approx(100 * (0.1 + 2.326 * math.sqrt(0.1 * 0.9 / 360)))
    assert chance_bound(10.0, 360) == pytest.approx(13.68, abs=0.01)
    assert chance_bound(10.0, 10_000) == pytest.approx(10.70, abs=0.01)  # more images, a tighter bound


def test_a_healthy_lsq_layer_is_far_from_one_level_and_a_huge_step_puts_it_on_zero():
    net = small_lsq_net(bits=2)
    shares = {name: dominant_level_share(layer) for name, layer in net.named_children() if hasattr(layer, "weight")}
    assert all(share < 0.75 for share in shares.values()), shares  # 2 bits from LSQ's init: about 60 % at zero
    assert collapsed_layers(net) == {}
    with torch.no_grad():
        net[2].weight_quantizer.step.fill_(1e3)  # every weight of the middle layer rounds to 0
    assert collapsed_layers(net) == {"2": 1.0}


def test_one_level_check_leaves_a_noise_quantizer_in_training_mode_untouched():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    quantize_model(net, QuantSpec(method="noise", weight_bits=4)).train()
    before = net[2].weight.clone()
    assert dominant_level_share(net[2]) < COLLAPSED_LEVEL_SHARE  # float weights, no noise drawn in eval
    assert net[2].weight_quantizer.training and torch.equal(net[2].weight, before)


def test_lsq_steps_train_at_a_tenth_of_the_learning_rate_by_default_and_the_scale_is_validated():
    net = small_lsq_net()
    groups = {g.get("name", "network"): g for g in parameter_groups(net, 1e-4, lr=0.1)}
    assert groups["lsq_steps"]["lr"] == pytest.approx(0.01) and "lr" not in groups["network"]
    assert all(isinstance(p, nn.Parameter) for p in groups["lsq_steps"]["params"])
    steps = {id(m.step) for m in net.modules() if isinstance(m, LSQQuantizer)}
    assert {id(p) for p in groups["lsq_steps"]["params"]} == steps
    same_rate = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                               QuantSpec(method="lsq", weight_bits=4, quantizer_lr_scale=1.0))
    assert [g for g in parameter_groups(same_rate, 1e-4, lr=0.1) if g.get("name") == "lsq_steps"][0]["lr"] == 0.1
    for bad in (0, -1.0, True, float("inf"), "0.1"):
        with pytest.raises(QuantSpecError, match="quantizer_lr_scale"):
            QuantSpec(method="lsq", quantizer_lr_scale=bad)


def test_a_fit_trains_the_steps_at_the_scaled_rate(tmp_path):
    assert run_cli("fit", *BASE, *LSQ8, "--trainer.default_root_dir", str(tmp_path / "run")) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    rates = {g.get("name", "network"): g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]}
    assert rates["lsq_steps"] == pytest.approx(0.1 * rates["network"])


# -------------------------------------------------------------------------------- end to end: a forced collapse
@pytest.fixture(scope="module")
def collapsed_run(tmp_path_factory):
    """A tiny LSQ W8A8 fit, then its checkpoint with the classifier's step set to 1e3 (every weight rounds to 0),
    tested: what a run whose step exploded during training leaves behind."""
    root = tmp_path_factory.mktemp("collapse")
    assert run_cli("fit", *BASE, *LSQ8, "--trainer.default_root_dir", str(root / "run")) == 0
    checkpoint = torch.load(root / "run" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    checkpoint["state_dict"]["net.fc.weight_quantizer.step"].fill_(1e3)
    dead = root / "run" / "checkpoints" / "dead.ckpt"
    torch.save(checkpoint, dead)
    return root, dead


def test_a_dead_classifier_is_recorded_collapsed_with_a_line_and_exit_0(collapsed_run, capsys):
    root, dead = collapsed_run
    out = root / "tested"
    assert run_cli("test", *BASE, *LSQ8, "--ckpt_path", str(dead), "--trainer.default_root_dir", str(out)) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("qreg: collapsed:")]
    assert len(lines) == 1 and "fc (100.0 %)" in lines[0] and "at chance level" in lines[0], captured.err
    rows = read_rows(out / "results.jsonl")
    metrics = {r["metric"]: r["value"] for r in rows if r["corruption"] == "clean"}
    assert metrics[COLLAPSED_METRIC] == 1.0 and metrics["collapsed_layers"] == 1.0
    assert metrics["accuracy"] <= chance_bound(metrics["chance"], int(metrics["images"]))
    assert metrics["images"] == 360.0  # the digits test set


def test_two_training_batches_leave_a_model_at_chance_level_with_no_dead_layer(collapsed_run):
    """The fixture's own fit (2 batches at lr 0.1) has not learned: collapsed by the chance criterion alone."""
    root, _ = collapsed_run
    rows = read_rows(root / "run" / "results.jsonl")
    clean = {r["metric"]: r["value"] for r in rows if r["corruption"] == "clean"}
    # the digits test set is nearly balanced: its largest class, 42 of 360 images
    assert clean["chance"] * 360 / 100 == pytest.approx(42)
    assert clean["accuracy"] <= chance_bound(clean["chance"], 360)
    assert clean[COLLAPSED_METRIC] == 1.0 and clean["collapsed_layers"] == 0.0


def test_the_report_keeps_a_collapsed_cell_out_of_table1_and_every_measure(tmp_path):
    rows = rows_for("fp32-seed0", "fp32", 32, 0, 92.0, {c: [80.0] * 5 for c in CORRUPTIONS})
    rows += rows_for("lsq-w4a4-seed0", "lsq", 4, 0, 92.5, {c: [81.0] * 5 for c in CORRUPTIONS})
    # the dead model: chance accuracy everywhere, so it "loses nothing" under corruption
    dead = rows_for("lsq-w8a8-seed0", "lsq", 8, 0, 9.17, {c: [9.17] * 5 for c in CORRUPTIONS})
    identity = {k: v for k, v in dead[0].items() if k not in ("metric", "value")}
    dead += [{**identity, "metric": "chance", "value": 10.0}, {**identity, "metric": "images", "value": 360.0},
             {**identity, "metric": COLLAPSED_METRIC, "value": 1.0},
             {**identity, "metric": "collapsed_layers", "value": 1.0}]
    append_rows(tmp_path / "results.jsonl", rows + dead)
    # its test's per-image correctness, as a finished cell leaves it: checked against the scores set aside
    correct = np.arange(360) < 33  # 9.17 % of the digits test set
    splits = ["clean", *(split_name(c, s) for c in CORRUPTIONS for s in range(1, 6))]
    save_predictions(cell_dir(tmp_path, "lsq-w8a8-seed0") / PREDICTIONS_FILE, dict.fromkeys(splits, correct))
    store = (tmp_path / "results.jsonl").read_bytes()
    report = write_report(tmp_path, log_to_wandb=False).read_text()
    assert (tmp_path / "results.jsonl").read_bytes() == store
    with open(tmp_path / "report" / "table1.csv") as handle:
        table = {row["precision"]: row for row in csv.DictReader(handle)}
    w8 = table["W8A8"]
    assert w8["seeds"] == "0" and w8["avg corrupted acc"] == "" and w8["Eq. 5 error improvement"] == ""
    assert w8["clean acc"].startswith("collapsed: clean 9.17 % (chance 10.00 %), 1 layer on one level")
    assert table["W4A4"]["Eq. 5 error improvement"] != ""
    with open(tmp_path / "report" / "deltas.csv") as handle:
        assert not [r for r in csv.DictReader(handle) if r["precision"] == "W8A8"]
    with open(tmp_path / "report" / "robustness.csv") as handle:
        assert not [r for r in csv.DictReader(handle) if "W8A8" in r.values()]
    assert "**Collapsed runs**" in report and "lsq-w8a8-seed0 (collapsed: clean 9.17 %" in report
    # named in that paragraph only: in no robustness table, delta or sign vote
    assert report.count("lsq-w8a8-seed0") == 1, report


def test_the_study_summary_line_names_collapsed_and_diverged_cells():
    outcomes = [Outcome(Cell("fp32", None, None, 0), "finished"),
                Outcome(Cell("lsq", 8, None, 0), "collapsed"),
                Outcome(Cell("lsq", 2, None, 0), "skipped", detail="collapsed"),
                Outcome(Cell("lsq", 4, None, 0), "diverged")]
    line = summary_line(outcomes)
    assert line == ("study: 4 cells: 1 finished, 2 collapsed (lsq-w8a8-seed0, lsq-w2a2-seed0), "
                    "1 diverged (lsq-w4a4-seed0)")


def test_a_score_row_of_an_unknown_split_is_blamed_on_its_line(tmp_path, capsys):
    rows = rows_for("fp32-seed0", "fp32", 32, 0, 92.0, {c: [80.0] * 5 for c in CORRUPTIONS[:2]})
    rows[3]["split"] = "tset"  # a typo a hand edit leaves behind
    append_rows(tmp_path / "results.jsonl", rows)
    store = (tmp_path / "results.jsonl").read_bytes()
    assert run_cli("report", str(tmp_path), "--wandb", "false") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [e for e in err.splitlines() if e.startswith("qreg: error:")]
    assert "results.jsonl:4" in line and "'tset'" in line
    assert (tmp_path / "results.jsonl").read_bytes() == store and not (tmp_path / "report").exists()
