"""A run's records and the paper's measures on them: the floor every upper layer reads and writes through.

Nothing here imports Lightning, the task modules, the callbacks or the study: the offline report, the callbacks
that write a run's files and the task modules that log the paper's numbers all call the same functions.

- `records.splits`: the names of the test splits ('clean', '<corruption>/<severity>') and the corruption lists.
- `records.store`: the results store (results.jsonl), atomic writes and locks.
- `records.run_files`: a run's metrics.jsonl and predictions.npz, written and read.
- `records.measures`: Eq. 5, corruption means, P / mPC / rPC, relative robustness and mCE.
- `records.mechanism`: the estimators of the paper's mechanism (noise, Theorem 3.1, flatness), plain PyTorch.
- `records.exits`: the exit statuses a run ends with, read by the study runner.
- `records.wandb_mode`: one rule for whether W&B logs online or offline (training and report).

Only `records.mechanism` and the precision label (from `quantizers.methods`) depend on another package of ours,
`quantizers`, the floor below; the floors are user_errors < quantizers < records < datamodules <
lightning_modules < callbacks < study, deploy < app < cli (tests/test_import_layers.py keeps it so).
"""
