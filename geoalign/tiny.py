"""Tiny, offline builders of a random GeoAlign model (tokenizer, Qwen2.5-VL, VGGT and fusion configs) for tests,
benchmarks and smoke runs: nothing is downloaded."""
from __future__ import annotations

import torch

from .config import GeoAlignConfig
from .geometry.config import VGGTAggregatorConfig
from .processing import QWEN2_5_VL_CHAT_TEMPLATE, qwen_patchify

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
TEXT_HIDDEN = 64


def make_tokenizer():
    """A byte-level tokenizer (no merges: one token per byte) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_qwen_config(tokenizer=None, attn_implementation: str = "sdpa", text_head_dim: int = 16):
    """A 2-layer Qwen2.5-VL config. ``text_head_dim``: 16 (4 heads) by default; vLLM's CPU attention needs >= 32
    (32: 2 heads, 1 KV head)."""
    from transformers import Qwen2_5_VLConfig

    if text_head_dim not in (16, 32, 64):
        raise ValueError(f"text_head_dim must be 16, 32 or 64 (hidden size {TEXT_HIDDEN}), got {text_head_dim}")
    heads = TEXT_HIDDEN // text_head_dim
    half = text_head_dim // 2                      # mrope sections (t, h, w) split the rotary half: 8 -> [2, 3, 3]
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    tokenizer = tokenizer or make_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 15) // 16 * 16
    text = dict(vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1], in_channels=3)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_vggt_config() -> VGGTAggregatorConfig:
    return VGGTAggregatorConfig.tiny()      # width 64 -> D' = 128, 4 layers


def tiny_fusion_config(group_size: int = 4, backend: str = "torch") -> GeoAlignConfig:
    return GeoAlignConfig(hidden_size=TEXT_HIDDEN, geo_dim=128, bank_layers=(1, 2, 3), top_k=2,
                          group_size=group_size, projector_hidden=32, router_hidden=16, backend=backend)


def tiny_model(group_size: int = 4, seed: int = 0, backend: str = "torch", attn_implementation: str = "sdpa",
               text_head_dim: int = 16):
    from geoalign.modeling import GeoAlignForConditionalGeneration

    torch.manual_seed(seed)
    tok = make_tokenizer()
    model = GeoAlignForConditionalGeneration.from_parts(
        tiny_qwen_config(tok, text_head_dim=text_head_dim), tiny_vggt_config(), tiny_fusion_config(group_size, backend),
        attn_implementation=attn_implementation)
    # Random fusion init gives a zero-mean W_out; scale it up so the fusion visibly changes the tokens.
    return model, tok


def random_frames(num_frames: int, height: int = 70, width: int = 84, seed: int = 0) -> torch.Tensor:
    """VGGT-ready frames [S, 3, H, W] in [0, 1] (H, W multiples of 14)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_frames, 3, height, width, generator=g)


def build_inputs(tok, samples: list[torch.Tensor], group_size: int = 4, question: str = "how far?",
                 answer: str | None = None):
    """Model inputs for a batch of samples (each VGGT frames [S, 3, H, W]), without the processor class:
    crop for Qwen, patchify, expand the chat template's placeholders, left-pad."""
    from geoalign.geometry.frames import crop_for_qwen
    from geoalign.model_inputs import forward_accepts

    texts, pvs, grids = [], [], []
    pad = "<|image_pad|>" if group_size == 4 else "<|video_pad|>"
    for frames in samples:
        pv, grid = qwen_patchify(crop_for_qwen(frames), group_size)
        pvs.append(pv)
        grids.append(grid)
        kind = "image" if group_size == 4 else "video"
        n_items = frames.shape[0] if group_size == 4 else 1
        content = [{"type": kind}] * n_items + [{"type": "text", "text": question}]
        msgs = [{"role": "user", "content": content}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if answer is not None:
            text += answer + "<|im_end|>"
        parts = text.split(pad)
        out = parts[0]
        for g, part in zip(grid, parts[1:]):
            out += pad * int(g.prod() // 4) + part
        texts.append(out)
    enc = tok(texts, return_tensors="pt", padding=True)
    inputs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    key = "pixel_values" if group_size == 4 else "pixel_values_videos"
    inputs[key] = torch.cat(pvs)
    inputs["image_grid_thw" if group_size == 4 else "video_grid_thw"] = torch.cat(grids)
    if forward_accepts("mm_token_type_ids"):
        tid = tok.convert_tokens_to_ids(pad)
        inputs["mm_token_type_ids"] = (enc["input_ids"] == tid).to(torch.int64) * (1 if group_size == 4 else 2)
    inputs["vggt_pixel_values"] = list(samples)
    return inputs
