"""SAM backends and a batched, windowed predictor (see build.py and predictor.py)."""
from crowdseg.sam.build import (CHECKPOINT_SOURCES, MODEL_TYPES, build_sam, build_sam_from_config, guess_model_type,
                               load_checkpoint)
from crowdseg.sam.predictor import BatchedSamPredictor, ImageEmbedding, resize_to_input

__all__ = ["BatchedSamPredictor", "CHECKPOINT_SOURCES", "ImageEmbedding", "MODEL_TYPES", "build_sam",
           "build_sam_from_config", "guess_model_type", "load_checkpoint", "resize_to_input"]
