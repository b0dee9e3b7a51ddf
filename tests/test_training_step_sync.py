"""The training step never reads a tensor value on the host, except on the divergence check's steps.

On a GPU every such read (`.item()`, `bool(t)`, `.tolist()`, `float(t)`, `.cpu()`) waits for the launch queue
to drain. Here, on CPU, the reads are made to raise inside `training_step` on every step that is not a check
step (`log_every_n_steps`, an epoch's last batch) and not the first batch (LSQ's one-off initialisation and
PACT's input check read the first batch's values, by design).
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from lightning_modules import ClassificationModule
from lightning_modules.divergence import DivergenceRecord, is_check_step

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def _raise(name):
    def read(*args, **kwargs):
        raise AssertionError(f"Tensor.{name} called in a training step that is not a check step")
    return read


@pytest.mark.parametrize("method", ["lsq", "pact_dorefa"])
def test_training_step_reads_nothing_on_the_host_between_check_steps(method, digits_fast_args, monkeypatch):
    original = ClassificationModule.training_step
    guarded_steps = []

    def guarded(self, batch, batch_idx):
        step = self.global_step
        if step == 0 or is_check_step(self.trainer, step):
            return original(self, batch, batch_idx)
        guarded_steps.append(step)
        with pytest.MonkeyPatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, _raise(name))
            return original(self, batch, batch_idx)

    monkeypatch.setattr(ClassificationModule, "training_step", guarded)
    status = run_cli("fit", *digits_fast_args, "--trainer.limit_train_batches", "6", "--trainer.log_every_n_steps",
                     "4", "--quantization.method", method, "--quantization.weight_bits", "4")
    assert status == 0
    assert guarded_steps == [1, 2, 4]  # steps 3 (the 4th, a logging step) and 5 (the epoch's last) may read


def test_the_patched_reads_do_raise():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "__bool__", _raise("__bool__"))
        with pytest.raises(AssertionError):
            bool(torch.tensor(1.0))


def test_divergence_record_keeps_the_first_non_finite_step_on_the_device():
    record = DivergenceRecord(torch.device("cpu"))
    record.update(torch.tensor(2.5), 0)
    assert record.read() is None
    record.update(torch.tensor(float("inf")), 7)
    record.update(torch.tensor(float("nan")), 8)
    record.update(torch.tensor(1.0), 9)
    step, loss = record.read()
    assert step == 7 and loss == float("inf")
