"""`fit` tests the final weights: `last.ckpt` is the last epoch even when validation loss rose at the end,
results rows name the epoch and step of the weights they measured, and a resume continues after the last epoch."""

from __future__ import annotations

import json

import torch

from conftest import run_cli
from records.store import read_rows

EPOCHS, BATCHES = 4, 3
# The learning rate jumps 30x for the last epoch, so validation loss rises there: the best-validation
# checkpoint is an earlier epoch, and a `last.ckpt` that followed it would be tested in place of the final one.
RISING_AT_THE_END = [
    "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
    "--model.init_args.lr", "0.05", "--model.init_args.milestones", f"[{EPOCHS - 1}]",
    "--model.init_args.gamma", "30",
]


def epoch_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_fit_tests_and_resumes_from_the_last_epoch_not_the_best(digits_fast_args, tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli("fit", *digits_fast_args, *RISING_AT_THE_END) == 0

    val = [row["val/loss"] for row in epoch_lines(run_dir)]
    best_epoch = min(range(len(val)), key=val.__getitem__)
    assert best_epoch < EPOCHS - 1, f"the scenario needs validation loss rising at the end, got {val}"
    assert (run_dir / "checkpoints" / f"best-{best_epoch}.ckpt").is_file()

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert (last["epoch"], last["global_step"]) == (EPOCHS - 1, EPOCHS * BATCHES)
    rows = read_rows(run_dir / "results.jsonl")
    assert rows and {(r["epoch"], r["step"]) for r in rows} == {(EPOCHS - 1, EPOCHS * BATCHES)}

    # The same weights evaluated again give the same clean accuracy; the best checkpoint is recorded as such.
    assert run_cli("test", *digits_fast_args, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")) == 0
    assert run_cli("test", *digits_fast_args,
                   "--ckpt_path", str(run_dir / "checkpoints" / f"best-{best_epoch}.ckpt")) == 0
    rows = read_rows(run_dir / "results.jsonl")
    clean = [r for r in rows if r["corruption"] == "clean" and r["metric"] == "accuracy"]
    assert [(r["epoch"], r["step"]) for r in clean] == [
        (EPOCHS - 1, EPOCHS * BATCHES), (EPOCHS - 1, EPOCHS * BATCHES), (best_epoch, (best_epoch + 1) * BATCHES)]
    assert clean[0]["value"] == clean[1]["value"]

    # A resume from last.ckpt continues after the last epoch: exactly one new line in metrics.jsonl, for epoch
    # EPOCHS, nothing replayed (a last.ckpt at the best epoch would have retrained the epochs after it).
    resumed = [*RISING_AT_THE_END[:1], str(EPOCHS + 1), *RISING_AT_THE_END[2:]]
    assert run_cli("fit", *digits_fast_args, *resumed, "--test_after_fit", "false",
                   "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")) == 0
    lines = epoch_lines(run_dir)
    assert [(row["epoch"], row["step"]) for row in lines] == [(e, (e + 1) * BATCHES) for e in range(EPOCHS + 1)]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert (last["epoch"], last["global_step"]) == (EPOCHS, (EPOCHS + 1) * BATCHES)
