"""Every shipped experiment config resolves to the model, dataset and quantization its name promises."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import REPO, run_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
NAME = re.compile(
    r"(?P<model>[a-z0-9]+)_(?P<dataset>cifar100|cifar10)_(?P<method>fp32|lsq|pact_dorefa|dorefa)(?P<bits>\d?)$"
)
DATA_CLASS = {"cifar10": "datamodules.CIFAR10DataModule", "cifar100": "datamodules.CIFAR100DataModule"}


def test_the_paper_grid_is_complete():
    names = {c.stem for c in CONFIGS}
    grid = [(m, "cifar10") for m in ("resnet20", "mobilenetv1", "resnet18", "resnet50")]
    grid += [(m, "cifar100") for m in ("mobilenetv1", "resnet18", "resnet50")]
    quant = ["fp32"] + [f"{method}{bits}" for method in ("lsq", "pact_dorefa") for bits in (2, 4, 8)]
    missing = [f"{m}_{d}_{q}" for m, d in grid for q in quant if f"{m}_{d}_{q}" not in names]
    assert not missing


@pytest.mark.parametrize("config", [c for c in CONFIGS if NAME.match(c.stem)], ids=lambda c: c.stem)
def test_paper_config_resolves_to_its_name(config, capsys):
    assert run_cli("fit", "--config", str(config), "--print_config") == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    expected = NAME.match(config.stem).groupdict()
    assert resolved["model"]["init_args"]["model"] == expected["model"]
    assert resolved["data"]["class_path"] == DATA_CLASS[expected["dataset"]]
    assert resolved["quantization"]["method"] == expected["method"]
    if expected["bits"]:
        assert resolved["quantization"]["weight_bits"] == int(expected["bits"])
    assert resolved["trainer"]["max_epochs"] == 200
    assert resolved["model"]["init_args"]["lr"] == 0.1 and resolved["model"]["init_args"]["weight_decay"] == 1e-4


STUDIES = sorted((REPO / "configs" / "study").glob("*.yaml"))


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_shipped_study_configs_expand(study, tmp_path, capsys):
    """Every shipped study parses, finds its base configs and expands its grid (written as a SLURM array)."""
    assert run_cli("study", "--config", str(study), "--executor", "slurm", "--output_dir", str(tmp_path)) == 0
    script = (tmp_path / "slurm" / "cells.sbatch").read_text()
    cells = [line for line in script.splitlines() if line.startswith("#   ")]
    assert len(cells) >= 4 and any("fp32-seed0" in line for line in cells)
