"""Patch pairs from image sequences with ground-truth homographies -> arrays or shards.

Layouts (one folder per sequence; images may be .png, .ppm, .pgm, .jpg, .tif or .bmp):

* HPatches full sequences (``hpatches-sequences-release/<seq>/``): ``1.ppm .. 6.ppm`` and
  ``H_1_2 .. H_1_6``;
* Oxford / VGG affine sequences (e.g. ``graf/``): ``img1.png .. img6.png`` and ``H1to2p .. H1to6p``;
* your own photos in either layout. A homography file is a plain-text 3x3 matrix mapping pixel
  coordinates (x, y, 1) of image 1 to image k.

Keypoints are detected in image 1 only, with a classical scale-space detector (kornia's
``ScaleSpaceDetector``: DoG response on ``ScalePyramid(3, 1.6, 32, double_image=True)``, 3-D quadratic
subpixel refinement, ``LAFOrienter(19)`` dominant orientation, frame radius 6 sigma: the SIFT-like
configuration of ``kornia.feature.SIFTFeatureScaleSpace``). Each local affine frame (LAF,
``[A | c]``: the patch samples c + A [-1, 1]^2) is carried into image k by the affine approximation
of the homography at its centre: c_k = H(c), A_k = J_H(c) A, with J_H the Jacobian of H at c. So the
image-k patch shows image k's own pixels (its blur, noise, lighting and the non-affine part of the
viewpoint change) rather than image k warped into image 1's frame. Frames of image k then get
detector-like noise (``PARAMS``: position, scale, orientation), as a detector run on image k would
not find exactly the mapped frame. Points whose frame (with room for that noise) leaves image k,
or whose frame leaves image 1, are dropped for that pair of images, and so are points where the
homography does not explain image k over the patch (``plane_ncc``: something in front of the plane,
like the car below graf's wall). ``redetect=True`` adds PhotoTour's criterion, that the detector
finds the point again in image k. Patches are sampled with
``kornia.feature.extract_patches_from_pyramid`` (from the pyramid level matching the frame's scale,
so large frames are not aliased).

Pairs: positive = a point's patch in image 1 vs its patch in image k; negative (eval) = a point's
patch in image 1 vs another point's patch in image k, the two points at least a frame radius apart
in image 1 so a negative never shows essentially the same content. Eval pairs are 50 % positive;
training pairs are all positive with every point at most once per block. Everything is seeded:
the same arguments give identical pairs. Ids: ``sequence_index << 32 | keypoint index``.

The above is the default construction, "dog-oriented". ``CONSTRUCTIONS`` names the others that
evaluation reports (``sequence_pairs(..., construction=NAME)``): upright DoG / Harris / Hessian
frames, and HPatches-style affine jitter at easy / hard / tough overlap (``constructions``).

Modules, top-down: ``pairs`` (eval / train pair sampling, ``sequence_pairs``) and ``writer``
(``sequence_to_shards``) use ``correspondence`` (one sequence's frames in every image and which are
valid), which uses ``constructions`` (detector, orientation, image-k frame, jitter by name),
``detection`` (the detectors, re-detection, the plane check), ``frames`` (LAF geometry, jitter,
overlap, patch extraction) and ``layout`` (sequence folders, images, H files); ``params`` holds
``PARAMS``. Import from ``pipeline.data.sequences``: the names below are its public API.
"""

from pipeline.data.sequences.constructions import CONSTRUCTIONS, Construction, get_construction
from pipeline.data.sequences.correspondence import Correspondences, _correspondences, correspondences
from pipeline.data.sequences.detection import (DETECTORS, best_redetection, detect_frames, on_plane, plane_ncc,
                                               redetected)
from pipeline.data.sequences.frames import (affine_jitter, circle_overlap_error, ellipse_overlap, extract,
                                            frames_inside, jitter_frames, laf_angle, laf_scale, map_frames,
                                            upright_frames)
from pipeline.data.sequences.layout import (IMAGE_EXTS, ImageSequence, find_sequences, open_sequence, read_homography,
                                            read_image)
from pipeline.data.sequences.pairs import ID_SHIFT, eval_pairs, sequence_pairs
from pipeline.data.sequences.params import PARAMS
from pipeline.data.sequences.writer import sequence_to_shards

__all__ = ["CONSTRUCTIONS", "DETECTORS", "ID_SHIFT", "IMAGE_EXTS", "PARAMS", "Construction", "Correspondences",
           "ImageSequence", "affine_jitter", "best_redetection", "circle_overlap_error", "correspondences", "detect_frames",
           "ellipse_overlap", "eval_pairs", "extract", "find_sequences", "frames_inside", "get_construction",
           "jitter_frames", "laf_angle", "laf_scale", "map_frames", "on_plane", "open_sequence", "plane_ncc",
           "read_homography", "read_image", "redetected", "sequence_pairs", "sequence_to_shards",
           "upright_frames"]
