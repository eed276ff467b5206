"""Region features the way bottom-up attention makes them (chapter 2).

ViLBERT and UNITER never see pixels. They see a *set of regions*: for every
box a detector proposed, a feature vector pooled from a CNN feature map with
RoI pooling, the box itself, and the detector's class distribution for that
box. Anderson et al.'s "bottom-up attention" (a Faster R-CNN trained on Visual
Genome, 10-36 boxes per image, 2048-d pooled features, 1600 classes plus
background) is the standard source. This package builds the same thing for the
synthetic world of :mod:`fusionlib.data.shapes`, small enough to train in
seconds on a CPU, one step per module:

* :mod:`~fusionlib.vision.boxes`: the box convention, :func:`check_boxes`,
  and the location features :func:`loc5` (ViLBERT) and :func:`loc7` (UNITER).
* :mod:`~fusionlib.vision.proposals`: :func:`propose_regions`, what a region
  proposal network hands the box head (objects, jittered objects, background).
* :mod:`~fusionlib.vision.detector`: :class:`DetectorConfig` and
  :class:`RegionDetector` (CNN, ``roi_align``, box head, classifier).
* :mod:`~fusionlib.vision.training`: :func:`train_detector` and
  :func:`evaluate_detector`.
* :mod:`~fusionlib.vision.regions`: :class:`RegionFeatures`, the padded
  tensors every model reads.
* :mod:`~fusionlib.vision.extraction`: :func:`extract_region_features`, the
  detector run over every scene's proposals.
* :mod:`~fusionlib.vision.cache`: :func:`load_or_build_features`, the same
  cached on disk under a key that hashes both configs, from the detector the
  repository commits for the book's world (:func:`committed_detector_path`).
* :mod:`~fusionlib.vision.images`: real images, opt-in and never downloading
  (:func:`extract_grid_features`, :class:`FasterRCNNRegions`).
* :mod:`~fusionlib.vision.scenes`: what the rest reads from a scene, as tensors.

Everything is importable from ``fusionlib.vision`` itself.
"""

from .boxes import check_boxes, loc5, loc7
from .cache import (
    SPLITS,
    cache_key,
    commit_detector,
    committed_detector_path,
    detector_cache_path,
    features_cache_path,
    features_dir,
    load_or_build_features,
    load_or_train_detector,
)
from .detector import (
    BACKGROUND,
    DetectorConfig,
    RegionDetector,
    detector_class_names,
    detector_fingerprint,
    load_detector,
    save_detector,
)
from .extraction import extract_region_features
from .images import (
    FASTER_RCNN_FILE,
    FASTER_RCNN_URL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESNET18_FILE,
    RESNET18_URL,
    FasterRCNNRegions,
    extract_grid_features,
    faster_rcnn_weights_path,
    grid_boxes,
    resnet18_backbone,
)
from .proposals import propose_regions
from .regions import FEATURES_FORMAT_VERSION, RegionFeatures
from .training import classify_boxes, evaluate_detector, train_detector

__all__ = [
    "check_boxes",
    "loc5",
    "loc7",
    "propose_regions",
    "BACKGROUND",
    "DetectorConfig",
    "RegionDetector",
    "detector_class_names",
    "detector_fingerprint",
    "save_detector",
    "load_detector",
    "train_detector",
    "classify_boxes",
    "evaluate_detector",
    "FEATURES_FORMAT_VERSION",
    "RegionFeatures",
    "extract_region_features",
    "SPLITS",
    "cache_key",
    "commit_detector",
    "committed_detector_path",
    "features_dir",
    "detector_cache_path",
    "features_cache_path",
    "load_or_train_detector",
    "load_or_build_features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESNET18_FILE",
    "RESNET18_URL",
    "FASTER_RCNN_FILE",
    "FASTER_RCNN_URL",
    "grid_boxes",
    "resnet18_backbone",
    "extract_grid_features",
    "faster_rcnn_weights_path",
    "FasterRCNNRegions",
]
