"""Studies: the grid (`grid`), its local runner (`runner`) and SLURM scripts (`slurm`), Theorem 3.1 on trained
runs (`theorem`) and the report (`report/`); the records they read and write live in `records/`."""
