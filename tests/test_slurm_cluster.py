"""qreg on a real one-node SLURM cluster (scripts/slurm/local-cluster.sh): `pytest -m slurm`.

All scenarios are submitted at once (the cluster runs them side by side on its two CPUs), driven by one loop that
sends each signal when its run reports the pause it was told to wait at (tests/slurm_helpers.py), and then
checked one fault per test:

- R, the reference: a 2-cell study (fp32, lsq w4a4) through `submit.sh` to its report, uninterrupted.
- P, the same study preempted mid-epoch: cell 0 by `scancel --signal=USR1`, cell 1 by `scontrol requeue`.
- F, a plain `fit` through scripts/slurm/fit.sbatch (1 task): SIGUSR1 during start-up, `scontrol requeue` mid-epoch,
  SIGUSR1 while its corrupted splits are being generated; trained like R's fp32 cell.
- D, a 2-task DDP `fit` through the same template, SIGUSR1 mid-epoch.

Skipped where munge or SLURM is not installed (Debian: apt-get install --no-install-recommends slurm-wlm munge).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from records.store import read_rows
from slurm_helpers import BATCH, CORRUPTION, INIT, Cluster, marker

pytestmark = pytest.mark.slurm

DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "scontrol")
DEADLINE = 900  # s for every scenario to end; a safety net against a hang, not a measurement
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
EPOCHS, BATCHES = 2, 4
ARGS = ["--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.deterministic", "true",
        "--data.init_args.corrupted_test.corruptions", "[fog, snow]",
        "--data.init_args.corrupted_test.severities", "[1]", "--flatness.enabled", "false"]
BASE = REPO / "configs" / "digits_resnet20_fp32.yaml"
PAUSING = "tests.slurm_helpers.PausingDigits"


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} missing): apt-get install --no-install-recommends "
                    "slurm-wlm munge")
    folder = tmp_path_factory.mktemp("slurm-cluster")
    script = REPO / "scripts" / "slurm" / "local-cluster.sh"
    up = subprocess.run(["bash", str(script), "up", str(folder)], capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(folder / "slurm.conf"), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               QREG_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    client = Cluster(env)
    try:
        yield client
    finally:
        # No job outlives the cluster: cancel them all and wait for their processes to end, then stop the daemons.
        client.run("scancel", "--full", "--user", str(os.getuid()), check=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and client.run("squeue", "--noheader", check=False).strip():
            time.sleep(0.5)
        subprocess.run(["bash", str(script), "down", str(folder)], timeout=60)


def write_study(folder: Path, name: str, extra: list[str]) -> Path:
    study = folder / f"{name}.yaml"
    study.write_text(f"name: {name}\nbase: [{BASE}]\nmethods: [{{method: fp32}}, {{method: lsq, bits: [4]}}]\n"
                     f"seeds: [0]\noutput_dir: {folder / name}\ncorruption_workers: 1\n"
                     f"args: {json.dumps([*ARGS, *extra])}\n")
    return study


def submit_study(cluster: Cluster, study: Path) -> tuple[str, str]:
    """`cli.py study --executor slurm` then `submit.sh`: (the cells' array job id, the report job id)."""
    cluster.run(sys.executable, str(REPO / "cli.py"), "study", "--config", str(study), "--executor", "slurm",
                "--slurm_options", '["--cpus-per-task=1"]')
    submit = study.parent / study.stem / "slurm" / "submit.sh"
    printed = cluster.run("bash", str(submit))
    array = re.search(r"submitted study array (\d+)", printed).group(1)
    report = cluster.run("squeue", "--noheader", "--format=%i %j", "--name", f"qreg-{study.stem}").split()
    ids = sorted({i for i in report if i.isdigit() and i != array})
    return array, ids[0]


def submit_fit(cluster: Cluster, output: Path, tasks: int, args: list[str]) -> str:
    command = ["sbatch", "--parsable", f"--ntasks-per-node={tasks}", "--cpus-per-task=1", f"--output={output}",
               str(REPO / "scripts" / "slurm" / "fit.sbatch"), str(BASE), *ARGS, *args]
    return subprocess.run(command, env=cluster.env, cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """Every scenario submitted, its signals sent at its pauses, run to its end."""
    root = tmp_path_factory.mktemp("slurm-runs")
    wandb_env = {**cluster.env, "WANDB_MODE": "offline"}
    offline = Cluster(wandb_env)

    ddp_markers, fit_markers, preempt_markers = root / "ddp-markers", root / "fit-markers", root / "p-markers"
    ddp = submit_fit(cluster, root / "ddp.out", 2, [
        "--data", PAUSING, "--data.init_args.plan", json.dumps({"*": [BATCH]}),
        "--data.init_args.markers", str(ddp_markers), "--trainer.default_root_dir", str(root / "ddp"),
        "--data.init_args.corrupted_test.corruptions", "[]"])
    reference = submit_study(cluster, write_study(root, "reference", []))
    plan = {"fp32-seed0": [BATCH], "lsq-w4a4-seed0": [BATCH]}
    preempted = submit_study(offline, write_study(root, "preempted", [
        "--data", PAUSING, "--data.init_args.plan", json.dumps(plan), "--data.init_args.markers",
        str(preempt_markers)]))
    fit = submit_fit(offline, root / "fit.out", 1, [
        "--data", PAUSING, "--data.init_args.plan", json.dumps({"*": [INIT, BATCH, CORRUPTION]}),
        "--data.init_args.markers", str(fit_markers), "--trainer.default_root_dir", str(root / "fit"),
        "--data.init_args.corrupted_test.cache_dir", str(root / "fit-corruptions"),
        "--data.init_args.corrupted_test.workers", "2"])

    def usr1(job):
        return lambda: cluster.run("scancel", "--signal=USR1", job)

    def requeue(job):
        return lambda: cluster.run("scontrol", "requeue", job)

    steps = {  # scenario -> [(the pause's marker, the signal sent there)], in order
        "ddp": [(marker(ddp_markers, BATCH, "*"), usr1(ddp))],
        "preempted-0": [(marker(preempt_markers, BATCH, "fp32-seed0"), usr1(f"{preempted[0]}_0"))],
        "preempted-1": [(marker(preempt_markers, BATCH, "lsq-w4a4-seed0"), requeue(f"{preempted[0]}_1"))],
        "fit": [(marker(fit_markers, where, "*"), send(fit)) for where, send in
                ((INIT, usr1), (BATCH, requeue), (CORRUPTION, usr1))],
    }
    jobs = [ddp, fit, f"{reference[0]}_0", f"{reference[0]}_1", reference[1],
            f"{preempted[0]}_0", f"{preempted[0]}_1", preempted[1]]
    sent: dict[str, int] = {name: 0 for name in steps}
    deadline = time.monotonic() + DEADLINE
    states: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for name, todo in steps.items():
            if sent[name] < len(todo) and todo[sent[name]][0].exists():
                todo[sent[name]][1]()
                sent[name] += 1
        states = {job: cluster.job(job) for job in jobs}
        for job, info in states.items():
            if info.get("Reason") == "BeginTime":
                cluster.release_requeued(job)
        if all(info.get("JobState") in FINAL for info in states.values()):
            break
        time.sleep(0.2)
    return {"root": root, "states": states, "sent": sent, "reference": reference, "preempted": preempted,
            "fit": fit, "ddp": ddp}


def output(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def assert_bitwise_equal(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def cell_outputs(runs, study: str) -> list[Path]:
    found = sorted((runs["root"] / study / "slurm").glob("cell-*.out"))
    assert len(found) == 2, found  # one SLURM log per cell of the 2-cell study: a check over none would pass
    return found


def test_a_study_runs_through_submit_sh_to_its_report(runs):
    for study in ("reference", "preempted"):
        array, report = runs[study]
        assert runs["states"][report].get("JobState") == "COMPLETED", output(
            runs["root"] / study / "slurm" / f"report-{report}.out")[-3000:]
        rows = read_rows(runs["root"] / study / "results.jsonl")
        keys = [(r["run"], r["split"], r["corruption"], r["severity"], r["metric"]) for r in rows]
        assert len(keys) == len(set(keys)), "a row written twice"
        for cell in ("fp32-seed0", "lsq-w4a4-seed0"):
            tested = {(c, s) for run, split, c, s, m in keys if run == cell and m == "accuracy" and split == "test"}
            assert tested == {("clean", 0), ("fog", 1), ("snow", 1)}, (study, cell, tested)
        assert (runs["root"] / study / "report" / "report.md").is_file()


def test_cells_preempted_mid_epoch_by_sigusr1_and_by_requeue_end_bitwise_like_uninterrupted_ones(runs):
    assert runs["sent"]["preempted-0"] == 1 and runs["sent"]["preempted-1"] == 1
    for task, cell in ((0, "fp32-seed0"), (1, "lsq-w4a4-seed0")):
        job = f"{runs['preempted'][0]}_{task}"
        assert runs["states"][job].get("JobState") == "COMPLETED" and runs["states"][job].get("Restarts") == "1", (
            runs["states"][job], output(runs["root"] / "preempted" / "cells" / cell / "cell.log")[-3000:])
        folder = runs["root"] / "preempted" / "cells" / cell
        assert_bitwise_equal(folder / "checkpoints" / "last.ckpt",
                             runs["root"] / "reference" / "cells" / cell / "checkpoints" / "last.ckpt")
        epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(EPOCHS))


def test_a_requeued_cell_keeps_its_whole_log(runs):
    """Fault 3: without --open-mode=append the requeued task truncates the cell's SLURM log."""
    for path in cell_outputs(runs, "preempted"):
        text = output(path)
        assert text.count("=== study preempted: cell") == 2, text[-2000:]  # the first run and the requeued one
        assert "resuming from its checkpoint" in text


def test_a_signal_during_start_up_and_during_corruption_generation_requeues_the_fit(runs):
    """Fault 2: a SIGUSR1 before Lightning's handler (start-up, making the corrupted splits) killed the task."""
    info, log = runs["states"][runs["fit"]], output(runs["root"] / "fit.out")
    assert runs["sent"]["fit"] == 3, log[-3000:]
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "3", (info, log[-3000:])
    rows = read_rows(runs["root"] / "fit" / "results.jsonl")
    assert {(r["corruption"], r["severity"]) for r in rows if r["metric"] == "accuracy"} == {
        ("clean", 0), ("fog", 1), ("snow", 1)}


def test_a_plain_fit_requeued_mid_epoch_resumes_bitwise(runs):
    """Fault 1: a requeued plain fit (no --ckpt_path) died on its own config.yaml, or started over."""
    log = output(runs["root"] / "fit.out")
    last = runs["root"] / "fit" / "checkpoints" / "last.ckpt"
    assert last.is_file(), log[-3000:]
    assert_bitwise_equal(last, runs["root"] / "reference" / "cells" / "fp32-seed0" / "checkpoints" / "last.ckpt")
    epochs = [json.loads(line)["epoch"] for line in (runs["root"] / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(EPOCHS))


def all_logs(runs) -> dict[str, str]:
    root = runs["root"]
    paths = [root / "fit.out", root / "ddp.out", *cell_outputs(runs, "preempted"), *cell_outputs(runs, "reference"),
             *(root / "preempted" / "cells").glob("*/cell.log")]
    logs = {str(p): output(p) for p in paths}
    assert all(logs.values()), [p for p, text in logs.items() if not text]  # every log there, and written to
    return logs


def test_requeues_end_the_wandb_run_cleanly_and_resume_its_id(runs):
    """Fault 4: SLURM's SIGTERM reached wandb-core, and every requeue ended with its traceback."""
    for path, text in all_logs(runs).items():
        tracebacks = text.split("Traceback (most recent call last)")[1:]
        assert not [t for t in tracebacks if "wandb" in t], (path, text[-3000:])
        assert "ConnectionResetError" not in text, (path, text[-3000:])
    for folder in (runs["root"] / "fit", runs["root"] / "preempted" / "cells" / "fp32-seed0"):
        started = sorted((folder / "wandb").glob("offline-run-*"))
        assert len(started) >= 2, started  # the first run and the requeued one(s)
        assert len({p.name.rsplit("-", 1)[1] for p in started}) == 1, started  # one W&B run id


def test_mid_epoch_resumes_do_not_warn_about_the_dataloader(runs):
    """Fault 6: Lightning warned 'not resumable' on every mid-epoch resume, though the resume is exact."""
    logs = all_logs(runs)
    for path, text in logs.items():
        assert "not resumable" not in text and "not fully resumable" not in text, (path, text[-2000:])
    # Under DDP the epoch's data does restart on a mid-epoch resume: qreg says so instead of Lightning
    assert "resuming mid-epoch under DDP" in logs[str(runs["root"] / "ddp.out")]


def validation_loss(checkpoint: Path) -> float:
    """The validation loss of a checkpoint in one process, over the whole validation set."""
    import torch.nn.functional as F

    from datamodules.digits import DigitsDataModule
    from lightning_modules.classification import ClassificationModule

    model = ClassificationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data = DigitsDataModule()
    data.setup("fit")
    total, count = 0.0, 0
    with torch.no_grad():
        for images, labels in data.val_dataloader():
            logits = model(data.normalize(images))
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    return total / count


def test_a_two_task_ddp_fit_is_requeued_and_logs_reduced_values(runs):
    """Fault 1 under DDP, fault 5 (Lightning's sync_dist advice, and a val/loss that was rank 0's share only) and
    fault 7 (the fit template on a CPU cluster)."""
    info, log = runs["states"][runs["ddp"]], output(runs["root"] / "ddp.out")
    assert runs["sent"]["ddp"] == 1 and info.get("JobState") == "COMPLETED", (info, log[-3000:])
    assert info.get("Restarts") == "1"
    assert "sync_dist=True" not in log, log[log.find("sync_dist=True") - 300:][:600]
    run = runs["root"] / "ddp"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(EPOCHS))
    single = validation_loss(run / "checkpoints" / "last.ckpt")
    print(f"DDP val/loss {metrics[-1]['val/loss']!r}, one process {single!r}")
    assert metrics[-1]["val/loss"] == pytest.approx(single, rel=1e-5, abs=1e-6)
