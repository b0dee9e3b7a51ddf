"""Device-resident data serve the very batches the host path does, and fake quantization keeps channels_last."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_cli
from datamodules import DigitsDataModule
from datamodules.corruptions.splits import CorruptedTest
from quantizers import DoReFaActQuantizer, LSQQuantizer, PACTQuantizer


def _batches(device_resident: bool, epoch: int):
    data = DigitsDataModule(batch_size=64, device_resident=device_resident,
                            corrupted_test=CorruptedTest(corruptions=["gaussian_noise"], severities=[1]))
    data.setup("fit")
    data.setup("test")
    train = data.train_dataloader()
    train.sampler.set_epoch(epoch)
    loaders = [train, data.val_dataloader(), *data.test_dataloader()]
    return data, [list(loader) for loader in loaders]


@pytest.mark.parametrize("epoch", [0, 3])
def test_device_resident_batches_equal_host_batches(epoch):
    host_data, host = _batches(False, epoch)
    resident_data, resident = _batches(True, epoch)
    assert resident_data.train_set.resident and resident_data.val_set.resident
    assert resident_data.test_sets["clean"].resident
    assert not resident_data.test_sets["gaussian_noise/1"].resident  # corrupted on the fly: stays on the host
    assert not host_data.train_set.resident
    assert [len(batches) for batches in host] == [len(batches) for batches in resident]
    for host_batches, resident_batches in zip(host, resident, strict=True):
        for (images, labels), (r_images, r_labels) in zip(host_batches, resident_batches, strict=True):
            assert torch.equal(images, r_images) and torch.equal(labels, r_labels)
            assert images.stride() == r_images.stride() and r_images.dtype == torch.uint8


COPIES = {"aten::contiguous", "aten::clone", "aten::copy_", "aten::_reshape_alias", "aten::_unsafe_view"}


def _tensor_copies(fn) -> list[str]:
    """Copy ops on more than one element (scalar steps and alphas may be copied: that costs nothing)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        fn()
    return [f"{e.name}{e.input_shapes}" for e in profile.events()
            if e.name in COPIES and any(math.prod(shape) > 1 for shape in e.input_shapes if shape)]


@pytest.mark.parametrize("make", [lambda: LSQQuantizer(4, signed=False, activation=True),
                                  lambda: PACTQuantizer(4, alpha=2.0), lambda: DoReFaActQuantizer(4)],
                         ids=["lsq", "pact", "dorefa"])
def test_fake_quantization_keeps_channels_last_without_copies(make):
    quantizer = make().train()
    x = torch.rand(8, 16, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    quantizer(x)  # first batch: LSQ initialises its step
    upstream = torch.randn(8, 16, 6, 6).contiguous(memory_format=torch.channels_last)

    def step():
        out = quantizer(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        out.backward(upstream)

    copies = _tensor_copies(step)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    assert not copies, f"hidden copies: {copies}"


def test_fit_with_device_resident_data_and_channels_last(digits_fast_args, tmp_path):
    status = run_cli("fit", *digits_fast_args, "--data.init_args.device_resident", "true",
                     "--model.init_args.channels_last", "true", "--trainer.limit_train_batches", "2",
                     "--quantization.method", "lsq", "--quantization.weight_bits", "4")
    assert status == 0
    # the network trained in channels_last (its conv weights are saved in that layout) and was tested
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    convs = [v for k, v in state.items() if k.endswith("conv1.weight") and v.dim() == 4 and v.shape[2] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert (tmp_path / "run" / "results.jsonl").is_file()
