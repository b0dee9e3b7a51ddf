"""A NaN/inf loss stops the run with one line naming the step and the culprit, is recorded, and never stops a study."""

from __future__ import annotations

import torch

from conftest import REPO, run_cli
from lightning_modules.divergence import first_non_finite
from records.store import read_rows


def test_diverged_run_exits_3_names_the_step_and_is_recorded(digits_fast_args, tmp_path, capsys):
    status = run_cli("fit", *digits_fast_args, "--quantization.method", "lsq", "--quantization.weight_bits", "2",
                     "--model.init_args.lr", "1e30")
    assert status == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "qreg:" in line]
    assert len(err) == 1 and "training diverged at step" in err[0] and "lower the learning rate" in err[0]
    (row,) = [r for r in read_rows(tmp_path / "run" / "results.jsonl") if r["metric"] == "diverged"]
    assert row["method"] == "lsq" and row["weight_bits"] == 2 and row["split"] == "train"


def test_a_check_after_the_failing_step_still_names_that_step(digits_fast_args, tmp_path, capsys, monkeypatch):
    """The host reads the divergence record only on check steps (here the epoch's last batch, step 2): the loss
    that went NaN at step 1 is still the one named and recorded."""
    import torch.nn.functional as F

    real = F.cross_entropy
    training_calls = []

    def nan_at_step_1(logits, labels, *args, **kwargs):
        loss = real(logits, labels, *args, **kwargs)
        if torch.is_grad_enabled():
            training_calls.append(1)
            if len(training_calls) == 2:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(F, "cross_entropy", nan_at_step_1)
    assert run_cli("fit", *digits_fast_args, "--trainer.limit_train_batches", "3") == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "qreg:" in line]
    assert len(err) == 1 and "training diverged at step 1 " in err[0], err
    (row,) = [r for r in read_rows(tmp_path / "run" / "results.jsonl") if r["metric"] == "diverged"]
    assert row["value"] == 1.0


def test_first_non_finite_names_quantizer_state_first():
    from lightning_modules.models import build_model
    from quantizers import QuantSpec, quantize_model

    net = quantize_model(build_model("resnet20", 10), QuantSpec(method="lsq", weight_bits=4))
    assert first_non_finite(net) is None
    with torch.no_grad():
        net.layer2[0].conv1.weight.fill_(float("nan"))
        net.layer3[1].conv2.weight_quantizer.step.fill_(float("inf"))
    assert first_non_finite(net) == "layer3.1.conv2.weight_quantizer.step"


def test_a_diverged_cell_does_not_stop_the_study(tmp_path, capsys, monkeypatch):
    study = tmp_path / "study.yaml"
    study.write_text(f"""name: diverging
base: [{REPO / 'configs' / 'digits_resnet20_fp32.yaml'}]
methods: [{{method: fp32}}, {{method: lsq, bits: [2]}}]
output_dir: {tmp_path / 'out'}
args: ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
       "--trainer.enable_progress_bar", "false", "--data.init_args.corrupted_test.corruptions", "[]",
       "--flatness.enabled", "false", "--model.init_args.lr", "1e30"]
""")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert run_cli("study", "--config", str(study)) == 0  # the study in this process, its cells in their own
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert {r["run"] for r in rows if r["metric"] == "diverged"} == {"fp32-seed0", "lsq-w2a2-seed0"}
    assert "diverged" in capsys.readouterr().out
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "Diverged runs" in report and "lsq-w2a2-seed0 (step" in report


def test_a_validation_loss_that_is_not_finite_ends_the_run_as_diverged(digits_fast_args, tmp_path, capsys):
    """FP32 at lr 1000: the training losses stay finite (batch statistics), the validation loss is NaN (running
    statistics): exit 3 with one line, a diverged row, and no NaN stored as a result."""
    assert run_cli("fit", *digits_fast_args, "--model.init_args.lr", "1000") == 3
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if "qreg:" in line]
    assert "Traceback" not in captured.err + captured.out
    assert len(err) == 1 and err[0].startswith("qreg: diverged: validation diverged after epoch 0")
    assert "val/loss nan" in err[0]
    rows = read_rows(tmp_path / "run" / "results.jsonl")
    assert [r["metric"] for r in rows] == ["diverged"]


def test_a_test_loss_that_is_not_finite_is_not_stored(digits_fast_args, tmp_path, capsys):
    """A checkpoint whose weights give NaN in evaluation: `test` ends as diverged (status 3), no NaN rows."""
    assert run_cli("fit", *digits_fast_args, "--test_after_fit", "false") == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False, map_location="cpu")
    checkpoint["state_dict"]["net.fc.weight"].fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    out = tmp_path / "tested"
    args = [a if a != str(tmp_path / "run") else str(out) for a in digits_fast_args]
    assert run_cli("test", *args, "--ckpt_path", str(tmp_path / "nan.ckpt")) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qreg:")]
    assert len(err) == 1 and "test diverged" in err[0] and "tensor: fc.weight" in err[0]
    rows = read_rows(out / "results.jsonl")
    assert [r["metric"] for r in rows] == ["diverged"]
