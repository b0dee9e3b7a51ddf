"""A study's grid: the base config every cell shares, and the methods x bits x seeds that vary.

    name: demo
    base: [../digits_resnet20_fp32.yaml]        # paths relative to the study file
    methods:
      - {method: fp32}
      - {method: lsq, bits: [2, 4, 8]}
    seeds: [0]
    args: ["--trainer.max_epochs", "12"]        # extra `cli.py fit` arguments for every cell

Each cell is one `cli.py fit` (which ends by testing on the clean and corrupted splits) in its own folder,
`<study dir>/cells/<cell>/`, writing its rows to the study's results store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from quantizers import REGISTRY, QuantSpec, QuantSpecError, precision_label
from quantizers.methods import FP32
from study.layout import default_study_dir
from user_errors import UserError


class StudyError(UserError):
    """A study config or study folder that cannot be run or reported: one line naming the fix."""


@dataclass(frozen=True)
class MethodEntry:
    """One line of the grid: a method and the bit widths to run it at (fp32 takes none)."""

    method: str
    bits: list[int] = field(default_factory=list)
    act_bits: int | None = None


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    method: str
    weight_bits: int | None
    act_bits: int | None
    seed: int

    @property
    def name(self) -> str:
        """'fp32-seed0', 'lsq-w4a4-seed0', 'dorefa-w4-seed0': the method and its precision label."""
        if self.weight_bits is None:
            return f"{self.method}-seed{self.seed}"
        spec = QuantSpec(method=self.method, weight_bits=self.weight_bits, act_bits=self.act_bits)
        return f"{self.method}-{precision_label(self.method, *spec.recorded_bits).lower()}-seed{self.seed}"

    def quantization_args(self) -> list[str]:
        args = ["--quantization.method", self.method]
        if self.weight_bits is not None:
            args += ["--quantization.weight_bits", str(self.weight_bits)]
        if self.act_bits is not None:
            args += ["--quantization.act_bits", str(self.act_bits)]
        return args


@dataclass
class StudyConfig:
    """A study: a grid of quantized runs and their FP32 baseline, trained and tested alike.

    Args:
        name: the study's name (its W&B group and the `study` column of its results).
        base: config files every cell composes (like repeated `--config`), relative to the study file.
        methods: the grid's methods and bit widths; include fp32, the baseline every delta is taken from.
        seeds: each cell is run once per seed.
        args: extra `cli.py fit` arguments given to every cell, e.g. ["--trainer.max_epochs", "12"].
        output_dir: the study folder; default runs/study-<name>.
        corruption_workers: processes that pre-generate the corrupted test splits once for all cells.
    """

    name: str
    base: list[str]
    methods: list[MethodEntry]
    seeds: list[int] = field(default_factory=lambda: [0])
    args: list[str] = field(default_factory=list)
    output_dir: str | None = None
    corruption_workers: int = 2

    def cells(self) -> list[Cell]:
        """Expand the grid, validating every method and bit width before anything runs."""
        if not self.methods:
            raise StudyError(f"study {self.name!r} has an empty grid: list at least fp32 and one method under methods")
        if not self.seeds:
            raise StudyError(f"study {self.name!r} has no seeds: give at least one under seeds")
        cells: list[Cell] = []
        for entry in self.methods:
            if entry.method not in REGISTRY:
                raise StudyError(f"unknown method {entry.method!r} in the grid; choose one of: {', '.join(REGISTRY)}")
            if not REGISTRY[entry.method].quantized:
                if entry.bits:
                    raise StudyError(f"{entry.method} takes no bits in the grid")
                precisions = [(None, None)]
            else:
                if not entry.bits:
                    raise StudyError(f"method {entry.method} needs bits, e.g. bits: [2, 4, 8]")
                precisions = [(bits, entry.act_bits) for bits in entry.bits]
            for weight_bits, act_bits in precisions:
                if weight_bits is not None:
                    try:
                        QuantSpec(method=entry.method, weight_bits=weight_bits, act_bits=act_bits)
                    except QuantSpecError as error:
                        raise StudyError(f"grid entry {entry.method} bits {weight_bits}: {error}") from None
                for seed in self.seeds:
                    cells.append(Cell(entry.method, weight_bits, act_bits, seed))
        names = [c.name for c in cells]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise StudyError(f"the grid lists these cells twice: {', '.join(duplicates)}")
        if not any(c.method == FP32 for c in cells):
            raise StudyError("the grid has no fp32 baseline; add {method: fp32} under methods")
        return cells

    def directory(self) -> Path:
        return Path(self.output_dir or default_study_dir(self.name))
