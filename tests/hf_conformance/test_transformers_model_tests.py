"""transformers' own model tests run against GeoAlign (issue 34): ``ModelTesterMixin`` (and ``GenerationTesterMixin``
where available) of the installed transformers, with a tester of our own. Where they come from and what is stood in:
tests/hf_conformance/transformers_tests.py. Two classes: GeoAlign (``GeoAlignModel``,
``GeoAlignForConditionalGeneration``) and, as the baseline the README reports beside it, plain Qwen2.5-VL through the
same tester (which also shows that the tester itself passes transformers' tests).

Skips: the ones upstream's Qwen2.5-VL test class has (``UPSTREAM_SKIPS``, with its reasons; both classes) and
GeoAlign's (``GEOALIGN_SKIPS``, each with its reason). About 35 s on 2 cores (first run: + the sdist download).
"""
from __future__ import annotations

import unittest

import pytest
import torch
from packaging.version import Version

transformers = pytest.importorskip("transformers")

from transformers_tests import load  # noqa: E402

HF = load()
if isinstance(HF, str):
    pytest.skip(f"transformers' model tests are unavailable: {HF}", allow_module_level=True)

from geoalign.config import GeoAlignConfig  # noqa: E402
from geoalign.model_config import GeoAlignModelConfig  # noqa: E402
from geoalign.model_inputs import forward_accepts  # noqa: E402
from geoalign.modeling import GeoAlignForConditionalGeneration, GeoAlignModel  # noqa: E402
from geoalign.processing import qwen_patchify  # noqa: E402
from geoalign.tiny import tiny_vggt_config  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel  # noqa: E402

ModelTesterMixin = HF.module("test_modeling_common").ModelTesterMixin
GenerationTesterMixin = HF.module("generation.test_utils").GenerationTesterMixin

#: upstream Qwen2.5-VL's skips (transformers/tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py), with its reasons
UPSTREAM_SKIPS = {
    "test_feed_forward_chunking": "Feedforward chunking is not yet supported",
    "test_cpu_offload": "CPU offload is not yet supported",
    "test_disk_offload_bin": "Some undefined behavior encountered with test versions of this model",
    "test_disk_offload_safetensors": "Some undefined behavior encountered with test versions of this model",
    "test_model_parallelism": "Some undefined behavior encountered with test versions of this model",
    "test_multi_gpu_data_parallel_forward": "Got `CUDA error: misaligned address` with PyTorch 2.0.0",
    "test_model_is_small": "We cannot configure to output a smaller model",
}
#: GeoAlign's own skips, each with its reason
_VIDEO = ("transformers' video-feature tests pass get_video_features only the inputs whose names contain 'video' "
          "(they drop vggt_pixel_values), and this G = 4 model fuses images: a video into it is an error by design. "
          "get_video_features with the geometry: tests/test_model_transformers_api.py")
GEOALIGN_SKIPS: dict[str, str] = {
    "test_get_video_features_output_0": _VIDEO, "test_get_video_features_output_1": _VIDEO,
    "test_get_video_features_output_2": _VIDEO, "test_get_video_features_hidden_states": _VIDEO,
    "test_get_video_features_attentions": _VIDEO, "test_get_video_features_pooler_output": _VIDEO,
    "test_model_weights_reload_no_missing_tied_weights":
        "it loads a checkpoint with every weight removed; GeoAlign refuses a checkpoint without its fusion / VGGT "
        "weights by design (it would run with uninitialised ones), naming the missing keys: "
        "tests/test_model_transformers_api.py::test_a_checkpoint_without_geoalign_weights_is_refused",
    "test_can_init_all_missing_weights":
        "it loads an empty state_dict and expects _init_weights to recreate every weight; GeoAlign's VGGT and fusion "
        "are initialised by their own constructors (VGGT always comes from its checkpoint, the fusion is trained or "
        "loaded), so an empty state_dict is refused (as the reload test above); the part _init_weights owns, VGGT's "
        "non-persistent buffers, is tested on every meta-device path in tests/test_model_transformers_api.py",
}
#: skips for transformers versions before 5.25 (measured with 5.17, the lowest this package supports, and 5.25)
OLDER_TRANSFORMERS = Version(transformers.__version__) < Version("5.25")
_EMBEDS = ("under transformers < 5.25 this test fails for plain Qwen2.5-VL through the same tester as well (measured "
           "with 5.17): an upstream behaviour of that version, passing from 5.25")
UPSTREAM_SKIPS_OLDER = {"test_inputs_embeds_matches_input_ids": _EMBEDS} if OLDER_TRANSFORMERS else {}
_FROZEN = ("transformers < 5.25's check wants a gradient for every parameter after it unfreezes them all; "
           "GeoAlign runs VGGT without autograd by design (a frozen encoder; the fusion's own gradients are "
           "checked in tests/test_parity.py). From 5.25 the test compares the gradient sets with and without "
           "checkpointing, and passes")
GEOALIGN_SKIPS_OLDER = {name: _FROZEN for name in (
    "test_training_gradient_checkpointing", "test_training_gradient_checkpointing_use_reentrant_false",
    "test_training_gradient_checkpointing_use_reentrant_true")} if OLDER_TRANSFORMERS else {}
