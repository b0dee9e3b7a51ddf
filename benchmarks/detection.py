"""YOLOv5n training throughput under fake quantization, and the cost of mAP, measured side by side in one run.

    python benchmarks/detection.py                        # 320 px, batch 16, real VOC dev images if present
    python benchmarks/detection.py --image-size 640 --batch-size 32 --rounds 7

1. Training images/s of one step (forward, ultralytics' v8 detection loss, backward, SGD step) for FP32,
   LSQ W4A4 and DoReFa W4 with the YOLO quantization policy (configs/quant/yolo_lsq4.yaml,
   yolo_dorefa4.yaml). The configurations are interleaved round by round so drift in the machine's speed
   hits them alike; each figure is the median over rounds; ratios are against FP32.
2. mAP computation: torchmetrics `MeanAveragePrecision` (faster_coco_eval backend) update + compute on N
   images of synthetic detections (100 per image, 20 classes), as the test of one split costs it; and the
   NMS of one eval batch.

Batches come from ../shared/data/voc2007-dev (letterboxed, augmented like training) when it exists, else
from the synthetic rectangles; data loading is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "true")

from timing import TimedTrainingStep  # noqa: E402  (benchmarks/, the script's own folder)

from datamodules import RectanglesDataModule, VOCDataModule  # noqa: E402
from datamodules.corruptions.splits import CorruptedTest  # noqa: E402
from datamodules.detection import detection_collate  # noqa: E402
from lightning_modules.yolo import build_yolo, non_max_suppression  # noqa: E402
from quantizers import QuantSpec, parameter_groups, quantize_model  # noqa: E402

VOC_DEV = REPO.parent / "shared" / "data" / "voc2007-dev" / "VOCdevkit"


def spec_from(fragment: str) -> QuantSpec:
    return QuantSpec(**yaml.safe_load((REPO / "configs" / "quant" / f"{fragment}.yaml").read_text()))


METHODS = {"fp32": QuantSpec(), "lsq W4A4": spec_from("yolo_lsq4"), "dorefa W4": spec_from("yolo_dorefa4")}


def training_batch(image_size: int, batch_size: int) -> tuple[dict, str]:
    no_corruptions = CorruptedTest([])
    if VOC_DEV.is_dir():
        data = VOCDataModule(str(VOC_DEV), train_sets=["2007/train"], val_sets=["2007/val"], test_sets=["2007/val"],
                             image_size=image_size, corrupted_test=no_corruptions)
        source = "VOC2007 dev images"
    else:
        data = RectanglesDataModule(image_size=image_size, corrupted_test=no_corruptions)
        source = "synthetic rectangles"
    data.setup("fit")
    torch.manual_seed(0)
    return detection_collate([data.train_set[i] for i in range(batch_size)]), source


class Trainee(TimedTrainingStep):
    """One network + loss + optimizer that can take a timed training step on a fixed batch."""

    def __init__(self, spec: QuantSpec, batch: dict, num_classes: int, device: str) -> None:
        from ultralytics.utils.loss import v8DetectionLoss

        torch.manual_seed(0)
        self.net = quantize_model(build_yolo("yolov5n", num_classes), spec).to(device).train()
        self.criterion = v8DetectionLoss(self.net)
        self.optimizer = torch.optim.SGD(parameter_groups(self.net, 5e-4), lr=0.001, momentum=0.937, nesterov=True)
        self.batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.images = self.batch["img"].float() / 255
        self.device = device
        self.step()  # LSQ activation steps initialise on the first training batch

    def loss(self) -> torch.Tensor:
        loss, _ = self.criterion(self.net(self.images), self.batch)
        return loss.sum()


def time_map(images: int, detections: int, classes: int = 20) -> tuple[float, float]:
    """Seconds for update and for compute of COCO mAP over `images` images of synthetic detections."""
    from torchmetrics.detection import MeanAveragePrecision

    generator = torch.Generator().manual_seed(0)
    metric = MeanAveragePrecision(box_format="xyxy", backend="faster_coco_eval",
                                  max_detection_thresholds=[1, 10, detections])
    predictions, targets = [], []
    for _ in range(images):
        truth = torch.rand(3, 4, generator=generator) * 200
        truth[:, 2:] += truth[:, :2] + 20
        boxes = truth.repeat(detections // 3 + 1, 1)[:detections] + torch.randn(detections, 4, generator=generator) * 8
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        predictions.append({"boxes": boxes, "scores": torch.rand(detections, generator=generator),
                            "labels": torch.randint(0, classes, (detections,), generator=generator)})
        targets.append({"boxes": truth, "labels": torch.randint(0, classes, (3,), generator=generator),
                        "iscrowd": torch.zeros(3, dtype=torch.long)})
    start = time.perf_counter()
    metric.update(predictions, targets)
    updated = time.perf_counter()
    metric.compute()
    return updated - start, time.perf_counter() - updated


def time_nms(batch_size: int, image_size: int, classes: int = 20) -> float:
    """Seconds of NMS for one eval batch whose every anchor scores above 0.001 in 1-3 classes."""
    anchors = sum((image_size // s) ** 2 for s in (8, 16, 32))
    generator = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(batch_size, 2, anchors, generator=generator) * image_size,
                       torch.rand(batch_size, 2, anchors, generator=generator) * image_size / 4 + 4], dim=1)
    scores = torch.rand(batch_size, classes, anchors, generator=generator) ** 8
    start = time.perf_counter()
    non_max_suppression(torch.cat([boxes, scores], 1), 0.001, 0.7, max_det=100)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration per round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--map-images", type=int, default=4952, help="images of the mAP timing (VOC07 test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    batch, source = training_batch(args.image_size, args.batch_size)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"yolov5n (YOLOv5u), {args.image_size} px, batch {args.batch_size} of {source}, {where}, "
          f"torch {torch.__version__}")
    trainees = {name: Trainee(spec, batch, 20, args.device) for name, spec in METHODS.items()}
    samples: dict[str, list[float]] = {name: [] for name in trainees}
    for _ in range(args.rounds):
        for name, trainee in trainees.items():
            samples[name].append(trainee.time_steps(args.steps))
    medians = {name: statistics.median(v) for name, v in samples.items()}
    print(f"\n{'method':12s}{'ms/step':>10s}{'img/s':>9s}{'x fp32 time':>13s}")
    for name, seconds in medians.items():
        print(f"{name:12s}{1000 * seconds:10.1f}{args.batch_size / seconds:9.1f}{seconds / medians['fp32']:13.2f}")

    nms = time_nms(32, args.image_size)
    update, compute = time_map(args.map_images, 100)
    print(f"\nNMS of a batch of 32 at {args.image_size} px (every anchor a candidate): {1000 * nms:.0f} ms")
    print(f"mAP (faster_coco_eval) over {args.map_images} images x 100 detections: update {update:.1f} s, "
          f"compute {compute:.1f} s; x 96 test splits = {96 * (update + compute) / 60:.1f} min per full test")


if __name__ == "__main__":
    main()
