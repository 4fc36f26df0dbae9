"""Training set-ups on the tiny model: a TrainConfig and a trainer in process, a saved model + dataset + train.yaml for
a `geoalign train` process, and the base checkpoints (tiny Qwen2.5-VL, VGGT) a recipe starts from."""
from __future__ import annotations

import os

import torch


def train_config(data, out, **kw):
    """A TrainConfig for the tiny model on the synthetic colour dataset ``data`` = (records path, media root),
    single process, CPU, fp32, no logging or checkpoints unless asked."""
    from geoalign.training.config import TrainConfig

    path, root = data
    base = dict(train_data=[path], media_root=root, output_dir=str(out), precision="no", distributed="ddp",
                global_batch_size=2, per_device_batch_size=1, learning_rate=3e-3, num_workers=0, logging_steps=0,
                save_steps=0, progress_bar=False, num_frames=4, save_final_model=False)
    base.update(kw)
    return TrainConfig(**base)


def tiny_trainer(cfg, seed=0, perturb=False):
    """A GeoAlignTrainer on a tiny random model; perturb: shift every trainable weight (a resume must overwrite)."""
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model
    from geoalign.training.trainer import GeoAlignTrainer

    model, tok = tiny_model(seed=seed)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("model.vggt.") and ".visual." not in name:
                    p.add_(torch.randn_like(p) * 0.1)
    proc = GeoAlignProcessor(tok, None, group_size=4, num_frames=cfg.num_frames)
    return GeoAlignTrainer(cfg, model=model, processor=proc)


def write_base_checkpoints(root, seed: int = 0):
    """A tiny Qwen2.5-VL directory (with tokenizer and chat template) and a VGGT checkpoint (official
    ``aggregator.*`` names + vggt_config.json) under ``root``: what ``qwen_path`` / ``vggt_path`` name. Returns
    (qwen_dir, vggt_dir)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from geoalign.atomic_files import save_safetensors, write_json
    from geoalign.geometry.aggregator import VGGTAggregator
    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import make_tokenizer, tiny_qwen_config, tiny_vggt_config

    torch.manual_seed(seed)
    tok = make_tokenizer()
    qwen_dir, vggt_dir = os.path.join(root, "qwen"), os.path.join(root, "vggt")
    Qwen2_5_VLForConditionalGeneration(tiny_qwen_config(tok)).save_pretrained(qwen_dir)
    GeoAlignProcessor(tok, None, group_size=4).save_pretrained(qwen_dir)
    vggt = VGGTAggregator(tiny_vggt_config())
    save_safetensors(os.path.join(vggt_dir, "model.safetensors"),
                     {"aggregator." + k: v.contiguous() for k, v in vggt.state_dict().items()})
    write_json(os.path.join(vggt_dir, "vggt_config.json"), vggt.config.to_dict())
    return qwen_dir, vggt_dir


def write_train_setup(root):
    """Under ``root``: a tiny saved GeoAlign model (``model/``), a synthetic colour dataset of 8 records
    (``data/``) and ``train.yaml`` training it on one CPU process (3 steps of 4 records, a checkpoint every 2 steps,
    a log record every step). Returns ``root``."""
    import textwrap

    from geoalign.processing import GeoAlignProcessor
    from geoalign.tiny import tiny_model
    from geoalign.training.synthetic import make_colour_dataset

    data = make_colour_dataset(str(root / "data"), 8, frame_counts=(1, 2), height=8)
    model, tok = tiny_model(seed=0)
    model.save_pretrained(str(root / "model"), processor=GeoAlignProcessor(tok, None, group_size=4, num_frames=4))
    (root / "train.yaml").write_text(textwrap.dedent(f"""
        model_path: {root / 'model'}
        train_data: [{data}]
        media_root: {root / 'data'}
        num_frames: 4
        precision: "no"
        distributed: ddp
        global_batch_size: 4
        per_device_batch_size: 1
        learning_rate: 3.0e-3
        max_steps: 3
        save_steps: 2
        logging_steps: 1
        num_workers: 0
        progress_bar: false
        save_final_model: false
    """))
    return root
