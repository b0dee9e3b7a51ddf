"""The figures `benchmarks/device_check.sh` prints: qreg's training and evaluation throughput on one device.

    python benchmarks/device_throughput.py                         # on the GPU, all of it (about 5 minutes)
    python benchmarks/device_throughput.py --dry-run --report out.md   # tiny sizes on CPU, for CI

1. Training images/s on CIFAR-sized input (32x32, batch 256) for ResNet20, ResNet18 and MobileNetV1 in FP32
   and LSQ / PACT+DoReFa / DoReFa W4A4, each in eager float32, eager bf16-mixed (autocast) and compiled
   bf16-mixed (quantize, compile, train: `compile_after_initialization`), with the ratio to FP32 in the same
   mode. Configurations are interleaved round by round; medians.
2. Projections from those rates: one 200-epoch ResNet20 CIFAR-10 QAT cell (45,000 training images per
   epoch, plus the 96 test splits), and the paper's 49-cell CIFAR grid with one seed (ResNet50 measured for
   it in compiled bf16-mixed only).
3. Corrupted evaluation: eval-mode ResNet20 images/s (bf16-mixed, batch 1000, device-resident uint8 input
   normalised on the device) projected to all 95 CIFAR-10-C splits of 10,000 images.
4. YOLOv5n training images/s at 640 px (FP32 and LSQ W4A4, bf16-mixed).

Compiled configurations stop being measured once `--budget` seconds have passed (the table says so), so
the whole check fits its time slot. The Markdown table is printed and, with --report, appended to a file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import ClassifierStep, classifier_images  # noqa: E402  (benchmarks/, the script's own folder)

from lightning_modules.models import build_model  # noqa: E402
from quantizers import QuantSpec, quantize_model  # noqa: E402

METHODS = {
    "fp32": QuantSpec(),
    "lsq": QuantSpec(method="lsq", weight_bits=4),
    "pact_dorefa": QuantSpec(method="pact_dorefa", weight_bits=4),
    "dorefa": QuantSpec(method="dorefa", weight_bits=4),
}
MODES = ("eager fp32", "eager bf16", "compiled bf16")
# The paper's CIFAR grid: per (model, dataset), FP32 and LSQ / PACT+DoReFa at 2, 4 and 8 bits: 7 x 7 = 49 cells.
GRID = {("resnet20", 10): 7, ("mobilenetv1", 10): 7, ("mobilenetv1", 100): 7, ("resnet18", 10): 7,
        ("resnet18", 100): 7, ("resnet50", 10): 7, ("resnet50", 100): 7}
CIFAR_TRAIN, CIFAR_TEST, EPOCHS, SPLITS = 45_000, 10_000, 200, 95


def autocast(device: str, enabled: bool):
    return torch.autocast(device, dtype=torch.bfloat16) if enabled else nullcontext()


def training_rates(args, models, deadline: float) -> dict[tuple[str, str, str], float | None]:
    generator = torch.Generator().manual_seed(0)
    batch = (classifier_images(args.batch_size, generator, args.device),
             torch.randint(0, 10, (args.batch_size,), generator=generator).to(args.device))
    trainees, rates = {}, {}
    for model, modes, methods in models:
        for mode in modes:
            for method in methods:
                key = (model, method, mode)
                if mode.startswith("compiled") and time.perf_counter() > deadline:
                    rates[key] = None  # over the time budget
                    continue
                trainees[key] = ClassifierStep(model, METHODS[method], batch, args.device, backend=args.backend,
                                               compile_as="cli" if mode.startswith("compiled") else None,
                                               bf16="bf16" in mode)
                print(f"  ready: {model} {method} {mode}", flush=True)
    samples = {key: [] for key in trainees}
    for _ in range(args.rounds):
        for key, trainee in trainees.items():
            samples[key].append(trainee.time_steps(args.steps))
    rates.update({key: args.batch_size / statistics.median(v) for key, v in samples.items()})
    return rates


def eval_rate(args) -> float:
    model = quantize_model(build_model("resnet20", 10), METHODS["lsq"]).to(args.device)
    images = torch.randint(0, 256, (args.eval_batch, 32, 32, 3), dtype=torch.uint8, device=args.device)
    mean = torch.tensor([0.49, 0.48, 0.45], device=args.device).view(1, 3, 1, 1)
    model.train()
    with autocast(args.device, True):
        model(images.permute(0, 3, 1, 2).float() / 255 - mean)  # LSQ activation steps initialise
    model.eval()

    def batch_pass():
        with torch.no_grad(), autocast(args.device, True):
            logits = model((images.permute(0, 3, 1, 2).float() / 255 - mean) / 0.25)
            return (logits.argmax(1) == 0).sum()

    batch_pass()
    start = time.perf_counter()
    for _ in range(args.eval_batches):
        batch_pass()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return args.eval_batch * args.eval_batches / (time.perf_counter() - start)


def yolo_rates(args) -> dict[str, float]:
    import detection  # benchmarks/detection.py: the batch and the timed YOLO step

    batch, _ = detection.training_batch(args.yolo_size, args.yolo_batch)
    rates = {}
    for name in ("fp32", "lsq W4A4"):
        trainee = detection.Trainee("yolov5n", detection.methods("yolov5n")[name], batch, 20, args.device)
        base_loss = trainee.loss
        trainee.loss = lambda base_loss=base_loss: _autocast_call(args.device, base_loss)
        trainee.step()
        seconds = statistics.median(trainee.time_steps(args.steps) for _ in range(args.rounds))
        rates[name] = args.yolo_batch / seconds
    return rates


def _autocast_call(device: str, fn):
    with autocast(device, True):
        return fn()


def table(args, rates, eval_images_s, yolo, where: str) -> str:
    lines = [f"### {where}", "", f"torch {torch.__version__}, training batch {args.batch_size} of 32x32; "
             f"images/s (x FP32 in the same mode){' — DRY RUN, tiny sizes, not a measurement' if args.dry_run else ''}",
             "", "| model | method | " + " | ".join(MODES) + " |", "|---|---|" + "---|" * len(MODES)]
    for model in dict.fromkeys(k[0] for k in rates):
        for method in METHODS:
            cells = []
            for mode in MODES:
                rate = rates.get((model, method, mode))
                base = rates.get((model, "fp32", mode))
                if (model, method, mode) not in rates:
                    cells.append("-")
                    continue
                cells.append("over budget" if rate is None else
                             f"{rate:,.0f} ({base / rate:.2f}x)" if base else f"{rate:,.0f}")
            if any(cell != "-" for cell in cells):
                lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    best = "compiled bf16" if rates.get(("resnet20", "lsq", "compiled bf16")) else "eager bf16"
    lsq20 = rates[("resnet20", "lsq", best)]
    eval_seconds = (SPLITS + 1) * CIFAR_TEST / eval_images_s
    cell_minutes = (EPOCHS * CIFAR_TRAIN / lsq20 + eval_seconds) / 60
    grid_minutes = 0.0
    for (model, _classes), cells in GRID.items():
        qat = rates.get((model, "lsq", best)) or rates.get((model, "lsq", "compiled bf16"))
        fp32 = rates.get((model, "fp32", best)) or rates.get((model, "fp32", "compiled bf16")) or qat
        if qat is None:
            grid_minutes = float("nan")
            break
        grid_minutes += (EPOCHS * CIFAR_TRAIN * (1 / fp32 + (cells - 1) / qat) + cells * eval_seconds) / 60
    lines += ["", f"- one 200-epoch ResNet20 CIFAR-10 LSQ cell ({best}, plus its 96 test splits): "
              f"{cell_minutes:.1f} min (target <= 10 min on an H100-class GPU)",
              f"- the paper's 49-cell CIFAR grid, one seed, one cell at a time: {grid_minutes / 60:.1f} h",
              f"- corrupted evaluation, ResNet20 LSQ W4A4 bf16-mixed: {eval_images_s:,.0f} images/s, all 95 "
              f"CIFAR-10-C splits in {SPLITS * CIFAR_TEST / eval_images_s:.0f} s (target <= 30 s)"]
    if yolo:
        lines.append(f"- YOLOv5n training at {args.yolo_size} px, batch {args.yolo_batch}, bf16-mixed: "
                     + ", ".join(f"{k} {v:,.1f} images/s" for k, v in yolo.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, ResNet20 only, dynamo's eager backend")
    parser.add_argument("--report", type=Path, help="append the Markdown table to this file")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which compiling stops")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--yolo-size", type=int, default=640)
    parser.add_argument("--yolo-batch", type=int, default=32)
    parser.add_argument("--no-yolo", action="store_true")
    args = parser.parse_args()
    args.eval_batch, args.eval_batches = 1000, 20
    every = list(METHODS)
    models = [(m, MODES, every) for m in ("resnet20", "resnet18", "mobilenetv1")]
    models.append(("resnet50", ("compiled bf16",), ["fp32", "lsq"]))
    if args.dry_run:
        args.batch_size, args.rounds, args.steps, args.backend = 8, 1, 1, "eager"
        args.eval_batch, args.eval_batches, args.yolo_size, args.yolo_batch = 16, 1, 64, 2
        # every method eagerly; compiled (dynamo only) for FP32 and LSQ, to keep the CI run short
        models = [("resnet20", MODES[:2], every), ("resnet20", MODES[2:], ["fp32", "lsq"])]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    start = time.perf_counter()
    rates = training_rates(args, models, start + args.budget)
    eval_images_s = eval_rate(args)
    yolo = {} if args.no_yolo else yolo_rates(args)
    text = table(args, rates, eval_images_s, yolo, f"{where}, {time.strftime('%Y-%m-%d')}")
    print("\n" + text)
    if args.report is not None:
        with open(args.report, "a") as report:
            report.write("\n" + text)
        print(f"appended to {args.report}")


if __name__ == "__main__":
    main()
