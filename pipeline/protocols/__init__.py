"""The evaluation protocols users compare descriptors with, as library functions that return result
objects (``table()`` to print, ``metrics()`` to log, ``to_dict()`` for an artifact):

* ``evaluate_phototour``: UBC PhotoTour FPR95 on the m50 pairs, the HardNet paper's table;
* ``evaluate_hpatches``: hpatches-benchmark's verification, matching and retrieval mAP;
* ``evaluate_image_matching``: mean matching accuracy and homography accuracy on image sequences
  (the HPatches-sequences protocol of D2-Net).

Each one describes every patch once per model and puts kornia's SIFT in the first row.
"""

from pipeline.protocols.common import SIFT_NAME, metric_key, with_sift
from pipeline.protocols.hpatches import HPatchesResult, HPatchesTasks, evaluate_hpatches, hpatches_tasks
from pipeline.protocols.matching import ImageMatchingResult, PairMatches, evaluate_image_matching
from pipeline.protocols.phototour import PhotoTourResult, evaluate_phototour, phototour_match_files

__all__ = ["HPatchesResult", "HPatchesTasks", "ImageMatchingResult", "PairMatches", "PhotoTourResult", "SIFT_NAME",
           "evaluate_hpatches", "evaluate_image_matching", "evaluate_phototour", "hpatches_tasks", "metric_key",
           "phototour_match_files", "with_sift"]
