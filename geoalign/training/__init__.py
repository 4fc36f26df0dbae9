"""Training GeoAlign with a reduced memory footprint, single GPU to many (accelerate: DDP, DeepSpeed ZeRO-2, FSDP).

    from geoalign.training import TrainConfig, GeoAlignTrainer
    result = GeoAlignTrainer(TrainConfig.from_yaml("configs/train_paper.yaml")).train()

CLI: ``geoalign train --config FILE.yaml``; multi-GPU: ``torchrun --nproc_per_node=8 -m geoalign.training.cli
--config FILE.yaml``. Needs ``accelerate`` (and ``peft`` for LoRA, ``deepspeed`` for ZeRO-2), imported lazily.
"""
from .config import TrainConfig
from .data import (GeoAlignCollator, GeoAlignSFTDataset, MissingMediaError, Record, RecordError, load_records,
                   parse_record, tokenize_conversation)

__all__ = ["TrainConfig", "GeoAlignTrainer", "TrainResult", "GeoAlignSFTDataset", "GeoAlignCollator", "Record",
           "RecordError", "MissingMediaError", "load_records", "parse_record", "tokenize_conversation"]


def __getattr__(name):
    if name in ("GeoAlignTrainer", "TrainResult"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
