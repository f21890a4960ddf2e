"""Swin-UNETR with attention-gated skip connections and squeeze-and-excitation, for BraTS.

``SwinUNETRAttSE`` is MONAI's :class:`~monai.networks.nets.SwinUNETR` (Hatamizadeh et al. 2022) with three
optional additions:

* ``spatial_attention``: an attention gate (Oktay et al. 2018, Attention U-Net) on every skip connection,
  driven by the upsampled decoder features;
* ``squeeze_excitation``: channel squeeze-and-excitation (Hu et al. 2018) on the outputs of the convolutional
  encoder blocks and of every decoder block;
* ``dropout_prob``: channel dropout before the output layer, for Monte-Carlo dropout at inference.

Input ``(B, in_channels, H, W, D)`` with H, W, D multiples of 32; output ``(B, out_channels, H, W, D)`` logits
(for BraTS: 4 MRI sequences in, 3 region logits TC, WT, ET out). With all three additions off the network is
exactly MONAI's SwinUNETR: same submodule names, parameters and outputs, so MONAI SwinUNETR checkpoints load with
``strict=True``; with them on, such checkpoints load with ``strict=False`` and only the new modules' keys missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks.nets import SwinUNETR

from custom.networks.blocks.attention_se_upblock import AttentionSEUpBlock, squeeze_excitation_layer

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


class SwinUNETRAttSE(SwinUNETR):
    """MONAI SwinUNETR with attention-gated skips, squeeze-and-excitation and MC-dropout before the output.

    Input ``(B, in_channels, H, W, D)``, H, W, D multiples of ``patch_size**5`` (32); output
    ``(B, out_channels, H, W, D)`` logits. Design, on top of SwinUNETR's unchanged submodules:

    * ``decoder5`` .. ``decoder1`` are :class:`AttentionSEUpBlock` s reusing SwinUNETR's ``transp_conv`` /
      ``conv_block``; with ``spatial_attention`` each gates its skip with a :class:`SpatialAttentionGate`
      (``decoderN.attention_gate``), with ``squeeze_excitation`` its output goes through SE (``decoderN.se``);
    * with ``squeeze_excitation`` the outputs of ``encoder1``-``encoder4`` and ``encoder10`` go through SE
      (``encoder_se[<encoder name>]``);
    * ``output_dropout`` (``Dropout3d``, identity if ``dropout_prob == 0``) acts on the last decoder features
      ``(B, feature_size, H, W, D)`` (:meth:`decode`) just before ``out``; see :meth:`forward_mc` and
      :meth:`enable_mc_dropout`.

    With ``spatial_attention=False, squeeze_excitation=False`` this is exactly MONAI's SwinUNETR (same
    parameters, state-dict keys and outputs). Note that with instance normalisation the bottleneck
    ``(H/32, W/32, D/32)`` must hold more than one voxel, so e.g. a 32^3 input is rejected.
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        patch_size: int = 2,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] | int = 7,
        qkv_bias: bool = True,
        mlp_ratio: float = 4.0,
        feature_size: int = 48,
        norm_name: tuple | str = "instance",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        norm_layer: type[nn.LayerNorm] = nn.LayerNorm,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
        downsample: str | nn.Module = "merging",
        use_v2: bool = False,
        use_flash_attention: bool = True,
        spatial_attention: bool = True,
        squeeze_excitation: bool = True,
        se_reduction: int = 4,
        dropout_prob: float = 0.0,
        **swin_unetr_kwargs,
    ) -> None:
        """
        Args:
            in_channels .. use_flash_attention: as in MONAI ``SwinUNETR`` (passed through unchanged); the
                defaults differ for this project: ``in_channels=4`` (T1, T1ce, T2, FLAIR), ``out_channels=3``
                (TC, WT, ET logits), ``feature_size=48``, ``use_flash_attention=True`` (same outputs, faster
                inference; only used when gradients are disabled).
            spatial_attention: attention gate on every skip connection.
            squeeze_excitation: channel SE on the encoder-block and decoder-block outputs.
            se_reduction: SE reduction ratio (capped per layer so the squeezed width is >= 1).
            dropout_prob: ``Dropout3d`` probability before the output layer, for MC dropout; 0 disables it.
            swin_unetr_kwargs: any further ``SwinUNETR`` arguments of the installed MONAI version
                (e.g. the ``use_hyena``/``hyena_*`` options), passed through unchanged.
        """
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch_size,
            depths=depths,
            num_heads=num_heads,
            window_size=window_size,
            qkv_bias=qkv_bias,
            mlp_ratio=mlp_ratio,
            feature_size=feature_size,
            norm_name=norm_name,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            dropout_path_rate=dropout_path_rate,
            normalize=normalize,
            norm_layer=norm_layer,
            patch_norm=patch_norm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=downsample,
            use_v2=use_v2,
            use_flash_attention=use_flash_attention,
            **swin_unetr_kwargs,
        )
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}.")
        if se_reduction < 1:
            raise ValueError(f"se_reduction must be >= 1, got {se_reduction}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        self.spatial_attention = spatial_attention
        self.squeeze_excitation = squeeze_excitation
        self.feature_size = feature_size
        self.dropout_prob = dropout_prob
        # instance norm cannot normalise a single voxel, and encoder10 works on the (H/32, W/32, D/32) bottleneck
        self._bottleneck_needs_several_voxels = any(isinstance(m, _INSTANCE_NORMS) for m in self.encoder10.modules())

        # New modules are created after SwinUNETR's, so SwinUNETR's initialisation (and RNG use) is unchanged.
        encoder_channels = {
            "encoder1": feature_size,
            "encoder2": feature_size,
            "encoder3": 2 * feature_size,
            "encoder4": 4 * feature_size,
            "encoder10": 16 * feature_size,
        }
        self.encoder_se = nn.ModuleDict(
            {
                name: squeeze_excitation_layer(spatial_dims, ch, se_reduction) if squeeze_excitation else nn.Identity()
                for name, ch in encoder_channels.items()
            }
        )
        decoder_channels = {
            "decoder5": 8 * feature_size,
            "decoder4": 4 * feature_size,
            "decoder3": 2 * feature_size,
            "decoder2": feature_size,
            "decoder1": feature_size,
        }
        for name, ch in decoder_channels.items():
            block = AttentionSEUpBlock(
                getattr(self, name),
                spatial_dims=spatial_dims,
                channels=ch,
                spatial_attention=spatial_attention,
                squeeze_excitation=squeeze_excitation,
                se_reduction=se_reduction,
                norm_name=norm_name,
            )
            setattr(self, name, block)

        dropout_type = nn.Dropout3d if spatial_dims == 3 else nn.Dropout2d
        self.output_dropout: nn.Module = dropout_type(p=dropout_prob) if dropout_prob > 0 else nn.Identity()

    def enable_mc_dropout(self) -> SwinUNETRAttSE:
        """Prepare Monte-Carlo dropout inference: everything in eval mode except the dropout modules.

        Only the dropout layers (``output_dropout`` and, if ``drop_rate``/``attn_drop_rate`` > 0, those of the
        Swin transformer) are put in train mode, so normalisation layers keep inference behaviour; repeated
        forward passes (under ``torch.no_grad()``) then sample different dropout masks. ``net.eval()`` undoes it.
        Has no effect on outputs if ``dropout_prob == 0`` and the transformer has no dropout. Note that MONAI's
        flash-attention path (``use_flash_attention`` under ``torch.no_grad()``) skips attention dropout;
        :meth:`forward_mc` handles that and is cheaper when only ``output_dropout`` is stochastic.
        """
        self.eval()
        for module in self.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.train()
        return self

    @torch.jit.unused
    def _validate_input(self, x_in: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x_in`` is ``(B, in_channels, *spatial)`` with valid spatial sizes."""
        shape = tuple(x_in.shape)
        expected_ndim = self.spatial_dims + 2
        if x_in.ndim != expected_ndim:
            layout = "(B, C, H, W, D)" if self.spatial_dims == 3 else "(B, C, H, W)"
            raise ValueError(
                f"{type(self).__name__} expects a {expected_ndim}D input {layout}, "
                f"got a {x_in.ndim}D tensor of shape {shape}."
            )
        if shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got {shape[1]} "
                f"(input shape {shape})."
            )
        multiple = self.patch_size**5
        spatial = shape[2:]
        wrong = [f"{axis}={size}" for axis, size in zip("HWD", spatial) if size % multiple != 0]
        if wrong:
            padded = tuple(int(-(-s // multiple) * multiple) for s in spatial)
            raise ValueError(
                f"spatial size(s) {', '.join(wrong)} of input shape {shape} must be multiples of {multiple} "
                f"(patch_size**5); pad or crop, e.g. to spatial shape {padded}."
            )
        if self._bottleneck_needs_several_voxels and int(np.prod([s // multiple for s in spatial])) <= 1:
            raise ValueError(
                f"input spatial shape {spatial} gives a single-voxel bottleneck ({multiple}x downsampling), "
                f"which instance normalisation cannot normalise; make at least one spatial size >= {2 * multiple}."
            )

    def decode(self, x_in: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W, D)`` -> ``(B, feature_size, H, W, D)`` last decoder features.

        Everything of :meth:`forward` before ``output_dropout`` and ``out``, including input validation.
        """
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._validate_input(x_in)
        hidden_states_out = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder_se["encoder1"](self.encoder1(x_in))
        enc1 = self.encoder_se["encoder2"](self.encoder2(hidden_states_out[0]))
        enc2 = self.encoder_se["encoder3"](self.encoder3(hidden_states_out[1]))
        enc3 = self.encoder_se["encoder4"](self.encoder4(hidden_states_out[2]))
        dec4 = self.encoder_se["encoder10"](self.encoder10(hidden_states_out[4]))
        dec3 = self.decoder5(dec4, hidden_states_out[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return self.decoder1(dec0, enc0)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W, D)`` -> ``(B, out_channels, H, W, D)`` logits."""
        return self.out(self.output_dropout(self.decode(x_in)))

    @torch.jit.unused
    def _transformer_dropout_modules(self) -> list[nn.Module]:
        """Dropout modules with ``p > 0`` other than ``output_dropout`` (those of ``drop_rate``/``attn_drop_rate``)."""
        return [
            m
            for m in self.modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m is not self.output_dropout and m.p > 0
        ]

    @torch.jit.unused
    def forward_mc(self, x_in: torch.Tensor, samples: int) -> torch.Tensor:
        """Monte-Carlo dropout logits: ``(B, in_channels, H, W, D)`` -> ``(B, samples * out_channels, H, W, D)``.

        Sample-major channels: ``[:, s * out_channels:(s + 1) * out_channels]`` is sample ``s``
        (:func:`custom.uncertainty.split_samples` views it as ``(B, samples, out_channels, H, W, D)``).

        If only ``output_dropout`` is stochastic, :meth:`decode` runs once and ``samples`` independent channel
        dropout masks (``p = dropout_prob``, active whatever the train/eval mode) followed by ``out`` are applied
        to its features, so the cost is about one forward pass. If the Swin transformer has dropout
        (``drop_rate``/``attn_drop_rate`` > 0), it runs ``samples`` full forward passes in
        :meth:`enable_mc_dropout` mode, with flash attention switched off in attention layers that have attention
        dropout (MONAI's flash path skips it), and restores all module modes afterwards. Call under
        ``torch.no_grad()`` for inference.

        Raises:
            ValueError: if ``samples < 2``, or if nothing is stochastic (``dropout_prob == 0`` and no
                transformer dropout), or for an invalid input (see :meth:`forward`).
        """
        if isinstance(samples, bool) or int(samples) != samples or samples < 2:
            raise ValueError(f"MC dropout needs samples >= 2, got {samples!r}.")
        samples = int(samples)
        transformer_dropout = self._transformer_dropout_modules()
        if not transformer_dropout:
            if self.dropout_prob <= 0:
                raise ValueError(
                    "MC dropout needs dropout_prob > 0 (or transformer drop_rate/attn_drop_rate > 0); "
                    "this network is deterministic."
                )
            features = self.decode(x_in)
            dropout = nn.functional.dropout3d if self.spatial_dims == 3 else nn.functional.dropout2d
            return torch.cat(
                [self.out(dropout(features, p=self.dropout_prob, training=True)) for _ in range(samples)], dim=1
            )

        modes = [(m, m.training) for m in self.modules()]
        flash = [
            (m, m.use_flash_attention)
            for m in self.modules()
            if getattr(m, "use_flash_attention", False) and getattr(getattr(m, "attn_drop", None), "p", 0) > 0
        ]
        try:
            self.enable_mc_dropout()
            for m, _ in flash:
                m.use_flash_attention = False
            return torch.cat([self(x_in) for _ in range(samples)], dim=1)
        finally:
            for m, training in modes:
                m.training = training
            for m, use_flash in flash:
                m.use_flash_attention = use_flash
