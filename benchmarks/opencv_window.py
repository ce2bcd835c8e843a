"""How a 32x32 patch becomes an OpenCV keypoint: the measured window rule of pipeline/models/opencv.py.

    .venv/bin/python benchmarks/opencv_window.py [--per-image 150] [--upsample 1 2 4]

OpenCV SIFT keypoints are detected on scikit-image's bundled photographs (the synthetic generator's
training photographs; never graf or any evaluation image). At each keypoint every descriptor is
computed on the full image, the way a user describes SIFT keypoints (TEBLID, BoostDesc and VGG at
their documented ``scale_factor`` for SIFT keypoints, 6.75). The same keypoint's patch is cut the
way ``pipeline.data.sequences`` cuts patches (LAF radius ``mr_size`` x sigma = 3 x ``KeyPoint.size``,
the keypoint's orientation, ``extract_patches_from_pyramid``, 32x32) and described through the
canvas (``describe_patches``) at each window multiple (descriptor window / patch side) and
upsampling. Printed: the agreement of canvas and full-image descriptors, mean over keypoints
(cosine similarity for SIFT and VGG, fraction of equal bits for BoostDesc and TEBLID), and each
descriptor's best setting; then the speed of the chosen rule (patches/s, tiled vs one patch per call).
``--images DIR``: then each baseline's FPR95 (95 % bootstrap interval) on ``sequence_pairs(DIR, seed=0)``,
the pairs ``patchflow evaluate --images DIR`` scores, next to kornia's SIFT.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.data.synthetic import TRAIN_IMAGES, load_image
from pipeline.keypoints import keypoint_patches
from pipeline.models import opencv

MULTIPLES = (0.5, 0.75, 0.875, 0.9375, 1.0, 1.0625, 1.125, 1.1875, 1.25, 1.5, 2.0)
IMAGES = tuple(ref for ref in TRAIN_IMAGES if ref.startswith("skimage:"))
TOLERANCE = 0.005  # agreement differences below this are not worth 4x the pixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-image", type=int, default=150, help="strongest SIFT keypoints detected per photograph")
    parser.add_argument("--upsample", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--models", nargs="+", default=list(opencv.OPENCV_MODELS))
    parser.add_argument("--images", help="a sequence folder (e.g. data/oxford_graf): FPR95 on its real pairs")
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = []
    for ref in IMAGES:
        img = np.rint(load_image(ref) * 255).astype(np.uint8)
        kps = opencv.detect_keypoints(img, args.per_image)
        data.append((img, kps, keypoint_patches(img, kps)))
    patches = np.concatenate([d[2] for d in data])
    print(f"{len(patches)} keypoints from {len(IMAGES)} photographs: {', '.join(r.split(':')[1] for r in IMAGES)}")
    for name in args.models:
        ref = np.concatenate([opencv.compute(name, img, kps) for img, kps, _ in data])
        variants = [(u, None) for u in args.upsample]
        if opencv.SPECS[name].sift_pyramid:  # and SIFT on the canvas itself (octave 0, layer 0)
            variants += [(u, False) for u in args.upsample if u <= 2]  # 4x: minutes, and 2x is already worse
        print(f"\n{name}: mean agreement with the full-image descriptor, by window multiple")
        print(f"{'upsample':>18s} " + " ".join(f"{m:6.3f}" for m in MULTIPLES))
        results = []  # (agreement, window multiple, upsample, sift_pyramid)
        for u, pyramid in variants:
            row = []
            for m in MULTIPLES:
                got = opencv.describe_patches(name, patches, window=m, upsample=u, sift_pyramid=pyramid)
                row.append(float(opencv.agreement(name, got, ref).mean()))
                results.append((row[-1], m, u, pyramid))
            label = f"{u}x" + (", canvas level" if pyramid is False else "")
            print(f"{label:>18s} " + " ".join(f"{v:6.3f}" for v in row), flush=True)
        best = max(results, key=lambda r: r[0])
        # the rule: the best window, at the smallest (cheapest) upsampling that comes within TOLERANCE of the best
        rule = min((r for r in results if r[3] == best[3] and r[0] >= best[0] - TOLERANCE), key=lambda r: (r[2], -r[0]))
        print(f"best: window {best[1]} x patch, upsample {best[2]}x (agreement {best[0]:.3f}); rule: window {rule[1]} "
              f"x patch, upsample {rule[2]}x (agreement {rule[0]:.3f}); module: window {opencv.WINDOW[name]}, "
              f"upsample {opencv.UPSAMPLE}x")
    print("\nspeed of the module's rule (opencv.WINDOW, UPSAMPLE, TILES_PER_CALL), patches/s:")
    for name in args.models:
        n = min(len(patches), 2048)
        t = time.perf_counter()
        opencv.describe_patches(name, patches[:n])
        tiled = n / (time.perf_counter() - t)
        t = time.perf_counter()
        opencv.describe_patches(name, patches[:256], tiles_per_call=1)
        single = 256 / (time.perf_counter() - t)
        print(f"{name:18s} tiled {tiled:8.0f}   one patch per call {single:8.0f}")
    if args.images:
        real_pairs(args.images, args.models)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


def real_pairs(images: str, names: list[str]) -> None:
    from pipeline.data.sequences import sequence_pairs
    from pipeline.evaluate import pair_distances
    from pipeline.metrics import bootstrap_interval, fpr_at_95_recall
    from pipeline.models import create_model

    pairs, labels, _ = sequence_pairs(images, seed=0)
    print(f"\nFPR95 on {len(labels)} pairs ({int(labels.sum())} positive) of sequence_pairs({images}, seed=0):")
    for name in ["sift", *names]:
        t = time.perf_counter()
        d = pair_distances(create_model(name), pairs)
        lo, hi = bootstrap_interval(d, labels, fpr_at_95_recall, seed=0)
        print(f"{name:18s} {fpr_at_95_recall(d, labels):.4f} [{lo:.4f}, {hi:.4f}]  ({time.perf_counter() - t:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
