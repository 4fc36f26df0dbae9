"""SparseBackend: the one protocol that :class:`geoalign.fusion.FusionStream` drives, with the shared defaults.

A forward is: ``route`` (Top-K routes from Q alone), ``bank_rows`` (the routed (token, slot) pairs grouped by bank
layer), ``open_bank`` (a :class:`Bank`: h_bar [L, H], zero, fp32/fp64), then per bank layer as it arrives
``add_layer`` (h_bar += alpha * GELU(W1 x + b1) for that layer's pairs, in place, no autograd; a backend may leave
the GEMM for ``complete_bank``), then ``close_bank`` (``complete_bank``, then one autograd node for the whole bank,
whose backward is one grouped ``bank_backward`` over every layer), then ``finish`` (eq. 8 and its variants).

The defaults here are plain PyTorch and exact; a backend overrides what it accelerates:

  torch   bank_layer / bank_backward in torch (the backward loops over the layers, dW1 accumulated in fp32)
  triton  route (fused fc2 + Top-K + softmax), bank_rows (one counting-sort launch), bank_layer (gather +
          normalise; without a gradient also GEMM1 with the fused epilogue into h_bar), complete_bank (with a
          gradient: GEMM1 for every layer's taped pairs in one launch, then h_bar from z), bank_backward (three
          launches for all layers), output (GEMMs), fold
  cuda    route (warp Top-K), bank_rows (counting sort on the device), the gather + normalise of bank_layer

Variants (paper Table 4) need no backend code: single / mean / dense use fixed routes through the same bank
(:func:`geoalign.routing.route_fixed`); the split projector runs a one-layer bank per layer
(:meth:`SparseBackend.accumulate_split`); FiLM and the gated fusions apply :meth:`geoalign.GeoAlignFusion.inject`.
"""
from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from geoalign_kernels.runtime import acc_dtype

from ..routing import BankRows, Routing, bank_rows, kept_softmax, route_fixed, topk_lower_index
from .registry import LOADED, REGISTRY, backend_class

logger = logging.getLogger("geoalign.fusion")


class Bank:
    """The routed bank of one forward (docs/architecture.md, "Backends").

    h_bar        [L, H] fp32 (fp64 for fp64 parameters), filled in place: one bank layer at a time as the layers
                 arrive, or (a backend that defers GEMM1 while a tape is kept) all at once in complete_bank
    alpha        [L, K] routing weights (differentiable); gather_index [L, G] rows into each layer
    rows         :class:`geoalign.routing.BankRows`, the pairs grouped by bank layer j = 0..M-1
    ln_weights   M LayerNorm weights [D'] (ln_biases likewise), one per bank layer of this bank
    fc1_weight   [H, G*D'] and fc1_bias [H], shared by the bank's layers
    save         whether backward will run (grad mode on and something needs a gradient): then the backend keeps
                 ``tape``, the tensors its ``bank_backward`` needs (backend-specific list)
    """

    def __init__(self, h_bar, alpha, gather_index, rows: BankRows, ln_weights, ln_biases, fc1_weight, fc1_bias,
                 eps: float):
        self.h_bar, self.alpha, self.gather_index, self.rows = h_bar, alpha, gather_index, rows
        self.ln_weights, self.ln_biases = list(ln_weights), list(ln_biases)
        self.fc1_weight, self.fc1_bias, self.eps = fc1_weight, fc1_bias, eps
        self.save = torch.is_grad_enabled() and any(t.requires_grad for t in (alpha,) + self.params)
        self.tape: list = []
        self.scratch = None  # the backend's forward-only buffers, if it needs any
        self.added = [False] * len(self.ln_weights)
        # (inference tensors have no version counter; without a backward there is nothing to disagree with)
        self._versions = [t._version for t in (alpha,) + self.params] if self.save else None

    @property
    def num_layers(self) -> int:
        return len(self.ln_weights)

    @property
    def params(self) -> tuple:
        """(fc1_weight, fc1_bias, *ln_weights, *ln_biases): the bank's differentiable inputs besides alpha."""
        return (self.fc1_weight, self.fc1_bias, *self.ln_weights, *self.ln_biases)

    def check_unchanged(self) -> None:
        """The layers were computed with alpha and the parameters as they were at open_bank: an in-place update
        since then would make the forward and its backward disagree. (Not under torch.compile, which traces
        versions symbolically; its functionalisation orders the updates anyway.)"""
        if self._versions is None or torch.compiler.is_compiling():
            return
        for t, version in zip((self.alpha,) + self.params, self._versions):
            if t._version != version:
                raise RuntimeError("a bank parameter or alpha was modified in place between begin() and finish() "
                                   "of a fused forward; update parameters only between forwards")


