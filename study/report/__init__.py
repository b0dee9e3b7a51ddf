"""`cli.py report`, split by job: `loading` (the store and the cells' files, checked), `statistics` (paired deltas,
intervals, robustness measures), `figures` (matplotlib), `markdown` (tables, text, CSV), `wandb_log` (the W&B
mirror) and `build` (which puts them together)."""

from study.report.build import write_report

__all__ = ["write_report"]
