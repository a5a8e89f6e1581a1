"""PixelDRL-MG networks (2D only): dilated half-width VGG16 features, self-attention, two heads.

One shared trunk and two heads, all fully convolutional, so every pixel of the input gets an
action distribution and a value::

    state (B, 2, H, W) = [image, current mask]
      -> half-width VGG16, conv1_1 .. conv4_3 (32/64/128/256 channels, dilated 3x3 convs,
         2x2 max-pool after blocks 1-3, so conv4_3 is at 1/8 resolution)
      -> self-attention on conv4_3: M = softmax(W * f + f), s = f * (N M)
      -> policy head: decoder fusing s with conv3_3 (1/4), conv2_2 (1/2), conv1_2 (1/1)
         -> logits (B, 2, H, W)        action 0 = set to zero (background), 1 = keep (object)
      -> value head: the same decoder shape, own weights -> V (B, 1, H, W)

Readings of the paper (it fixes the layer names, the widths and the count, not everything):

- **Dilation.** Within every block the 3x3 convolutions use dilations ``1, 2, 3, ...``
  (hybrid dilated convolution): the receptive field grows without pooling more, and no two
  consecutive convolutions share a dilation factor, which avoids the gridding artefact that
  stacks of equal dilations show. The heads follow the same rule.
- **Multi-scale features.** conv1_2, conv2_2 and conv3_3 are at full, 1/2 and 1/4 resolution
  (VGG's pools are kept); each head upsamples (bilinear) and concatenates them, coarse to
  fine, so its output is at the input resolution for any H, W >= 8 (odd sizes included).
- **Self-attention.** The paper gives ``M = softmax(W * f + f)`` with ``W`` a 1x1 convolution
  but not the axis of the softmax nor how ``M`` is applied. Here the softmax runs over the
  ``N = h * w`` positions of each channel (the module's job is global context: every position
  competes with the whole slice) and the output is ``s = f * (N * M)``, so a uniform ``M``
  leaves ``f`` unchanged at any image size. ``W`` starts at zero, i.e. ``M = softmax(f)``.
- **Heads and the parameter count.** Each head decodes at the widths of a full-width VGG16
  (64/128/256 at full/half/quarter resolution, i.e. twice the encoder's) with VGG's depths
  (2/2/3 convolutions) and ends in a 1x1 convolution. With the default widths this gives
  7.40M parameters (encoder 1.91M, attention 0.07M, each head 2.71M), within 4% of the paper's
  7.14M. The heads drive the count: heads at the encoder's own widths would give about 3.8M in
  all, heads of two convolutions per level about 6.2M.
- **Normalisation.** The paper names none (VGG16 and PixelRL have none). Every convolution
  here is followed by GroupNorm (``norm="group"``, the default): it does not depend on the
  batch, behaves the same in rollouts, training and inference, and adds 7k parameters. Without
  it (``norm="none"``) the policy collapsed to "all background" within 6-8 updates in the
  32 x 32 overfit experiment (Adam, 1e-3), under both readings of the environment, and never
  recovered (a deterministic policy gets no gradient). BatchNorm is deliberately absent: RL
  batches of 2 slices make its statistics unreliable.
- **Initialisation.** Kaiming for the ReLU convolutions. The two output 1x1 convolutions
  keep torch's default weights (``|w| <= 1/sqrt(fan_in)``), made zero-sum over their input
  channels, and a zero bias: the features after GroupNorm + ReLU share a positive mean, which
  random weights would turn into a random global preference for one action (up to +-0.9 in
  logit difference, and seeds where the untrained policy zeroes everything); zero-sum weights
  cancel it, so the policy starts near uniform, yet the trunk gets a gradient from the first
  update (with output weights of std 0.01 the overfit experiment barely moved in 20 updates).
- **Where the mask enters (``fusion``).** ``"input"`` is the paper's reading: the state
  ``[image, mask]`` enters conv1_1, so the whole network runs again at every step (about
  0.46M multiply-adds per pixel and step for trunk and policy head, 0.84M with the value head
  in training). ``"late"`` (a deviation, chosen
  for speed; see :class:`PixelDRLNet`) feeds only the image to the VGG trunk and to the two
  decoders, once per slice, and lets the mask enter a light fusion block at full resolution
  (concatenate the decoder's 64 features with the mask, ``fusion_depth`` dilated 3x3
  convolutions of ``fusion_width`` channels, 1x1 output; the features' share of the first
  convolution is also computed once): a step then costs about 19k multiply-adds per pixel
  and head, ~25x less, and a training episode runs the trunk once instead of ``t_max``
  times. The agents, actions, rewards, returns and heads are unchanged; what is lost is that
  the mask can no longer steer the global features, only a neighbourhood of
  ``1 + 2 * sum(1..fusion_depth)`` pixels (13 x 13 for depth 3) around each agent. Measured
  (noisy ellipses 48 x 48, widths 8/16/32/64, 300 episodes of 8 slices, 64 unseen slices,
  seeds 0 / 1): late fusion reached a final Dice of 0.870 / 0.849 (0.855 / 0.848 after step
  1), the paper's reading 0.772 / 0.839 (0.790 / 0.810 after step 1), having stayed at "all
  background" for its first ~250 / ~60 episodes; no loss of accuracy from late fusion, and
  1.7-4x less training time. On the 2-core CPU a 240 x 240 x 155 volume at 128 x 128 takes
  5 s with late fusion and 26 s (bf16) / 79 s (fp32) with ``"input"``
  (``trainer/benchmarks/bench_pixeldrl_speed.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from steprl.errors import InputError
from steprl.segmentation.config import PixelDRLConfig

N_ACTIONS = 2
"""Actions per pixel: 0 sets the pixel to zero (background), 1 keeps it (object)."""

VGG_DEPTHS = (2, 2, 3, 3)
"""Convolutions per VGG16 block up to conv4_3."""

MIN_SIZE = 8
"""Smallest height/width: three 2x2 pools must leave at least one pixel."""


def _groups(channels: int) -> int:
    """GroupNorm group count: at most 8 groups of at least 4 channels (1 group for tiny layers)."""
    groups = 8
    while groups > 1 and (channels % groups or channels // groups < 4):
        groups //= 2
    return groups


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(_groups(channels), channels)
    raise ValueError(f"norm must be 'none' or 'group', not {kind!r}")


class ConvBlock(nn.Sequential):
    """``depth`` x (3x3 convolution with dilation 1, 2, ..., depth -> norm -> ReLU).

    ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``; padding keeps the size.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, norm: str = "none") -> None:
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(depth):
            dilation = index + 1
            layers += [
                nn.Conv2d(channels, out_channels, 3, padding=dilation, dilation=dilation),
                _norm(norm, out_channels),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
        super().__init__(*layers)


class HalfVGG16Features(nn.Module):
    """VGG16 conv1_1 .. conv4_3 at ``widths`` channels, dilated, with pools after blocks 1-3.

    ``(B, in_channels, H, W)`` -> ``(conv1_2, conv2_2, conv3_3, conv4_3)`` at resolutions
    1, 1/2, 1/4, 1/8 (pools floor odd sizes) with ``widths[0..3]`` channels.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], norm: str = "none") -> None:
        super().__init__()
        blocks = []
        channels = in_channels
        for width, depth in zip(widths, VGG_DEPTHS, strict=True):
            blocks.append(ConvBlock(channels, width, depth, norm))
            channels = width
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = []
        for index, block in enumerate(self.blocks):
            if index:
                x = F.max_pool2d(x, 2)
            x = block(x)
            features.append(x)
        return tuple(features)


class SelfAttention(nn.Module):
    """``M = softmax(W * f + f)`` over the positions of each channel; returns ``f * (N * M)``.

    ``f``: ``(B, C, h, w)``, ``N = h * w``. ``W`` is a 1x1 convolution initialised to zero, so
    the module starts as ``M = softmax(f)``. The softmax is computed in float32 (it spans the
    whole slice) and the result is cast back to ``f``'s dtype.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        logits = (self.proj(f) + f).flatten(2).float()  # (B, C, N)
        weights = torch.softmax(logits, dim=-1) * logits.shape[-1]
        return f * weights.view_as(f).to(f.dtype)


class DecoderHead(nn.Module):
    """Dilated decoder from the attended 1/8 features up to full resolution, then a 1x1 conv.

    ``skip_channels``: channels of (conv1_2, conv2_2, conv3_3); ``deep_channels``: of ``s``.
    ``widths``/``depths``: per level, finest first (full, 1/2, 1/4). Output
    ``(B, out_channels, H, W)`` at conv1_2's (= the input's) resolution; with
    ``out_channels=None`` the features before the 1x1 output, ``(B, widths[0], H, W)``.
    """

    def __init__(
        self,
        skip_channels: Sequence[int],
        deep_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        out_channels: int | None,
        norm: str = "none",
    ) -> None:
        super().__init__()
        levels = []
        channels = deep_channels
        for level in reversed(range(len(skip_channels))):  # coarse to fine
            levels.append(ConvBlock(channels + skip_channels[level], widths[level], depths[level], norm))
            channels = widths[level]
        self.levels = nn.ModuleList(levels)
        self.out = _output_conv(channels, out_channels) if out_channels is not None else nn.Identity()

    def forward(self, skips: Sequence[torch.Tensor], deep: torch.Tensor) -> torch.Tensor:
        x = deep
        for block, skip in zip(self.levels, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)


def _output_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """1x1 output convolution: torch's default weights made zero-sum over the inputs, zero bias."""
    conv = nn.Conv2d(in_channels, out_channels, 1)
    with torch.no_grad():
        conv.weight -= conv.weight.mean(dim=1, keepdim=True)
        conv.bias.zero_()
    return conv


class MaskFusionHead(nn.Module):
    """Late fusion of the mask: ``[features, mask]`` -> ``depth`` dilated 3x3 convs -> 1x1 output.

    ``features`` ``(B, C, H, W)`` (a decoder's full-resolution features, computed once per
    slice), ``mask`` ``(B, 1, H, W)`` -> ``(B, out_channels, H, W)``. Dilations ``1..depth``
    as everywhere else, so the mask is seen in a ``(1 + depth * (depth + 1))``-pixel window.

    The first convolution is linear in its input, so ``conv([F, m]) = conv_F(F) + conv_m(m)``:
    :meth:`prepare` computes the feature part once per slice and :meth:`step` adds the mask
    part (one input channel) per step, which removes ~90% of a step's cost. ``forward`` is
    ``step(prepare(features), mask)``; the weights are one ordinary ``Conv2d`` over
    ``C + 1`` channels (the mask last).
    """

    def __init__(self, feature_channels: int, width: int, depth: int, out_channels: int, norm: str) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"fusion_depth must be at least 1, got {depth}")
        self.block = ConvBlock(feature_channels + 1, width, depth, norm)
        self.out = _output_conv(width, out_channels)

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """The feature part of the first convolution (bias included), ``(B, width, H, W)``."""
        first = self.block[0]
        return F.conv2d(features, first.weight[:, :-1], first.bias, padding=first.padding, dilation=first.dilation)

    def step(self, prepared: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output for the current ``mask`` given :meth:`prepare`'s result."""
        first = self.block[0]
        x = prepared + F.conv2d(mask.to(prepared.dtype), first.weight[:, -1:].to(prepared.dtype),
                                padding=first.padding, dilation=first.dilation)
        for layer in list(self.block)[1:]:
            x = layer(x)
        return self.out(x)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.step(self.prepare(features), mask)


class Encoded(dict):
    """What :meth:`PixelDRLNet.encode` computes once per batch of slices (a dict of tensors).

    ``"images"`` ``(B, C-1, H, W)`` always; with late fusion also ``"policy"`` and, when the
    value was asked for, ``"value"``: the decoders' features after the feature part of the
    fusion's first convolution, ``(B, fusion_width, H, W)`` (:meth:`MaskFusionHead.prepare`).
    """


class PixelDRLNet(nn.Module):
    """PixelDRL-MG actor-critic: per-pixel policy logits and value at the input resolution.

    Built from a :class:`~steprl.segmentation.config.PixelDRLConfig` (``cfg``; default: the
    default layout, late fusion), which the model card stores. ``"input"`` fusion is the paper's
    network (the mask enters conv1_1 with the image); ``"late"`` runs the image alone through
    trunk and decoders, once per slice, and lets the mask enter a :class:`MaskFusionHead` per
    head (see the module docstring).

    ``forward(state)`` with ``state`` ``(B, in_channels, H, W)``, ``H, W >= 8``, returns
    ``(logits (B, 2, H, W), value (B, 1, H, W))``; ``with_value=False`` skips the value head
    (inference) and returns ``(logits, None)``. For several steps on the same images, call
    :meth:`encode` once and :meth:`decide` per step (with ``"late"`` this is where the speed
    comes from; with ``"input"`` it is equivalent to calling ``forward``).
    """

    def __init__(self, cfg: PixelDRLConfig | None = None) -> None:
        super().__init__()
        cfg = PixelDRLConfig() if cfg is None else cfg
        self.cfg = cfg
        widths, head_widths, head_depths, norm = cfg.widths, cfg.head_widths, cfg.head_depths, cfg.norm
        late = cfg.late_fusion
        trunk_channels = cfg.in_channels - 1 if late else cfg.in_channels
        head_out = None if late else N_ACTIONS
        self.features = HalfVGG16Features(trunk_channels, widths, norm)
        self.attention = SelfAttention(widths[3]) if cfg.attention else nn.Identity()
        self.policy = DecoderHead(widths[:3], widths[3], head_widths, head_depths, head_out, norm)
        self.value = DecoderHead(widths[:3], widths[3], head_widths, head_depths, None if late else 1, norm)
        if late:
            self.policy_fusion = MaskFusionHead(head_widths[0], cfg.fusion_width, cfg.fusion_depth, N_ACTIONS, norm)
            self.value_fusion = MaskFusionHead(head_widths[0], cfg.fusion_width, cfg.fusion_depth, 1, norm)
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        blocks = [self.policy.levels, self.value.levels]
        if late:
            blocks += [self.policy_fusion.block, self.value_fusion.block]
        for block in blocks:
            for module in block.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    nn.init.zeros_(module.bias)

    @property
    def late_fusion(self) -> bool:
        return self.cfg.late_fusion

    def _check(self, state: torch.Tensor, channels: int | None = None) -> None:
        channels = self.cfg.in_channels if channels is None else channels
        if state.dim() != 4:
            raise InputError(
                f"PixelDRL-MG is a 2D network and takes (B, C, H, W) states, got shape {tuple(state.shape)}.",
                "Segment 3D volumes slice by slice: put the slices in the batch dimension.",
            )
        if state.shape[1] != channels:
            raise InputError(
                f"The input has {state.shape[1]} channels, the network expects {channels}.",
                "Build the state with the segmentation environment ([image, current mask]).",
            )
        if min(state.shape[-2:]) < MIN_SIZE:
            raise InputError(
                f"Slices of {tuple(state.shape[-2:])} pixels are too small for PixelDRL-MG.",
                f"Resample them to at least {MIN_SIZE} x {MIN_SIZE} pixels.",
            )

    def _heads(self, x: torch.Tensor, with_value: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        *skips, deep = self.features(x)
        attended = self.attention(deep)
        policy = self.policy(skips, attended)
        value = self.value(skips, attended) if with_value else None
        return policy, value

    def encode(self, images: torch.Tensor, with_value: bool = True) -> Encoded:
        """The mask-independent part for ``images`` ``(B, in_channels - 1, H, W)`` (see :class:`Encoded`)."""
        self._check(images, self.cfg.in_channels - 1)
        encoded = Encoded(images=images)
        if self.late_fusion:
            policy, value = self._heads(images, with_value)
            encoded["policy"] = self.policy_fusion.prepare(policy)
            if value is not None:
                encoded["value"] = self.value_fusion.prepare(value)
        return encoded

    def decide(
        self, encoded: Encoded, mask: torch.Tensor, with_value: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, 2, H, W)`` and value ``(B, 1, H, W)`` (or None) for the current ``mask`` ``(B, 1, H, W)``."""
        images = encoded["images"]
        if not self.late_fusion:
            return self._heads(torch.cat([images, mask.to(images.dtype)], dim=1), with_value)
        if with_value and "value" not in encoded:
            raise ValueError("encode(..., with_value=False) was used: the value head was not computed")
        logits = self.policy_fusion.step(encoded["policy"], mask)
        value = self.value_fusion.step(encoded["value"], mask) if with_value else None
        return logits, value

    def forward(self, state: torch.Tensor, with_value: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check(state)
        if not self.late_fusion:
            return self._heads(state, with_value)
        return self.decide(self.encode(state[:, :-1], with_value), state[:, -1:], with_value)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_summary(net: PixelDRLNet) -> dict[str, int]:
    """Parameter counts per part (``features``, ``attention``, ``policy``, ``value``, ``total``)."""
    names = ["features", "attention", "policy", "value"]
    if net.late_fusion:
        names += ["policy_fusion", "value_fusion"]
    parts = {name: count_parameters(getattr(net, name)) for name in names}
    parts["total"] = count_parameters(net)
    return parts


def format_parameter_summary(net: PixelDRLNet) -> str:
    """One line for logs and model cards, e.g. ``7.40M parameters (features 1.91M, ...)``."""
    parts = parameter_summary(net)
    detail = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in parts.items() if name != "total")
    return f"{parts['total'] / 1e6:.2f}M parameters ({detail}; paper: 7.14M)"
