"""The corruption commands: `cli.py corrupt` (pre-generate a dataset's corrupted test splits) and
`cli.py corruption-grid` (one image under all 19 corruptions x 5 severities)."""

from __future__ import annotations

import time

from datamodules.errors import DataError

MIN_GRID_IMAGE = 16  # the imagenet profile's glass blur needs room for its displacements; below this none is left


def corrupt(args: list[str], parser) -> None:
    """Pre-generate a DataModule's corrupted test splits into a cache folder, with a progress bar."""
    from datamodules.base import ImageClassificationDataModule, fill_corruption_cache
    from datamodules.corruptions.splits import CorruptionCache

    parser.add_subclass_arguments(ImageClassificationDataModule, "data", required=True,
                                  help="the DataModule (its corrupted_test section picks the splits)")
    parser.add_argument("--cache_dir", required=True, help="where the .npy splits and their manifest go")
    parser.add_argument("--workers", type=int, default=2, help="processes generating splits in parallel")
    config = parser.parse_args(args)
    datamodule = parser.instantiate_classes(config).data
    datamodule.setup("fit")
    clean = datamodule.test_sets["clean"]
    settings = datamodule.corrupted_test
    cache = CorruptionCache(config.cache_dir, clean.images, settings.profile, settings.seed)
    splits = settings.splits()
    cache.discard_damaged(splits)  # a damaged or foreign file is regenerated, never kept
    start = time.perf_counter()
    written = fill_corruption_cache(cache, splits, config.workers, f"{datamodule.name} ({len(clean)} images)")
    seconds = time.perf_counter() - start
    rate = f", {written * len(clean) / seconds:,.0f} images/s" if written else ""
    print(f"{written} of {len(splits)} splits written to {cache.directory} in {seconds:.1f} s{rate}; "
          f"use them with --data.init_args.corrupted_test.cache_dir {config.cache_dir}")


def corruption_grid(args: list[str], parser) -> None:
    """Render one image under all 19 corruptions x 5 severities as a labelled PNG grid."""
    import numpy as np
    from PIL import Image

    from datamodules.corruptions import save_corruption_grid

    parser.add_argument("image", help="an image file (any size; RGB)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--profile", default="cifar", choices=["cifar", "imagenet"])
    parser.add_argument("--seed", type=int, default=0)
    config = parser.parse_args(args)
    try:
        with Image.open(config.image) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise DataError(f"cannot read image {config.image}: {error}") from None
    height, width = pixels.shape[:2]
    if min(height, width) < MIN_GRID_IMAGE:
        raise DataError(f"{config.image} is {width}x{height} pixels; corruption-grid needs at least "
                        f"{MIN_GRID_IMAGE}x{MIN_GRID_IMAGE}")
    path = save_corruption_grid(pixels, config.out, profile=config.profile, seed=config.seed)
    print(f"wrote {path}")
