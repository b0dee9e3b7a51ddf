"""ONNX Runtime CPU speed of an exported ResNet20 and YOLOv5n: FP32, the exact QDQ export and the onnx-int8 export
(QLinearConv and the integer ops between), and file sizes by bits.

    python benchmarks/export.py                  # batch 1 and 128, threads = cores; YOLOv5n at 640 px
    python benchmarks/export.py --threads 1 --rounds 5 --yolo_size 0

Models are built, not trained: ResNet20 with 10 classes and YOLOv5n with 20, quantized with LSQ (activation
steps set by one training-mode pass over random images; the new 8-bit points of onnx-int8 calibrated on random
images too), which is all speed and size depend on. Each model is exported as
`cli.py export` does, once with BatchNorm as trained and once folded (`--fold_bn true`). The sessions are
timed interleaved round by round, so drift in the machine's speed hits all of them alike; figures are the
medians over rounds. Latency is one batch's wall time; throughput is images per second at that batch. The
node types ONNX Runtime runs after its own graph optimisations show where integer kernels (QLinearConv)
replaced DequantizeLinear + float Conv. File sizes: the ONNX graph (integers stored as int8) and the packed
integer file (`--format int`), per bit width.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.onnx_int8 import export_onnx_int8  # noqa: E402
from deploy.onnx_qdq import INPUT_NAME, export_onnx  # noqa: E402
from deploy.packed import save_packed  # noqa: E402
from deploy.verify import runtime_kernels, session  # noqa: E402
from lightning_modules.models import build_model  # noqa: E402
from lightning_modules.yolo.model import build_yolo  # noqa: E402
from quantizers import QuantSpec, quantize_model  # noqa: E402


def network(spec: QuantSpec) -> torch.nn.Module:
    torch.manual_seed(0)
    net = quantize_model(build_model("resnet20", 10), spec).train()
    with torch.no_grad():
        net(torch.randn(128, 3, 32, 32))  # activation steps and BatchNorm statistics
    return net.eval()


def yolo_network(spec: QuantSpec, size: int) -> torch.nn.Module:
    """The anchor-based YOLOv5n (20 classes, as on VOC) under the YOLO quantization policy of
    configs/quant/yolo_lsq8.yaml (signed activations, the head's output convs at 8 bits)."""
    torch.manual_seed(0)
    net = build_yolo("yolov5n", 20)
    if spec.method != "fp32":
        quantize_model(net, spec)
    with torch.no_grad():
        net.train()(torch.rand(2, 3, size, size))  # activation steps and BatchNorm statistics
    return net.eval()


def timed(runtime, images: np.ndarray) -> float:
    start = time.perf_counter()
    runtime.run(None, {INPUT_NAME: images})
    return time.perf_counter() - start


def interleaved_medians(models: dict[str, Path], images: np.ndarray, args) -> dict[str, float]:
    """Seconds per run of each model on `images`: each round times every model in turn (about `args.seconds`
    of runs each, their median), so drift in the machine's speed hits all alike; the median over rounds."""
    sessions = {label: session(path, threads=args.threads) for label, path in models.items()}
    for runtime in sessions.values():  # warm-up
        for _ in range(3):
            timed(runtime, images)
    repeats = {label: max(1, int(args.seconds / timed(runtime, images))) for label, runtime in sessions.items()}
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, runtime in sessions.items():
            times[label].append(statistics.median(timed(runtime, images) for _ in range(repeats[label])))
    return {label: statistics.median(samples) for label, samples in times.items()}


def op_times(path: Path, images: np.ndarray, threads: int, runs: int = 20, warmup: int = 3) -> dict[str, float]:
    """Milliseconds per batch spent in each operator type, from ONNX Runtime's own profiler (one session; the
    kernels of its first `warmup` runs are left out)."""
    import json
    from collections import Counter

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.profile_file_prefix = str(path.with_suffix(""))
    runtime = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        runtime.run(None, {INPUT_NAME: images})
    with open(runtime.end_profiling()) as handle:
        events = json.load(handle)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    timed_from = starts[warmup]
    totals: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= timed_from:
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return dict(totals.most_common())


def print_op_times(models: dict[str, Path], images: np.ndarray, threads: int, runs: int = 20) -> None:
    """One line per model: its total kernel time and each operator type's share (>= 0.05 ms)."""
    for label, path in models.items():
        times = op_times(path, images, threads, runs=runs)
        listed = ", ".join(f"{op} {ms:.1f}" for op, ms in times.items() if ms >= 0.05)
        print(f"- {label} ({sum(times.values()):.1f} ms in kernels): {listed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed runs per round: about this long")
    parser.add_argument("--yolo_size", type=int, default=640,
                        help="also time the anchor YOLOv5n at this input size, batch 1 (0: skip it)")
    parser.add_argument("--profile", action="store_true",
                        help="also print ONNX Runtime's time per operator type at the largest batch")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="qreg-export-bench-"))
    example = torch.randn(2, 3, 32, 32)

    models = {}
    for label, spec, fold in (("FP32", QuantSpec(), False), ("FP32, BN folded", QuantSpec(), True),
                              ("LSQ W8A8 QDQ", QuantSpec(method="lsq", weight_bits=8), False),
                              ("LSQ W8A8 QDQ, BN folded", QuantSpec(method="lsq", weight_bits=8), True)):
        path = scratch / f"{label.replace(' ', '_').replace(',', '')}.onnx"
        export_onnx(network(spec), example, path, fold_bn=fold)
        models[label] = path
    calibration = torch.randn(256, 3, 32, 32)  # the models are calibrated on random images too (see `network`)
    for bits in (8, 4):
        label = f"LSQ W{bits}A{bits} onnx-int8"
        path = scratch / f"int8_w{bits}.onnx"
        export_onnx_int8(network(QuantSpec(method="lsq", weight_bits=bits)), example, calibration, path)
        models[label] = path

    print(f"ONNX Runtime CPU, {args.threads} threads, medians of {args.rounds} rounds\n")
    print("| model | runtime nodes (after ONNX Runtime's optimisations) |")
    print("|---|---|")
    for label, path in models.items():
        kernels = runtime_kernels(path, scratch)
        shown = ", ".join(f"{kind} {count}" for kind, count in kernels.items()
                          if kind in ("Conv", "FusedConv", "QLinearConv", "QuantizeLinear", "DequantizeLinear",
                                      "BatchNormalization", "Gemm", "MatMulIntegerToFloat", "QGemm", "Transpose",
                                      "QLinearAdd", "Add", "Relu", "Clip"))
        print(f"| {label} | {shown} |")

    for batch in args.batches:
        images = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        medians = interleaved_medians(models, images, args)
        print(f"\nbatch {batch}:\n")
        print("| model | latency (ms) | throughput (images/s) | time vs FP32 |")
        print("|---|---|---|---|")
        for label, median in medians.items():
            print(f"| {label} | {1000 * median:.2f} | {batch / median:,.0f} | {median / medians['FP32']:.2f}x |")

    if args.profile:
        batch = max(args.batches)
        images = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        print(f"\nms per batch of {batch} by operator (ONNX Runtime's profiler, 20 runs):\n")
        print_op_times({label: models[label] for label in ("FP32", "LSQ W8A8 QDQ", "LSQ W8A8 onnx-int8")},
                       images, args.threads)

    if args.yolo_size:
        yolo(args, scratch)

    print("\nfile sizes (ResNet20, 10 classes; first and last layer at 8 bits):\n")
    fp32_path = models["FP32"]
    print("| bits | ONNX QDQ | packed integers (--format int) | FP32 ONNX |")
    print("|---|---|---|---|")
    for bits in (8, 4, 2):
        net = network(QuantSpec(method="lsq", weight_bits=bits))
        onnx_report = export_onnx(net, example, scratch / f"w{bits}.onnx")
        packed = save_packed(net, scratch / f"w{bits}.safetensors")
        print(f"| W{bits}A{bits} | {onnx_report.size / 1e3:,.0f} kB | {packed.size / 1e3:,.0f} kB | "
              f"{fp32_path.stat().st_size / 1e3:,.0f} kB |")


