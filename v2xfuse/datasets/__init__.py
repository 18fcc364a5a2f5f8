"""Dataset adapters (real formats -> CoopFrame), the sample pipeline and the batch collator."""
from .base import CoopAdapter, DatasetError, SkippedSample
from .batch import CoopBatch, collate
from .dair import DairV2XCAdapter
from .opv2v import Opv2vAdapter
from .pipeline import CoopSampler, PipelineConfig, Sample
from .v2xseq import V2XSeqAdapter

__all__ = ["CoopAdapter", "DatasetError", "SkippedSample", "CoopBatch", "collate", "Opv2vAdapter", "DairV2XCAdapter", "V2XSeqAdapter", "CoopSampler",
           "PipelineConfig", "Sample"]
