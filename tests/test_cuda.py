"""The CUDA tier (`pytest -m cuda`, run by benchmarks/device_check.sh): skipped without a CUDA device.

Quantizers bitwise against the CPU path, bf16-mixed and 16-mixed digits fits against float32, torch.compile
on CUDA, bitwise resume, a training step that may not sync the host, a YOLOv5n training step, DDP on one GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli
from quantizers import DoReFaActQuantizer, DoReFaWeightQuantizer, LSQQuantizer, PACTQuantizer
from records.store import read_rows

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]


def _lsq(activation: bool, per_channel: bool = False) -> LSQQuantizer:
    q = LSQQuantizer(4, signed=not activation, num_channels=8 if per_channel else None, activation=activation)
    with torch.no_grad():
        q.step.copy_(torch.linspace(0.05, 0.2, 8) if per_channel else torch.tensor(0.0731))
    q.mark_ready()
    return q


QUANTIZERS = {
    "lsq activation": (lambda: _lsq(True), False),
    "lsq weight": (lambda: _lsq(False), True),
    "lsq weight per channel": (lambda: _lsq(False, per_channel=True), True),
    "pact": (lambda: PACTQuantizer(4, alpha=1.3), False),
    "dorefa activation": (lambda: DoReFaActQuantizer(4), False),
    "dorefa weight": (lambda: DoReFaWeightQuantizer(4, rescale=True), True),
}


def _forward_backward(quantizer, x, upstream):
    x = x.clone().requires_grad_()
    out = quantizer(x)
    out.backward(upstream)
    return out.detach().cpu(), x.grad.cpu(), {n: p.grad.cpu() for n, p in quantizer.named_parameters()}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantizers_on_cuda_match_the_cpu_path(name):
    make, weight = QUANTIZERS[name]
    torch.manual_seed(0)
    x = torch.randn(8, 16, 3, 3) * 0.4 if weight else torch.randn(32, 8, 16, 16).abs() * 0.6
    upstream = torch.randn(x.shape)
    cpu_q, cuda_q = make(), make().cuda()
    out, grad_x, grads = _forward_backward(cpu_q, x, upstream)
    c_out, c_grad_x, c_grads = _forward_backward(cuda_q, x.cuda(), upstream.cuda())
    if name == "dorefa weight":  # tanh may differ by an ulp between CPU and CUDA: a rare neighbouring level
        assert (c_out != out).float().mean() <= 1e-3
    else:
        assert torch.equal(c_out, out)
        assert torch.equal(c_grad_x, grad_x)
    for param, grad in grads.items():
        torch.testing.assert_close(c_grads[param], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantizers_under_cuda_autocast_give_the_float32_levels(dtype):
    quantizer = _lsq(True).cuda()
    x = (torch.randn(32, 8, 16, 16, device="cuda").abs() * 0.6).to(dtype)
    reference = quantizer(x.float())
    with torch.autocast("cuda", dtype=dtype):
        out = quantizer(x)
    assert out.dtype == dtype and torch.equal(out, reference.to(dtype))


def _fit_accuracy(tmp_path, name: str, *args: str) -> float:
    run = tmp_path / name
    status = run_cli("fit", "--config", "configs/digits_resnet20_lsq4.yaml", *GPU, "--trainer.default_root_dir",
                     str(run), "--trainer.enable_progress_bar", "false",
                     "--data.init_args.corrupted_test.corruptions", "[]", "--flatness.enabled", "false", *args)
    assert status == 0
    (accuracy,) = [r["value"] for r in read_rows(run / "results.jsonl")
                   if r["metric"] == "accuracy" and r["corruption"] == "clean"]
    return accuracy


def test_mixed_precision_digits_fits_match_float32(tmp_path):
    float32 = _fit_accuracy(tmp_path, "32")
    bf16 = _fit_accuracy(tmp_path, "bf16", "--trainer.precision", "bf16-mixed",
                         "--data.init_args.device_resident", "true")
    fp16 = _fit_accuracy(tmp_path, "fp16", "--trainer.precision", "16-mixed", "--model.init_args.channels_last", "true")
    print(f"digits LSQ W4A4 on CUDA: float32 {float32:.2f} %, bf16-mixed {bf16:.2f} %, 16-mixed {fp16:.2f} %")
    assert float32 >= 90.0
    assert abs(bf16 - float32) <= 1.0 and abs(fp16 - float32) <= 1.0


@pytest.mark.parametrize("method", ["lsq", "pact_dorefa"])
def test_compiled_fit_on_cuda(method, tmp_path):
    run = tmp_path / "run"
    status = run_cli("fit", "--data", "DigitsDataModule", "--model", "ClassificationModule", *GPU,
                     "--trainer.max_epochs", "2", "--trainer.precision", "bf16-mixed",
                     "--model.init_args.compile", "true", "--quantization.method", method,
                     "--quantization.weight_bits", "4", "--trainer.default_root_dir", str(run),
                     "--trainer.enable_progress_bar", "false", "--data.init_args.corrupted_test.corruptions", "[]",
                     "--flatness.enabled", "false")
    assert status == 0
    (accuracy,) = [r["value"] for r in read_rows(run / "results.jsonl") if r["metric"] == "accuracy"]
    assert accuracy > 50.0


def test_bitwise_resume_on_cuda(tmp_path):
    import resume_helpers as test_resume  # noqa: N813 (the run helpers of tests/test_resume.py)

    args = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    reference = tmp_path / "reference"
    test_resume.finish(test_resume.start(reference, *args))
    stopped = tmp_path / "stopped"
    process = test_resume.start(stopped, *args)
    test_resume.wait_until(lambda: test_resume.epochs_written(stopped) >= 1)
    process.send_signal(__import__("signal").SIGTERM)
    test_resume.finish(process, expected=143)
    test_resume.finish(test_resume.start(stopped, *args, "--ckpt_path", str(stopped / "checkpoints" / "last.ckpt")))
    test_resume.assert_same_run(stopped, reference)


def test_training_step_does_not_sync_the_host(digits_fast_args, monkeypatch):
    """No host sync from the forward through the quantizers' backward to the optimizer step (Lightning runs
    training_step and backward inside the closure that `optimizer_step` calls)."""
    from lightning_modules import ClassificationModule
    from lightning_modules.divergence import is_check_step

    original = ClassificationModule.optimizer_step
    checked = []

    def strict(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        if self.global_step == 0 or is_check_step(self.trainer, self.global_step):
            return original(self, epoch, batch_idx, optimizer, optimizer_closure)
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = original(self, epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(self.global_step)
        return result

    monkeypatch.setattr(ClassificationModule, "optimizer_step", strict)
    status = run_cli("fit", *digits_fast_args, *GPU, "--trainer.limit_train_batches", "6",
                     "--trainer.log_every_n_steps", "4", "--trainer.precision", "bf16-mixed",
                     "--data.init_args.device_resident", "true", "--quantization.method", "lsq",
                     "--quantization.weight_bits", "4")
    assert status == 0
    assert checked == [1, 2, 4]


def test_yolov5n_training_step_on_cuda():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import detection

    batch, _ = detection.training_batch(320, 4)
    for name in ("fp32", "lsq W4A4"):
        trainee = detection.Trainee("yolov5n", detection.methods("yolov5n")[name], batch, 20, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainee.loss()
        assert torch.isfinite(loss)
        trainee.step()
        assert all(torch.isfinite(p).all() for p in trainee.net.parameters())


def test_ddp_with_one_process_on_one_gpu(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "cli.py", "fit", "--data", "DigitsDataModule", "--model", "ClassificationModule",
         "--trainer", "configs/trainer/ddp.yaml", "--trainer.devices", "1", "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
         "--quantization.method", "lsq", "--quantization.weight_bits", "4",
         "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
         "--data.init_args.corrupted_test.corruptions", "[]", "--flatness.enabled", "false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(r["metric"] == "accuracy" for r in read_rows(tmp_path / "run" / "results.jsonl"))
