"""Faster inference for the Swin-UNETR networks, with the same parameters and (up to float rounding) outputs.

:func:`accelerate` swaps, in place, the class of some submodules of a network for a subclass whose
``forward`` does the same computation with less work when gradients are off (inference); with
gradients on (training) every swapped module runs its parent class's ``forward`` unchanged. No
parameter or buffer is added, removed or renamed, so checkpoints load before or after the call
(``bundle/configs/inference.json`` builds ``network`` with it and the ``CheckpointLoader`` fills it).

What changes at inference (measured with ``benchmarks/inference_speed.py``; on the 2-core CPU of
this project the 1x1x1 convolutions and the attention masks were together about a fifth of a
128^3 window of the feature-size-48 network):

* Shifted-window attention (MONAI ``WindowAttention`` with ``use_flash_attention``, in a
  ``BasicLayer``): MONAI rebuilds the shifted-window mask (``compute_mask``: nW x 343 x 343 values,
  470 MB for the first stage of a 128^3 window) in every forward pass, i.e. for every
  sliding-window patch, and its fused-attention path adds it to the relative-position bias and
  materialises the sum for every window and head ((B nW) x heads x 343 x 343). Here the windows
  are grouped by mask pattern (a window is either interior or the last one along some of the three
  axes: at most 8 patterns, the masks depend only on that), the patterns are computed once per
  grid shape and cached, and ``scaled_dot_product_attention`` runs once per group with one
  broadcast bias of shape (1, heads, 343, 343). Same bias values, same kernel.
* 1x1x1 convolutions (``Conv3d`` with kernel 1, stride 1, no padding, one group; the residual
  projections of MONAI's ``UnetResBlock``, the attention gates, the output layer) run as one
  matrix product ``W @ x`` over the flattened voxels (oneDNN's direct kernel reached a few GFLOP/s
  on them here, a GEMM runs at the machine's matmul rate).
* ``ConvTranspose3d`` with kernel = stride = 2 and no padding (the decoder's upsampling) runs as
  one matrix product to ``C_out x 8`` channels followed by a voxel shuffle.

The outputs agree with the unmodified network to float32 rounding (``tests/test_fast_inference.py``
and the output-agreement table of ``benchmarks/inference_speed.py`` compare them).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import BasicLayer, WindowAttention, compute_mask, get_window_size

__all__ = ["WindowGroups", "window_groups", "FastWindowAttention", "FastBasicLayer", "FastPointwiseConv3d",
           "FastUpsampleConvTranspose3d", "accelerate", "WholeVolumeInferer"]


class WindowGroups(NamedTuple):
    """Shifted-window attention mask in grouped form, for ``num_windows`` windows of ``n`` voxels.

    ``order``: a permutation of the window indices that makes every group a contiguous run (``None``
    when the windows are already in that order), ``inverse``: its inverse; ``groups``: ``(start, stop,
    mask)`` runs of ``order`` with their ``(n, n)`` mask (``None``: all zeros). The dense MONAI mask
    ``compute_mask(...)[order[j]]`` equals the mask of the run holding ``j``.
    """

    num_windows: int
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    groups: tuple


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def window_groups(dims, window_size, shift_size, device) -> WindowGroups:
    """Grouped form of ``monai...swin_unetr.compute_mask(dims, window_size, shift_size, device)`` (3D).

    Along an axis with a non-zero shift the mask regions are ``[0, -ws)``, ``[-ws, -shift)`` and
    ``[-shift, end)``: every window but the last lies in the first, so a window's mask depends only on
    which axes it is the last window along. The (at most 8) distinct masks are taken from
    ``compute_mask`` on a grid of at most two windows per axis. Cached per arguments.
    """
    dims, window_size, shift_size = tuple(int(d) for d in dims), tuple(window_size), tuple(shift_size)
    key = (dims, window_size, shift_size, str(device))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    counts = [d // w for d, w in zip(dims, window_size)]
    small = [min(c, 2) * w for c, w in zip(counts, window_size)]
    masks = compute_mask(small, window_size, shift_size, torch.device("cpu"))  # (prod(min(c, 2)), n, n)
    small_counts = [min(c, 2) for c in counts]
    # pattern of every real window: per axis 1 if it is the last window along that axis (and there are >= 2)
    grids = np.meshgrid(*[np.arange(c) for c in counts], indexing="ij")
    flags = [((g == c - 1) & (c >= 2)).astype(np.int64).ravel() for g, c in zip(grids, counts)]
    pattern = (flags[0] * small_counts[1] + flags[1]) * small_counts[2] + flags[2]  # index into ``masks``
    order = np.argsort(pattern, kind="stable")  # windows of one pattern become a contiguous run
    groups, start = [], 0
    for p, count in zip(*np.unique(pattern, return_counts=True)):
        stop = start + int(count)
        m = masks[int(p)]
        groups.append((start, stop, None if not bool(m.any()) else m.to(device)))
        start = stop
    identity = bool((order == np.arange(order.size)).all())
    out = WindowGroups(int(np.prod(counts)), None if identity else torch.from_numpy(order).to(device),
                       None if identity else torch.from_numpy(np.argsort(order)).to(device), tuple(groups))
    with _CACHE_LOCK:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = out
    return out


class FastWindowAttention(WindowAttention):
    """MONAI ``WindowAttention`` that also accepts a :class:`WindowGroups` mask (inference only): the windows
    are put in group order (one gather of the input), each group runs one ``scaled_dot_product_attention``
    with a broadcast ``(1, heads, n, n)`` bias on views of q, k, v, and the projected output is put back in
    window order (one gather)."""

    def forward(self, x, mask):
        if not isinstance(mask, WindowGroups):
            return super().forward(x, mask)
        b, n, c = x.shape
        heads, hd = self.num_heads, c // self.num_heads
        nw = mask.num_windows
        bb = b // nw
        if mask.order is not None:
            x = x.reshape(bb, nw, n, c).index_select(1, mask.order).view(b, n, c)
        qkv = self.qkv(x).view(bb, nw, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5)  # (3, bb, nw, heads, n, hd)
        q, k, v = qkv.unbind(0)
        relative_position_bias = self.relative_position_bias_table[
            self.relative_position_index.clone()[:n, :n].reshape(-1)  # type: ignore[operator]
        ].reshape(n, n, -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()  # (heads, n, n)
        out = torch.empty((bb, nw, n, heads, hd), dtype=q.dtype, device=q.device)
        for start, stop, m in mask.groups:
            bias = relative_position_bias if m is None else relative_position_bias + m.view(1, n, n)
            sel = [t[:, start:stop].reshape(-1, heads, n, hd) for t in (q, k, v)]
            o = F.scaled_dot_product_attention(*sel, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=0.0, scale=self.scale)
            out[:, start:stop] = o.view(bb, stop - start, heads, n, hd).transpose(2, 3)
        y = self.proj(out.view(b, n, c))
        if mask.inverse is not None:
            y = y.view(bb, nw, n, c).index_select(1, mask.inverse).view(b, n, c)
        return self.proj_drop(y)


class FastBasicLayer(BasicLayer):
    """MONAI ``BasicLayer`` (3D) passing a cached :class:`WindowGroups` mask instead of rebuilding the dense
    mask in every forward pass, when gradients are off and every block's attention is a
    :class:`FastWindowAttention` with fused attention on."""

    def forward(self, x):
        if torch.is_grad_enabled() or torch.jit.is_scripting() or torch.jit.is_tracing() or x.ndim != 5 or self.use_hyena:
            return super().forward(x)
        b, c, d, h, w = x.shape
        window_size, shift_size = get_window_size((d, h, w), self.window_size, self.shift_size)
        x = x.permute(0, 2, 3, 4, 1)  # b d h w c (what einops.rearrange gives)
        dp, hp, wp = (int(math.ceil(s / ws)) * ws for s, ws in zip((d, h, w), window_size))
        attn_mask = window_groups((dp, hp, wp), window_size, shift_size, x.device)
        for blk in self.blocks:
            x = blk(x, attn_mask)
        x = x.view(b, d, h, w, -1)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


def _gemm(w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``w @ x[i] (+ bias)`` for every batch element ``i``: ``w`` (M, K), ``x`` (B, K, N) -> (B, M, N).

    One ``mm``/``addmm`` per batch element writing into the output: ``torch.matmul`` of a 2D and a 3D
    tensor folds them by transposing (copying) the large ``x``."""
    b, _, n = x.shape
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # what autocast does to a convolution: everything in its dtype
        dt = torch.get_autocast_dtype(dev)
        w, x = w.to(dt), x.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif w.dtype != x.dtype:
        w = w.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    out = torch.empty((b, w.shape[0], n), dtype=x.dtype, device=x.device)
    for i in range(b):
        xi = x[i]
        if not xi.is_contiguous():
            xi = xi.contiguous()
        if bias is None:
            torch.mm(w, xi, out=out[i])
        else:
            torch.addmm(bias.view(-1, 1), w, xi, out=out[i])
    return out