#: transformers' tests tell a base model from a head model by its class name in transformers' own static tables
#: (MODEL_MAPPING_NAMES, ...): an out-of-tree model is entered there for the run, as an in-tree one would be
STATIC_NAME_TABLES = {"MODEL_MAPPING_NAMES": "GeoAlignModel",
                      "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "GeoAlignForConditionalGeneration"}


class GeoAlignModelTester:
    """Tiny GeoAlign models and inputs for transformers' mixins, sized as upstream's Qwen2.5-VL tester (text width 32,
    4 layers, vocabulary 99, special tokens at ids 0-6, tied embeddings, vision width 32) with what GeoAlign needs on
    top: 2 x 2 patch merging (one visual token per 2 x 2 VGGT patches), a tiny VGGT (4 layers) and a fusion with 3
    bank layers. ``batch_size`` samples of one 56 x 56 frame each: 4 visual tokens per sample."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2
    vision_start_token_id, image_token_id, video_token_id, vision_end_token_id = 3, 4, 5, 6

    def __init__(self, parent, plain_qwen: bool = False, batch_size: int = 3, text_length: int = 7):
        self.parent = parent
        self.plain_qwen = plain_qwen
        self.batch_size = batch_size
        self.is_training = True
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.vision_config = {"num_hidden_layers": 2}  # the vision tower's depth, for the feature tests' counts
        self.vocab_size = 99
        self.num_image_tokens = 4
        self.seq_length = text_length + self.num_image_tokens + 1

    def get_config(self):
        from transformers import Qwen2_5_VLConfig

        text = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=37,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=2, max_position_embeddings=512, hidden_act="silu",
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                    tie_word_embeddings=True)
        vision = dict(depth=self.vision_config["num_hidden_layers"], hidden_size=32, intermediate_size=32, num_heads=4, out_hidden_size=self.hidden_size,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1], in_channels=3, hidden_act="silu")
        qwen = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=self.image_token_id,
                                video_token_id=self.video_token_id, vision_start_token_id=self.vision_start_token_id,
                                vision_end_token_id=self.vision_end_token_id, tie_word_embeddings=True)
        if self.plain_qwen:
            return qwen
        fusion = GeoAlignConfig(hidden_size=self.hidden_size, geo_dim=2 * tiny_vggt_config().embed_dim,
                                bank_layers=(1, 2, 3), top_k=2, group_size=4, projector_hidden=32, router_hidden=16)
        return GeoAlignModelConfig.from_parts(qwen, tiny_vggt_config(), fusion)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        frames = torch.rand(self.batch_size, 1, 3, 56, 56)            # [B, S, 3, H, W] in [0, 1]
        patches = [qwen_patchify(f, 4) for f in frames]
        input_ids = torch.randint(7, self.vocab_size, (self.batch_size, self.seq_length))
        input_ids[:, 1] = self.vision_start_token_id  # the image early: tests overwrite the last positions
        input_ids[:, 2:2 + self.num_image_tokens] = self.image_token_id
        input_ids[:, -1] = self.pad_token_id
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                  "pixel_values": torch.cat([pv for pv, _ in patches]),
                  "image_grid_thw": torch.cat([grid for _, grid in patches])}
        if forward_accepts("mm_token_type_ids"):
            inputs["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        if not self.plain_qwen:
            inputs["vggt_pixel_values"] = frames
        return config, inputs


class _ConformanceTest(ModelTesterMixin, GenerationTesterMixin):
    pipeline_model_mapping = {}
    _is_composite = True
    test_can_init_all_missing_weights_before_2023 = True  # run it (our config file has no copyright year)
    plain_qwen = False

    def setUp(self):
        self.model_tester = GeoAlignModelTester(self, plain_qwen=self.plain_qwen)


class GeoAlignTransformersModelTest(_ConformanceTest, unittest.TestCase):
    all_model_classes = (GeoAlignModel, GeoAlignForConditionalGeneration)

    @classmethod
    def setUpClass(cls):
        from unittest import mock

        from transformers.models.auto import modeling_auto

        cls._static_names = [mock.patch.dict(getattr(modeling_auto, table), {GeoAlignModelConfig.model_type: name})
                             for table, name in STATIC_NAME_TABLES.items()]
        for patch in cls._static_names:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in cls._static_names:
            patch.stop()


class PlainQwenTransformersModelTest(_ConformanceTest, unittest.TestCase):
    """The baseline: the same tester and skips (upstream's only) on transformers' own Qwen2.5-VL."""

    all_model_classes = (Qwen2_5_VLModel, Qwen2_5_VLForConditionalGeneration)
    plain_qwen = True


def _skip(name: str, reason: str):
    def test(self):
        raise unittest.SkipTest(reason)

    test.__name__ = name
    return test


for _cls, _skips in ((GeoAlignTransformersModelTest, {**UPSTREAM_SKIPS, **UPSTREAM_SKIPS_OLDER, **GEOALIGN_SKIPS,
                                                      **GEOALIGN_SKIPS_OLDER}),
                     (PlainQwenTransformersModelTest, {**UPSTREAM_SKIPS, **UPSTREAM_SKIPS_OLDER})):
    for _name, _reason in _skips.items():
        if hasattr(_cls, _name):  # a skip of a test this transformers version lacks is not added (a misspelt
            # name is not either: the test it meant then runs, and fails where it should be skipped)
            setattr(_cls, _name, _skip(_name, _reason))
del _cls, _skips, _name, _reason  # a module-level name bound to a TestCase would be collected a second time
