"""Where a checkpoint loses graf MMA@3px to kornia SIFT (issue 18), on the protocol's own keypoints and
patches: per image k, the mutual-NN matches and how many are correct; precision of each model's
best n matches at an equal n; and the true detector-to-detector correspondences (detected in both
images within 3 px of each other through H): how far the detected image-k frame is from image 1's
frame carried by H's local affine map (what training and the FPR95 pairs use, plus a +-10 degree /
+-10 % jitter), and how often each descriptor's nearest neighbour is the true partner.

    .venv/bin/python benchmarks/issue13/mma_diag.py CHECKPOINT
"""
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
from pipeline.checkpoint import model_from_checkpoint  # noqa: E402
from pipeline.data.sequences import (detect_frames, extract, laf_angle, laf_scale, map_frames,  # noqa: E402
                                     open_sequence, read_homography, read_image)
from pipeline.evaluate import describe  # noqa: E402
from pipeline.models.sift import SIFT  # noqa: E402
from pipeline.protocols.matching import mutual_nearest_neighbours, project, reprojection_errors  # noqa: E402

models = {"sift": SIFT(32), "model": model_from_checkpoint(sys.argv[1])[0]}
seq = open_sequence(Path(__file__).resolve().parents[2] / "data" / "oxford_graf")
imgs = {k: read_image(seq.images[k]) for k in range(1, 7)}
lafs = {k: detect_frames(imgs[k], 2000) for k in imgs}
kps = {k: v[:, :, 2] for k, v in lafs.items()}
desc = {n: {k: describe(m, extract(torch.from_numpy(imgs[k])[None, None], lafs[k], 32)) for k in imgs}
        for n, m in models.items()}

print("k  matches sift/model  correct@3px sift/model  MMA@3px sift/model  precision@3px of the best n (n=min) sift/model")
for k in range(2, 7):
    hom = read_homography(seq.homography_path(k))
    row = {}
    for n in models:
        m = mutual_nearest_neighbours(desc[n][1], desc[n][k])
        e = reprojection_errors(kps[1], kps[k], m, hom)
        row[n] = (m, np.linalg.norm(desc[n][1][m[:, 0]] - desc[n][k][m[:, 1]], axis=1), e)
    neq = min(len(m) for m, _, _ in row.values())
    best = {n: (e[np.argsort(d)][:neq] <= 3).mean() for n, (_, d, e) in row.items()}
    s, t = row["sift"], row["model"]
    print(f"{k}  {len(s[0])}/{len(t[0])}  {(s[2] <= 3).sum()}/{(t[2] <= 3).sum()}  "
          f"{(s[2] <= 3).mean():.3f}/{(t[2] <= 3).mean():.3f}  {best['sift']:.3f}/{best['model']:.3f} (n={neq})")

print("\nk  true corr.  median |scale err| / |orientation err| / H anisotropy  outside the training jitter  "
      "NN is the true partner: sift/model")
for k in range(2, 7):
    hom = read_homography(seq.homography_path(k))
    dist = np.linalg.norm(project(kps[1], hom)[:, None] - kps[k][None], axis=2)
    j, back = dist.argmin(1), dist.argmin(0)
    i = np.arange(len(dist))
    ok = (dist[i, j] <= 3) & (back[j] == i)
    i, j = i[ok], j[ok]
    carried, _ = map_frames(lafs[1][i], hom)
    dscale = np.abs(np.log(laf_scale(lafs[k][j]) / laf_scale(carried)))
    dangle = np.abs(np.rad2deg((laf_angle(lafs[k][j]) - laf_angle(carried) + np.pi) % (2 * np.pi) - np.pi))
    sv = np.linalg.svd(carried[:, :, :2], compute_uv=False)
    outside = (dangle > 10) | (dscale > np.log(1.1))
    hit = {n: (((desc[n][1][i][:, None] - desc[n][k][None]) ** 2).sum(-1).argmin(1) == j).mean() for n in models}
    print(f"{k}  {len(i)}  {np.expm1(np.median(dscale)):.0%} / {np.median(dangle):.0f} deg / "
          f"{np.median(sv[:, 0] / sv[:, 1]):.2f}  {outside.mean():.0%}  {hit['sift']:.3f}/{hit['model']:.3f}")