class FastPointwiseConv3d(nn.Conv3d):
    """A 1x1x1 ``Conv3d`` (stride 1, no padding, one group) computed as ``W @ x`` when gradients are off."""

    def forward(self, x):
        if torch.is_grad_enabled() or x.ndim != 5 or torch.jit.is_tracing() or torch.jit.is_scripting():
            return super().forward(x)
        b, c = x.shape[:2]
        spatial = x.shape[2:]
        w = self.weight.view(self.out_channels, c)
        return _gemm(w, x.reshape(b, c, -1), self.bias).view(b, self.out_channels, *spatial)


class FastUpsampleConvTranspose3d(nn.ConvTranspose3d):
    """``ConvTranspose3d`` with kernel = stride = 2, no padding, one group, computed as one matrix product
    ``(C_out*8, C_in) @ x`` and a voxel shuffle when gradients are off."""

    def forward(self, x, output_size=None):
        if torch.is_grad_enabled() or output_size is not None or x.ndim != 5 or torch.jit.is_tracing() or torch.jit.is_scripting():
            return super().forward(x, output_size)
        b, c, d, h, w = x.shape
        co = self.out_channels
        wt = self.weight.reshape(c, co * 8).t()  # (co*8, c): rows ordered (co, kd, kh, kw)
        bias = None if self.bias is None else self.bias.repeat_interleave(8)  # same row order
        y = _gemm(wt, x.reshape(b, c, -1), bias).view(b, co, 2, 2, 2, d, h, w)
        return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, co, 2 * d, 2 * h, 2 * w)