class BankFunction(torch.autograd.Function):
    """The whole bank as one autograd node. The forward has already run layer by layer into h_bar (under no_grad,
    as the layers streamed in); this node hands back h_bar (marked dirty: it was updated in place) and saves the
    backend's tape, so backward is one grouped ``bank_backward`` over every layer. Autograd frees the tape after
    backward like any saved tensor (retain_graph keeps it). Only tensors, a backend name and ints cross the
    boundary (plus the host copy of the offsets when the forward made one), so torch.compile traces it."""

    @staticmethod
    def forward(ctx, backend_name: str, host_offsets: tuple | None, h_bar, alpha, tokens, slots, offsets,
                fc1_weight, fc1_bias, *ln_params_and_tape):
        ctx.mark_dirty(h_bar)
        ctx.backend_name, ctx.host_offsets = backend_name, host_offsets
        ctx.save_for_backward(alpha, tokens, slots, offsets, fc1_weight, fc1_bias, *ln_params_and_tape)
        return h_bar

    @staticmethod
    def backward(ctx, d_h_bar):
        alpha, tokens, slots, offsets, fc1_weight, fc1_bias, *rest = ctx.saved_tensors
        M = offsets.shape[0] - 1
        rows = BankRows(tokens, slots, offsets, ctx.host_offsets)
        ln_weights, ln_biases, tape = rest[:M], rest[M:2 * M], rest[2 * M:]
        need = ctx.needs_input_grad  # (name, host offsets, h_bar, alpha, tokens, slots, offsets, fc1_w, fc1_b, ln..., tape...)
        need_alpha, need_w1, need_b1, need_ln = need[3], need[7], need[8], any(need[9:9 + 2 * M])
        d_alpha, d_w1, d_b1, d_ln_w, d_ln_b = LOADED[ctx.backend_name].bank_backward(  # loaded by the forward
            rows, alpha, ln_weights, ln_biases, fc1_weight, tape, d_h_bar,
            need_alpha=need_alpha, need_ln=need_ln, need_w1=need_w1, need_b1=need_b1)
        ln_grads = list(d_ln_w.unbind(0)) + list(d_ln_b.unbind(0)) if need_ln else [None] * (2 * M)
        return (None, None, None, d_alpha, None, None, None, d_w1, d_b1, *ln_grads, *([None] * len(tape)))


