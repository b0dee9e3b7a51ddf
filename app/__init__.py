"""What the entry point (`cli.py`) needs beyond the packages below it: qreg's LightningCLI, where a run writes,
the checks before anything is written, signals (Ctrl-C, SLURM's preemption) and how a command ends."""
