"""Dataset adapters (real formats -> CoopFrame), the sample pipeline and the batch collator."""
from .base import CoopAdapter, DatasetError
from .batch import CoopBatch, collate
from .opv2v import Opv2vAdapter
from .pipeline import CoopSampler, PipelineConfig, Sample

__all__ = ["CoopAdapter", "DatasetError", "CoopBatch", "collate", "Opv2vAdapter", "CoopSampler",
           "PipelineConfig", "Sample"]
