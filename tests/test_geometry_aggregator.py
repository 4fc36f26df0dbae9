"""VGGT aggregator: streaming vs full forward, early stop, no retained references, RoPE convention, bad inputs."""
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from geoalign.geometry import VGGTAggregator, VGGTAggregatorConfig, count_parameters
from geoalign.geometry.layers import Rope2D, grid_positions


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = VGGTAggregatorConfig.tiny()
    model = VGGTAggregator(cfg)
    # Larger LayerScale than the 0.01 init so that every block visibly changes the stream.
    with torch.no_grad():
        for blk in list(model.frame_blocks) + list(model.global_blocks):
            blk.ls1.gamma.fill_(0.5)
            blk.ls2.gamma.fill_(0.5)
        model.camera_token.normal_()
        model.register_token.normal_()
    return model


def _images(b=2, s=3, h=28, w=42, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, s, 3, h, w, generator=g)


def _count_calls(model):
    calls = []
    handles = []
    for kind in ("frame_blocks", "global_blocks"):
        for i, blk in enumerate(getattr(model, kind)):
            handles.append(blk.register_forward_pre_hook(lambda m, a, kind=kind, i=i: calls.append((kind, i))))
    return calls, handles


def test_streaming_matches_full_forward(tiny):
    x = _images()
    full = tiny(x)
    assert len(full) == tiny.depth
    ps = tiny.patch_start_idx
    assert ps == 5
    assert full[0].shape == (2, 3, ps + 2 * 3, 2 * 64)
    got = list(tiny.iter_layers(x, [0, 1, 2, 3]))
    assert [i for i, _ in got] == [0, 1, 2, 3]
    for i, t in got:
        assert t.shape == (2, 3, 2 * 3, 128)
        torch.testing.assert_close(t, full[i][:, :, ps:], rtol=0, atol=0)
    # frame half and global half differ, and the layers differ from each other
    assert not torch.allclose(got[1][1][..., :64], got[1][1][..., 64:])
    assert not torch.allclose(got[1][1], got[2][1])


def test_streaming_order_and_duplicates(tiny):
    x = _images(b=1, s=2)
    full = tiny(x)
    got = list(tiny.iter_layers(x, [2, 0, 2]))
    assert [i for i, _ in got] == [0, 2]
    torch.testing.assert_close(got[1][1], full[2][:, :, 5:], rtol=0, atol=0)


def test_streaming_stops_early(tiny):
    x = _images(b=1, s=2)
    calls, handles = _count_calls(tiny)
    try:
        out = list(tiny.iter_layers(x, [1]))
        assert [i for i, _ in out] == [1]
        assert calls == [("frame_blocks", 0), ("global_blocks", 0), ("frame_blocks", 1), ("global_blocks", 1)]
        calls.clear()
        tiny(x)
        assert len(calls) == 2 * tiny.depth
        # lazily: nothing runs before the first next(), and breaking out stops the work
        calls.clear()
        it = tiny.iter_layers(x, [0, 3])
        assert calls == []
        i, _ = next(it)
        assert i == 0 and len(calls) == 2
        it.close()
        assert len(calls) == 2
    finally:
        for h in handles:
            h.remove()


def test_streaming_keeps_no_reference(tiny):
    x = _images(b=1, s=2)
    it = tiny.iter_layers(x, [0, 1, 3])
    refs = []
    for i, t in it:
        refs.append(weakref.ref(t))
        del t
        gc.collect()
        # the generator is suspended here; the tensor it yielded must already be gone
        assert refs[-1]() is None, f"layer {i} still referenced after the caller dropped it"
    assert len(refs) == 3


def test_no_grad_and_grad_mode_not_leaked(tiny):
    x = _images(b=1, s=2)
    assert torch.is_grad_enabled()
    for _, t in tiny.iter_layers(x, [0, 1]):
        assert not t.requires_grad
        # the caller's code runs with its own grad mode, not the generator's no_grad
        assert torch.is_grad_enabled()
    assert all(not p.requires_grad for p in tiny.parameters())
    assert not tiny.training
    tiny.train()
    assert not tiny.training  # frozen aggregator stays in eval mode


def test_out_dtype_and_bf16_autocast_cpu(tiny):
    x = _images(b=1, s=2)
    (i, t), = list(tiny.iter_layers(x, [1], out_dtype=torch.bfloat16))
    assert t.dtype == torch.bfloat16
    (i, t32), = list(tiny.iter_layers(x, [1]))
    assert t32.dtype == torch.float32
    (i, tac), = list(tiny.iter_layers(x, [1], autocast=torch.bfloat16))
    assert tac.shape == t32.shape
    assert (tac.float() - t32).abs().max() < 0.25 * t32.abs().max()


def test_single_frame_and_4d_input(tiny):
    x = _images(b=1, s=1)
    full = tiny(x[0])  # [S, 3, H, W] is taken as B = 1
    (i, t), = list(tiny.iter_layers(x[0], [3]))
    torch.testing.assert_close(t, full[3][:, :, 5:], rtol=0, atol=0)


