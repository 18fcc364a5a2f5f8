"""Dataset adapters (real formats -> CoopFrame), the sample pipeline and the batch collator."""
from .base import CoopAdapter, DatasetError
from .batch import CoopBatch, collate
from .dair import DairV2XCAdapter
from .opv2v import Opv2vAdapter
from .pipeline import CoopSampler, PipelineConfig, Sample

__all__ = ["CoopAdapter", "DatasetError", "CoopBatch", "collate", "Opv2vAdapter", "DairV2XCAdapter", "CoopSampler",
           "PipelineConfig", "Sample"]
