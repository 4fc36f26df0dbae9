"""Training GeoAlign with a reduced memory footprint, single GPU to many (accelerate: DDP, DeepSpeed ZeRO-2, FSDP).

    from geoalign.training import TrainConfig, GeoAlignTrainer
    result = GeoAlignTrainer(TrainConfig.from_yaml("configs/train_paper.yaml")).train()

CLI: ``geoalign train --config FILE.yaml``; multi-GPU: ``torchrun --nproc_per_node=8 -m geoalign.training.cli
--config FILE.yaml``. Needs ``accelerate`` (and ``peft`` for LoRA, ``deepspeed`` for ZeRO-2), imported lazily.
"""
from __future__ import annotations

from ..lazy_exports import lazy_exports

#: public name -> the submodule that defines it (imported on first use: ``geoalign train --help`` needs no torch)
_EXPORTS = {
    "TrainConfig": "config",
    "GeoAlignTrainer": "trainer", "TrainResult": "trainer",
    "GeoAlignSFTDataset": "data", "GeoAlignCollator": "data", "Record": "data", "RecordError": "data",
    "MissingMediaError": "data", "load_records": "data", "parse_record": "data", "tokenize_conversation": "data",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