def yolo(args, scratch: Path) -> None:
    """YOLOv5n at `--yolo_size` px, batch 1: FP32, the exact QDQ export (BatchNorm folded) and onnx-int8."""
    size = args.yolo_size
    example = torch.rand(1, 3, size, size)
    spec = QuantSpec(method="lsq", weight_bits=8, act_signed=True, layer_bits={"model.24.m.?": 8})
    quantized = yolo_network(spec, size)
    paths = {"YOLOv5n FP32": scratch / "yolo_fp32.onnx", "YOLOv5n LSQ W8A8 QDQ": scratch / "yolo_qdq.onnx",
             "YOLOv5n LSQ W8A8 onnx-int8": scratch / "yolo_int8.onnx"}
    export_onnx(yolo_network(QuantSpec(), size), example, paths["YOLOv5n FP32"])
    export_onnx(quantized, example, paths["YOLOv5n LSQ W8A8 QDQ"], fold_bn=True)
    pixels = torch.randint(0, 256, (8, 3, size, size)) / 255  # a detector's input: 8-bit images scaled to [0, 1]
    report = export_onnx_int8(quantized, example, pixels, paths["YOLOv5n LSQ W8A8 onnx-int8"])
    print(f"\nYOLOv5n onnx-int8 routes: {report.route_summary()}\n")
    print("| model | runtime nodes (after ONNX Runtime's optimisations) |")
    print("|---|---|")
    for label, path in paths.items():
        kernels = runtime_kernels(path, scratch)
        print(f"| {label} | {', '.join(f'{kind} {count}' for kind, count in list(kernels.items())[:8])} |")
    images = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    medians = interleaved_medians(paths, images, args)
    print(f"\nYOLOv5n, {size} px, batch 1:\n")
    print("| model | latency (ms) | time vs FP32 |")
    print("|---|---|---|")
    for label, median in medians.items():
        print(f"| {label} | {1000 * median:.1f} | {median / medians['YOLOv5n FP32']:.2f}x |")
    if args.profile:
        print(f"\nms per image by operator (ONNX Runtime's profiler, {size} px):\n")
        print_op_times({label: paths[label] for label in ("YOLOv5n FP32", "YOLOv5n LSQ W8A8 onnx-int8")},
                       images, args.threads, runs=10)


if __name__ == "__main__":
    main()
