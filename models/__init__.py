"""The networks of "Optimizing Person Re-Identification using Generated Attention Masks" and the
weights format that training writes and the service reads."""

from models.config import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from models.extractor import FeatureExtractor, build_extractor, read_state_dict
from models.fingerprint import extractor_fingerprint
from models.masking import hide_top, keep_map
from models.preprocess import build_eval_transform, denormalize, preprocess_batch, to_rgb
from models.unet import MaskGenerator, build_mask_generator
from models.weights import ReidModel, WeightsError, load_weights, read_metadata, save_weights

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FeatureExtractor",
    "MaskGenerator",
    "ModelConfig",
    "ReidModel",
    "WeightsError",
    "build_eval_transform",
    "build_extractor",
    "build_mask_generator",
    "denormalize",
    "extractor_fingerprint",
    "hide_top",
    "keep_map",
    "load_weights",
    "preprocess_batch",
    "read_metadata",
    "read_state_dict",
    "save_weights",
    "to_rgb",
]
