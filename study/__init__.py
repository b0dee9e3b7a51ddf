"""Studies: the results store (and, later, the grid runner and the report)."""
