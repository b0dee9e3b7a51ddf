"""What a run writes beside the results store: metrics.jsonl records the learning rate each epoch trained with."""

from __future__ import annotations

from conftest import run_cli
from records.run_files import read_epoch_metrics


def test_each_epoch_records_the_learning_rate_it_trained_with(digits_fast_args, tmp_path):
    # x0.2 after epoch 0: epoch 0 trained at 0.1, epoch 1 at 0.02 (the scheduler steps between them, before
    # on_train_epoch_end, so reading the rate there would give epoch 0 the 0.02 of epoch 1)
    assert run_cli("fit", *digits_fast_args, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1",
                   "--model.init_args.milestones", "[1]", "--test_after_fit", "false") == 0
    epochs = read_epoch_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert [round(e["lr"], 6) for e in epochs] == [0.1, 0.02]
    assert not any(key.startswith("lr-") for e in epochs for key in e)  # one column per rate, not two