class SparseBackend:
    """Exact sparse streaming GeoAlign. Stateless apart from the W_out.W2 fold cache: the fusion module holds the
    parameters and is passed to every call.

    fold_output: at inference (no gradient needed) use W_out.W2 folded into one [D, H] matrix (one GEMM instead of
    two; cached per weight version). With a gradient needed the unfolded path runs."""

    name = "base"   # a subclass's name is its key in geoalign.backends.REGISTRY

    def __init__(self, fold_output: bool = False):
        # the bank's backward finds the class by name: a registered name always means the registry's class (a
        # subclass keeping the name cannot take it over); another name (a test's own backend) means this class
        if self.name in REGISTRY:
            backend_class(self.name)
        else:
            LOADED.setdefault(self.name, type(self))
        self.fold_output = fold_output
        self._fold_key = None
        self._fold = None

    # ------------------------------------------------------------------ the stream
    def open_stream(self, fusion, q: torch.Tensor, gather_index: torch.Tensor) -> "SparseStream":
        """One fused forward: routes now (the router reads only Q), then ``add(i, layer)`` per bank layer and
        ``finish()`` (the shape every backend's stream has; geoalign.fusion.FusionStream drives it)."""
        cfg = fusion.config
        if self.fold_output and not cfg.is_paper_default_path:
            raise ValueError(f"fold_output folds W_out.W2 and needs projector='shared' and fusion='add', got "
                             f"projector={cfg.projector!r}, fusion={cfg.fusion!r}")
        if self.name != "torch" and not cfg.is_paper_default_path:
            _notice_once((self.name, cfg.projector, cfg.fusion),
                         f"geoalign: backend {self.name!r} runs the bank for projector={cfg.projector!r}, "
                         f"fusion={cfg.fusion!r}; the output stage (W2 / eq. 8 variant, L rows) runs in torch")
        return SparseStream(self, fusion, q, gather_index)

    def routes(self, fusion, q: torch.Tensor) -> Routing:
        """The routes of q: the backend's router (feature_usage "dynamic"), else the fixed routes of the Table 4
        variants single / mean / dense (geoalign.routing.route_fixed; the same bank op, exact)."""
        return self.route(fusion, q) if fusion.config.feature_usage == "dynamic" else route_fixed(fusion, q)

    # ------------------------------------------------------------------ routing
    def route(self, fusion, q: torch.Tensor) -> Routing:
        """Router MLP + Top-K (geoalign.routing's policy) + softmax over the K kept logits (== eqs. 5-6)."""
        logits = fusion.router(q)
        topk_idx = topk_lower_index(logits, fusion.config.top_k)
        alpha = kept_softmax(logits.gather(1, topk_idx).to(acc_dtype(q.dtype)))
        return Routing(topk_idx, alpha)

    def bank_rows(self, topk_idx: torch.Tensor, num_layers: int) -> BankRows:
        """The L*K routed pairs grouped by bank layer, tokens ascending within a layer."""
        return bank_rows(topk_idx, num_layers)

    # ------------------------------------------------------------------ the bank
    def open_bank(self, fusion, alpha: torch.Tensor, gather_index: torch.Tensor, rows: BankRows,
                  positions, fc1) -> Bank:
        """A bank over the fusion's bank positions ``positions`` (their LayerNorms) with projector layer ``fc1``:
        h_bar [L, H] zero in the accumulation dtype, and the backend's tape allocated."""
        L, dtype = alpha.shape[0], fc1.weight.dtype
        h_bar = torch.zeros(L, fc1.weight.shape[0], dtype=acc_dtype(dtype), device=alpha.device)
        norms = [fusion.layer_norms[i] for i in positions]
        bank = Bank(h_bar, alpha, gather_index, rows, [n.weight for n in norms], [n.bias for n in norms],
                    fc1.weight, fc1.bias, fusion.config.layer_norm_eps)
        self.prepare_bank(bank)
        return bank

    def add_layer(self, bank: Bank, j: int, layer: torch.Tensor) -> None:
        """Bank layer j's pairs: h_bar[t] += alpha[t, s] * GELU(W1 . concat_g LN_j(layer[gather_index[t, g]]) + b1),
        in place, recording on the tape what backward needs (with a tape, the torch and triton backends only
        normalise here and add to h_bar in complete_bank). No autograd here (close_bank adds the one node)."""
        if bank.added[j]:
            raise RuntimeError(f"bank layer {j} was already added to this bank")
        bank.added[j] = True
        with torch.no_grad():
            self.bank_layer(bank, j, layer)

    def close_bank(self, bank: Bank) -> torch.Tensor:
        """h_bar [L, H], with the bank's autograd node attached when a gradient is needed."""
        missing = [j for j, added in enumerate(bank.added) if not added]
        if missing:
            raise RuntimeError(f"close_bank: bank layers {missing} of {bank.num_layers} were never added")
        bank.check_unchanged()
        with torch.no_grad():
            self.complete_bank(bank)
        if not bank.save:
            return bank.h_bar
        tape, bank.tape = bank.tape, []  # autograd owns the tape from here
        rows = bank.rows
        host = tuple(rows._host) if rows._host is not None else None  # what the forward already copied
        return BankFunction.apply(self.name, host, bank.h_bar, bank.alpha, rows.tokens, rows.slots,
                                  rows.offsets, bank.fc1_weight, bank.fc1_bias, *bank.ln_weights, *bank.ln_biases,
                                  *tape)

    def prepare_bank(self, bank: Bank) -> None:
        """Allocate what ``bank_layer`` writes besides h_bar (the tape, scratch buffers; nothing by default)."""

    def complete_bank(self, bank: Bank) -> None:
        """What the backend does once every layer is in, under no_grad, before the autograd node (with a tape, the
        torch and triton backends' GEMM1 over every pair; nothing by default)."""

    def bank_layer(self, bank: Bank, j: int, layer: torch.Tensor) -> None:
        """The forward of bank layer j (see add_layer), under no_grad; appends to / fills bank.tape when bank.save."""
        raise NotImplementedError

    @classmethod
    def bank_backward(cls, rows: BankRows, alpha: torch.Tensor, ln_weights, ln_biases, fc1_weight: torch.Tensor,
                      tape: list, d_h_bar: torch.Tensor, need_alpha: bool, need_ln: bool, need_w1: bool,
                      need_b1: bool):
        """Every layer's gradients at once, from d_h_bar [L, H] (fp32/fp64) and the tape: (d_alpha [L, K] alpha's
        dtype, d_fc1_weight [H, G*D'], d_fc1_bias [H], d_ln_weight [M, D'], d_ln_bias [M, D']) in the parameter
        dtype; None where not needed. No gradient goes into the frozen layers."""
        raise NotImplementedError

    def accumulate_split(self, fusion, f_hat, alpha, i, layer, tokens, slots, gather_index) -> torch.Tensor:
        """projector="split": W2 differs per layer, so layer i's pairs go through a one-layer bank of their own
        (rows renumbered 0..n_i-1) and F_hat[t] += W2_i h_i + alpha b2_i for those tokens. Returns the new F_hat."""
        n = tokens.numel()
        a = alpha[tokens, slots].unsqueeze(1)  # [n, 1], differentiable
        rows = BankRows(torch.arange(n, device=tokens.device), torch.zeros_like(tokens),
                        torch.arange(2, dtype=torch.int64, device=tokens.device) * n)  # [0, n], no host copy
        bank = self.open_bank(fusion, a, gather_index[tokens], rows, [i], fusion.projectors[i].fc1)
        self.add_layer(bank, 0, layer)
        h_i = self.close_bank(bank)
        fc2 = fusion.projectors[i].fc2
        dtype = fc2.weight.dtype
        contrib = F.linear(h_i.to(dtype), fc2.weight) + a.to(dtype) * fc2.bias
        return f_hat.index_add(0, tokens, contrib.to(f_hat.dtype))

    # ------------------------------------------------------------------ the output
    def finish(self, fusion, q: torch.Tensor, h_bar: torch.Tensor | None, f_hat: torch.Tensor | None):
        """Q_hat [L, D] from h_bar (shared projector) or F_hat (split projector)."""
        if fusion.config.is_paper_default_path:
            return self.output(fusion, q, h_bar)
        if h_bar is not None:
            f_hat = fusion.projector.fc2(h_bar.to(q.dtype))  # sum_k alpha = 1: b2 moves after the sum
        return fusion.inject(q, f_hat.to(q.dtype))

    def output(self, fusion, q: torch.Tensor, h_bar: torch.Tensor) -> torch.Tensor:
        """Q_hat = Q + W_out (W2 h_bar + b2) on L rows (sum_k alpha = 1 lets b2 and W2 move after the sum); with
        fold_output and no gradient needed: Q + (W_out W2) h_bar + W_out b2, one [D, H] GEMM."""
        fc2, w_out = fusion.projector.fc2, fusion.out_proj.weight
        if self._use_fold(q, h_bar, fc2.weight, fc2.bias, w_out):
            w, b = self._cached_fold(fc2.weight, fc2.bias, w_out)
            return q + F.linear(h_bar.to(q.dtype), w, b)
        return q + fusion.out_proj(fc2(h_bar.to(q.dtype)))

    def fold(self, fc2_weight, fc2_bias, out_weight) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_out W2 [D, H], W_out b2 [D]) in the parameter dtype, accumulated in fp32 (fp64)."""
        acc = acc_dtype(fc2_weight.dtype)
        w = out_weight.to(acc) @ fc2_weight.to(acc)
        b = out_weight.to(acc) @ fc2_bias.to(acc)
        return w.to(fc2_weight.dtype), b.to(fc2_weight.dtype)

    def _use_fold(self, q, h_bar, *params) -> bool:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, h_bar) + params)
        return self.fold_output and not needs_grad

    def _cached_fold(self, *params) -> tuple[torch.Tensor, torch.Tensor]:
        """The fold of these very tensors (weak references, so a freed weight whose memory is reused never matches)
        at their current versions (in-place updates refold)."""
        current = self._fold_key is not None and all(
            ref() is t and version == t._version for (ref, version), t in zip(self._fold_key, params))
        if not current:
            self._fold = self.fold(*params)
            self._fold_key = tuple((weakref.ref(t), t._version) for t in params)
        return self._fold


class SparseStream:
    """One fused forward on a sparse backend (SparseBackend.open_stream): the routes and the pairs grouped by bank
    layer at construction; ``add(i, layer)`` adds bank layer i's routed pairs as the layer arrives; ``finish()``
    closes the bank (its one autograd node) and runs the output stage. No layer is referenced after ``add``."""

    def __init__(self, backend: SparseBackend, fusion, q: torch.Tensor, gather_index: torch.Tensor):
        cfg, M = fusion.config, fusion.config.num_bank_layers
        self.backend, self.fusion, self.q, self.gather_index = backend, fusion, q, gather_index
        self.routing = backend.routes(fusion, q)
        self.rows = backend.bank_rows(self.routing.topk_idx, M)
        self.bank = self.f_hat = None
        if cfg.projector == "shared":
            self.bank = backend.open_bank(fusion, self.routing.alpha, gather_index, self.rows, range(M),
                                          fusion.projector.fc1)
        else:  # split: W2 differs per layer, so each layer's W2 output accumulates into F_hat [L, D] (fp32/fp64)
            self.f_hat = torch.zeros(q.shape[0], cfg.hidden_size, dtype=self.routing.alpha.dtype, device=q.device)

    def add(self, i: int, layer: torch.Tensor) -> None:
        if self.bank is not None:
            self.backend.add_layer(self.bank, i, layer)
        else:
            tokens, slots = self.rows.layer(i)
            self.f_hat = self.backend.accumulate_split(self.fusion, self.f_hat, self.routing.alpha, i, layer,
                                                       tokens, slots, self.gather_index)

    def finish(self) -> tuple[torch.Tensor, Routing]:
        h_bar = self.backend.close_bank(self.bank) if self.bank is not None else None
        q_hat = self.backend.finish(self.fusion, self.q, h_bar, self.f_hat)
        self.bank = self.f_hat = None
        return q_hat, self.routing


_NOTICED: set = set()


def _notice_once(key, message: str) -> None:
    if key not in _NOTICED:
        _NOTICED.add(key)
        logger.info(message)