def test_first_frame_uses_its_own_special_tokens(tiny):
    # frame 0 gets camera_token[:, 0], frames 1.. get camera_token[:, 1]: swapping frames changes outputs
    x = _images(b=1, s=2)
    a = tiny(x)[0]
    b = tiny(x.flip(1))[0]
    assert not torch.allclose(a[:, 0], b[:, 1])
    tok = VGGTAggregator._expand_special(tiny.camera_token, 2, 3)
    assert tok.shape == (6, 1, 64)
    torch.testing.assert_close(tok[0], tiny.camera_token[0, 0])
    torch.testing.assert_close(tok[1], tiny.camera_token[0, 1])
    torch.testing.assert_close(tok[3], tiny.camera_token[0, 0])


def _rope_reference(t, pos, freq):
    """Straightforward 2D RoPE: y on the first half of the head dim, x on the second, rotate-half pairs."""
    d = t.shape[-1] // 2
    inv = 1.0 / (freq ** (torch.arange(0, d, 2).float() / d))
    out = []
    for half, p in zip(t.chunk(2, dim=-1), (pos[:, 0], pos[:, 1])):
        ang = p.float()[:, None] * inv[None]
        ang = torch.cat([ang, ang], dim=-1)
        x1, x2 = half[..., : d // 2], half[..., d // 2:]
        rot = torch.cat([-x2, x1], dim=-1)
        out.append(half * ang.cos() + rot * ang.sin())
    return torch.cat(out, dim=-1)


def test_rope_convention():
    pos = grid_positions(3, 4, 5)
    assert pos.shape == (17, 2)
    assert pos[:5].eq(0).all()
    assert pos[5].tolist() == [1, 1] and pos[6].tolist() == [1, 2] and pos[9].tolist() == [2, 1]
    rope = Rope2D(pos, 16, 100.0)
    q = torch.randn(2, 3, 17, 16)
    torch.testing.assert_close(rope.apply(q), _rope_reference(q, pos, 100.0))
    # global attention: S frames concatenated, each with the same per-frame positions
    qg = torch.randn(2, 3, 3 * 17, 16)
    ref = _rope_reference(qg, pos.repeat(3, 1), 100.0)
    torch.testing.assert_close(rope.apply(qg), ref)


def test_pos_embed_interpolation(tiny):
    pe = tiny.patch_embed
    assert pe.grid == 4
    same = pe.interpolated_pos_embed(4, 4, torch.float32)
    assert same.data_ptr() == pe.pos_embed.data_ptr() or torch.equal(same, pe.pos_embed)
    got = pe.interpolated_pos_embed(2, 3, torch.float32)
    grid = pe.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(2, 3), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 6, -1)
    torch.testing.assert_close(got[:, 1:], ref)
    torch.testing.assert_close(got[:, :1], pe.pos_embed[:, :1])


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(1, 2, 3, 28, 42) * 255, r"\[0, 1\].*max="),
        (torch.rand(1, 2, 3, 28, 42) - 0.5, r"\[0, 1\].*min="),
        (torch.rand(1, 2, 1, 28, 42), "3 channels"),
        (torch.rand(1, 2, 3, 30, 42), "multiples of the patch size 14"),
        (torch.rand(2, 3, 42), r"\[B, S, 3, H, W\]"),
        ((torch.rand(1, 2, 3, 28, 42) * 255).to(torch.uint8), "floating-point"),
        (torch.rand(1, 0, 3, 28, 42), "non-empty"),
    ],
)
def test_bad_images(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny.iter_layers(bad, [0])
    with pytest.raises(ValueError, match=match):
        tiny(bad)


def test_bad_layers(tiny):
    x = _images(b=1, s=1)
    with pytest.raises(ValueError, match=r"in \[0, 3\].*\[4\]"):
        tiny.iter_layers(x, [1, 4])
    with pytest.raises(ValueError, match="at least one"):
        tiny.iter_layers(x, [])


def test_config_variants_and_errors():
    for name, width in (("dinov2_vits14_reg", 384), ("dinov2_vitb14_reg", 768), ("dinov2_vitl14_reg", 1024)):
        cfg = VGGTAggregatorConfig.from_patch_embed(name)
        with torch.device("meta"):
            m = VGGTAggregator(cfg)
        assert m.patch_embed.pos_embed.shape == (1, 1370, width)
        assert m.camera_token.shape == (1, 2, 1, width)
        assert cfg.img_size == 518
    with pytest.raises(ValueError, match="patch_embed_dim must equal embed_dim"):
        VGGTAggregatorConfig(patch_embed_dim=768)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VGGTAggregatorConfig(img_size=520)
    with pytest.raises(ValueError, match="unknown DINOv2 variant"):
        VGGTAggregatorConfig.from_patch_embed("dinov2_vitl14")


def test_vggt_1b_size_on_meta():
    with torch.device("meta"):
        m = VGGTAggregator(VGGTAggregatorConfig())
    n = count_parameters(m)
    assert n == 909_112_320
    assert math.isclose(n / 1e9, 0.909, rel_tol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast_streaming_matches_full():
    torch.manual_seed(0)
    model = VGGTAggregator(VGGTAggregatorConfig.tiny()).cuda()
    x = torch.rand(2, 3, 3, 28, 42, device="cuda")
    full = model(x)                                  # bf16 autocast by default on CUDA
    got = dict(model.iter_layers(x, [1, 3]))
    for i in (1, 3):
        torch.testing.assert_close(got[i], full[i][:, :, 5:], rtol=0, atol=0)
    ref = model(x, autocast=False)[3][:, :, 5:]
    assert (got[3].float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    torch.cuda.reset_peak_memory_stats()
