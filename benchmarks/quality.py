"""Descriptor quality in one table: every registered architecture's FPR95 on the synthetic eval
split and on real pairs from the Oxford graf sequence, next to kornia's SIFT on the same pairs,
each with a 95 % bootstrap interval.

    make demo && .venv/bin/python benchmarks/quality.py      # or: make quality

Models are the ``champion`` (else ``challenger``) versions of ``patchflow-<arch>`` in the tracking
store the demo wrote (``--tracking-uri``, default ``sqlite:///mlflow.db``). Graf pairs are built
the way ``patchflow evaluate --images`` builds them (all correspondences of img2..img6 vs img1
where the homography holds, half positive, seed 0; ``--redetect`` for PhotoTour's re-detection
criterion on top); graf is only ever evaluated on, never trained or tuned on.
Issue 7's target: the demo's champion (HardNet) at FPR95 <= 0.5x SIFT's on graf.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipeline.cli import REDETECT_HELP
from pipeline.data.sequences import sequence_pairs
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import pair_distances
from pipeline.metrics import bootstrap_interval, fpr_at_95_recall
from pipeline.models.sift import SIFT

GRAF = Path(__file__).resolve().parents[1] / "data" / "oxford_graf"


def registered_models(tracking_uri: str) -> dict[str, str]:
    """arch -> model URI of every patchflow-<arch> with a champion or challenger alias."""
    from mlflow.tracking import MlflowClient

    from pipeline.registry import _version_by_alias

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    out = {}
    for rm in sorted(client.search_registered_models("name LIKE 'patchflow-%'"), key=lambda m: m.name):
        alias = next((a for a in ("champion", "challenger") if _version_by_alias(client, rm.name, a)), None)
        if alias:
            out[rm.name.removeprefix("patchflow-")] = f"models:/{rm.name}@{alias}"
    return out


def score(model, pairs: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    d = pair_distances(model, pairs)
    return (fpr_at_95_recall(d, labels), *bootstrap_interval(d, labels, fpr_at_95_recall))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--shards", default="shards", help="the demo's shards (their eval split)")
    parser.add_argument("--eval-pairs", type=int, default=4000)
    parser.add_argument("--images", default=str(GRAF), help="sequence folder with ground-truth homographies")
    parser.add_argument("--redetect", action="store_true", help=REDETECT_HELP)
    args = parser.parse_args()
    import mlflow

    mlflow.set_registry_uri(args.tracking_uri)
    mlflow.set_tracking_uri(args.tracking_uri)
    from pipeline.registry import load_descriptor

    t0 = time.perf_counter()
    synth = load_pairs(shard_paths(args.shards, "eval"), args.eval_pairs)[:2]
    real = sequence_pairs(args.images, seed=0, redetect=args.redetect, progress=True)[:2]
    models = {"sift (kornia)": SIFT(synth[0].shape[-1])}
    for arch, uri in registered_models(args.tracking_uri).items():
        models[f"{arch} ({uri.rsplit('@', 1)[1]})"] = load_descriptor(uri)
    if len(models) == 1:
        raise SystemExit(f"no patchflow-<arch> model registered in {args.tracking_uri}: run `make demo` first")
    sift_real = None
    print(f"\n{'model':28s} {'synthetic eval FPR95':>32s} {'graf FPR95':>32s} {'graf / SIFT':>11s}")
    for name, model in models.items():
        s, r = score(model, *synth), score(model, *real)
        if sift_real is None:  # SIFT is the first row; a perfect 0.0 is still its figure
            sift_real = r[0]
        print(f"{name:28s} {s[0]:8.4f} [{s[1]:.4f}, {s[2]:.4f}]      {r[0]:8.4f} [{r[1]:.4f}, {r[2]:.4f}]      "
              + (f"{r[0] / sift_real:8.2f}x" if sift_real else "     n/a"), flush=True)
    print(f"\n({len(synth[1])} synthetic eval pairs from {args.shards}; {len(real[1])} pairs from {args.images}; "
          f"95 % bootstrap intervals over pairs; {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