def _is_pointwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv3d and m.kernel_size == (1, 1, 1) and m.stride == (1, 1, 1) and m.padding == (0, 0, 0)
            and m.dilation == (1, 1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def _is_upsample2(m: nn.Module) -> bool:
    return (type(m) is nn.ConvTranspose3d and m.kernel_size == (2, 2, 2) and m.stride == (2, 2, 2)
            and m.padding == (0, 0, 0) and m.output_padding == (0, 0, 0) and m.dilation == (1, 1, 1) and m.groups == 1)


def accelerate(network: nn.Module) -> nn.Module:
    """Swap, in place, the classes of ``network``'s submodules for the faster inference subclasses above
    (see the module docstring); returns ``network``. Idempotent. Parameters, buffers and state-dict
    keys are unchanged; with gradients enabled every module computes exactly what it did before.
    Modules are only swapped where the fast path is known to be equivalent: window attention only
    with ``use_flash_attention`` on (MONAI's fused path, whose result the grouped one reproduces)."""
    for m in network.modules():
        if _is_pointwise(m):
            m.__class__ = FastPointwiseConv3d
        elif _is_upsample2(m):
            m.__class__ = FastUpsampleConvTranspose3d
    for m in network.modules():
        if type(m) is BasicLayer and len(m.window_size) == 3 and not m.use_hyena:
            attns = [blk.attn for blk in m.blocks]
            if attns and all(type(a) in (WindowAttention, FastWindowAttention) and a.use_flash_attention
                             and getattr(a.attn_drop, "p", 0.0) == 0.0 for a in attns):
                for a in attns:
                    a.__class__ = FastWindowAttention
                m.__class__ = FastBasicLayer
    return network


class WholeVolumeInferer:
    """One forward pass over the whole input, zero-padded at the end of each axis to a multiple of ``multiple``
    (and to at least ``min_size``), the output cropped back: no voxel is computed twice, unlike overlapping
    sliding windows. NOT equivalent to the sliding window: instance normalisation then sees the whole volume,
    and there is no blending, so outputs differ (``benchmarks/inference_speed.py`` measures by how much); not
    used by the bundle's configs. Inputs larger than ``max_voxels`` after padding go to ``fallback`` (e.g. the
    config's ``SlidingWindowInferer``)."""

    def __init__(self, multiple: int = 32, min_size=(64, 64, 64), max_voxels: int = 12_000_000, fallback=None) -> None:
        self.multiple, self.min_size, self.max_voxels, self.fallback = int(multiple), tuple(min_size), int(max_voxels), fallback

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        from monai.utils import convert_to_dst_type

        spatial = list(inputs.shape[2:])
        padded = [max(int(math.ceil(s / self.multiple)) * self.multiple, m) for s, m in zip(spatial, self.min_size)]
        if self.fallback is not None and int(np.prod(padded)) > self.max_voxels:
            return self.fallback(inputs, network, *args, **kwargs)
        x = torch.as_tensor(inputs)
        pad = []
        for s, p in zip(reversed(spatial), reversed(padded)):
            pad += [0, p - s]
        out = network(F.pad(x, pad), *args, **kwargs)
        out = out[(slice(None), slice(None), *[slice(0, s) for s in spatial])]
        return convert_to_dst_type(out, inputs, device=out.device)[0] if hasattr(inputs, "meta") else out
