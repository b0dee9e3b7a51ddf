"""How close the `imagenet` profile is to `imagecorruptions.corrupt` (the maintained ImageNet-C fork), in
intensity levels, on full-size real VOC images. The tests assert the bounds; this prints the figures.

    python benchmarks/corruption_fidelity.py [--images 4]

Deterministic corruptions are compared directly; motion blur, elastic transform and fog are compared draw for
draw, with the fork's global RandomState put in the same MT19937 state as our Generator. The other random
corruptions can only agree in distribution (tests/test_corruptions_imagenet_reference.py checks that).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import imagecorruptions  # noqa: E402

from datamodules.corruptions import DETERMINISTIC, SEVERITIES, blur, corrupt, digital, weather  # noqa: E402
from datamodules.corruptions.profiles import parameters  # noqa: E402

VOC = REPO / ".." / "shared" / "data" / "voc2007-dev" / "VOCdevkit" / "VOC2007" / "JPEGImages"
MATCHED = {"motion_blur": blur.motion_blur, "elastic_transform": digital.elastic_transform, "fog": weather.fog}


def matched_generator(seed: int) -> np.random.Generator:
    """A Generator, with numpy's global RandomState (the fork's stream) put in the same MT19937 state."""
    state = np.random.MT19937(seed).state["state"]
    np.random.set_state(("MT19937", state["key"], state["pos"]))  # noqa: NPY002 - the fork's global stream
    return np.random.Generator(np.random.MT19937(seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="VOC images (every 7th of the dev split)")
    args = parser.parse_args()
    paths = sorted(VOC.glob("*.jpg"))[: args.images * 7 : 7]
    if not paths:
        sys.exit(f"no VOC images under {VOC}: this compares on ../shared/data/voc2007-dev")
    images = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    print(f"{len(images)} VOC images x {len(SEVERITIES)} severities; |ours - fork| in intensity levels")
    print(f"{'corruption':18s} {'how':14s} {'mean':>8s} {'max':>4s} {'exact pixels':>13s}")
    for name in sorted(DETERMINISTIC) + sorted(MATCHED):
        differences = []
        for n, image in enumerate(images):
            for severity in SEVERITIES:
                if name in MATCHED:
                    rng = matched_generator(100 * severity + n)
                    theirs = imagecorruptions.corrupt(image, corruption_name=name, severity=severity)
                    ours = MATCHED[name](image[None], parameters("imagenet", name, severity), [rng], "imagenet")[0]
                else:
                    theirs = imagecorruptions.corrupt(image, corruption_name=name, severity=severity)
                    ours = corrupt(image, name, severity, profile="imagenet")
                differences.append(np.abs(ours.astype(int) - theirs.astype(int)))
        how = "draw for draw" if name in MATCHED else "deterministic"
        mean = np.mean([d.mean() for d in differences])
        exact = np.mean([(d == 0).mean() for d in differences])
        print(f"{name:18s} {how:14s} {mean:8.4f} {max(int(d.max()) for d in differences):4d} {100 * exact:12.2f}%")


if __name__ == "__main__":
    main()
