"""The parameters that shape sequence pairs: one dict, shared by every module of the package (tests
and callers change entries in place, so modules read it at call time, never copy it)."""

from __future__ import annotations

# Everything that shapes the pairs; recorded in the manifest's generator section.
PARAMS: dict = {
    "detector": "kornia ScaleSpaceDetector(BlobDoG, ScalePyramid(3, 1.6, 32, double_image=True), "
                "ConvQuadInterp3d, LAFOrienter(19), minima_are_also_good=True)",
    "mr_size": 6.0,  # LAF radius (half the patch side) = mr_size x detection sigma
    "duplicate_distance": 0.5,  # x the larger radius: closer points of similar scale are one point
    "duplicate_scale_ratio": 1.5,
    "position_jitter": 0.05,  # x the frame radius, uniform per axis (about +-0.8 px of a 32 px patch)
    "scale_jitter": 0.1,  # log-uniform +-10 %
    "orientation_jitter_deg": 10.0,  # uniform
    "negative_min_distance": 1.0,  # x the larger radius, in image 1
    # A positive needs the homography to hold over the point's patch: image k, warped into image 1 by
    # H^-1, must correlate with image 1 (local NCC, Gaussian window, both blurred a little so that
    # resampling and focus differences do not count) at the frame's centre and at 8 points 0.7 of its
    # radius around it. Things off the plane fail it: graf's lower fifth is a car parked in front of
    # the wall (its roof and windows show the wall refracted and reflected), where the raw pairs are
    # not correspondences at all. On the wall (above y = 480 px) the median NCC is 0.998 for img2 and
    # 0.95 for img6 (60 degrees): a check of the ground truth, not of how hard a pair is.
    "plane_window_sigma": 12.0,  # px of image 1
    "plane_blur_sigma": 1.5,  # px of image 1, both images
    "min_plane_ncc": 0.5,
    # Optional (``redetect=True``), PhotoTour's criterion: the detector finds the point again in image
    # k, some detection whose region overlaps the mapped one with an overlap error (1 - intersection /
    # union) of at most this (Mikolajczyk & Schmid 2005; regions as circles of the frame's area), with
    # a similar orientation. It keeps only points DoG finds again, which leaves easier pairs (graf:
    # 1805 of 4257 plane-checked positives, mostly from img2-3); on its own it is no plane check, as
    # textured surfaces off the plane repeat detections by chance.
    "max_overlap_error": 0.5,
    "max_orientation_difference_deg": 30.0,  # and the same dominant orientation, within this
}
