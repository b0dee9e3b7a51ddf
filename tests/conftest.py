"""Shared fixtures: W&B off, quiet Lightning, paths to the optional development data, the tiny test configs
(tests/configs/), and the guard that keeps the unit tier a unit tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Lightning attaches a logging handler to sys.stderr when first imported; import it now, outside any test's
# capsys, so the handler does not keep a captured stream that pytest closes after that test.
import lightning.pytorch  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_CONFIGS = REPO / "tests" / "configs"  # the tiny YAML configs the tests run with, all in one place


class UnitTierViolation(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _unit_tier_guard(request, monkeypatch):
    """A test marked `unit` (`pytest -m unit`, the tier that runs in about a minute) may not start a process
    nor fit a model through Lightning: it fails here, naming what it tried, instead of slowing the tier."""
    if request.node.get_closest_marker("unit") is None:
        return
    import subprocess

    from lightning.pytorch import Trainer

    def refuse(what):
        def refused(*args, **kwargs):
            raise UnitTierViolation(f"a unit-tier test may not {what}; drop its `unit` mark or test below it")
        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a process"))
    monkeypatch.setattr(Trainer, "fit", refuse("fit through Lightning"))


def quant_fragment(name: str) -> dict:
    """The fields of a shipped quantization fragment, configs/quant/<name>.yaml."""
    import yaml

    return yaml.safe_load((REPO / "configs" / "quant" / f"{name}.yaml").read_text())


def assert_yolo_lsq_policy(net, heads: dict, body_layers: int) -> None:
    """Both YOLO families under LSQ W4A4: the bare output convs at 8 bits with signed 8-bit inputs, the first
    conv at 8 bits without an input quantizer (the image), every other conv 4-bit with its own signed LSQ input
    quantizer."""
    from quantizers import LSQQuantizer, QuantConv2d

    for layer in heads.values():
        assert isinstance(layer, QuantConv2d)
        assert layer.weight_quantizer.bits == 8 and layer.input_quantizer.bits == 8 and layer.input_quantizer.signed
    first = net.get_submodule("model.0.conv")
    assert first.weight_quantizer.bits == 8 and first.input_quantizer is None
    body = [m for n, m in net.named_modules() if isinstance(m, QuantConv2d) and n not in heads and n != "model.0.conv"]
    assert len(body) == body_layers
    assert all(m.weight_quantizer.bits == 4 and isinstance(m.input_quantizer, LSQQuantizer) for m in body)
    assert all(m.input_quantizer.signed for m in body) and len({id(m.input_quantizer) for m in body}) == body_layers


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: on a shared 2-core machine, two OpenMP threads under load ran YOLO 10x
    slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str) -> int:
    """Run `python cli.py ARGS` in-process and return its exit status."""
    from cli import main

    return main(list(args))


@pytest.fixture
def digits_fast_args(tmp_path) -> list[str]:
    """A digits run that takes seconds (tests/configs/digits_tiny.yaml), in the test's own folder."""
    return ["--config", str(TEST_CONFIGS / "digits_tiny.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")]


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """CIFAR-10 (JPEG ImageFolder) extracted from ../shared/data; skips when it is absent."""
    archive = SHARED_DATA / "cifar10-jpeg.tar.gz"
    if not archive.exists():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not available")
    import tarfile

    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root
