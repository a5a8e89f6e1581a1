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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from steprl.errors import InputError

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
    ``(B, out_channels, H, W)`` at conv1_2's (= the input's) resolution.
    """

    def __init__(
        self,
        skip_channels: Sequence[int],
        deep_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        out_channels: int,
        norm: str = "none",
    ) -> None:
        super().__init__()
        levels = []
        channels = deep_channels
        for level in reversed(range(len(skip_channels))):  # coarse to fine
            levels.append(ConvBlock(channels + skip_channels[level], widths[level], depths[level], norm))
            channels = widths[level]
        self.levels = nn.ModuleList(levels)
        self.out = nn.Conv2d(channels, out_channels, 1)
        with torch.no_grad():  # torch's default weights, made zero-sum over the input channels
            self.out.weight -= self.out.weight.mean(dim=1, keepdim=True)
            self.out.bias.zero_()

    def forward(self, skips: Sequence[torch.Tensor], deep: torch.Tensor) -> torch.Tensor:
        x = deep
        for block, skip in zip(self.levels, reversed(skips), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)


class PixelDRLNet(nn.Module):
    """PixelDRL-MG actor-critic: per-pixel policy logits and value at the input resolution.

    Args:
        in_channels: state channels; 2 for ``[image, current mask]``.
        widths: encoder widths of VGG16 blocks 1-4 (half of VGG16's 64/128/256/512).
        head_widths: decoder widths at full, 1/2, 1/4 resolution; ``None``: twice
            ``widths[:3]`` (64/128/256 by default, see the module docstring).
        head_depths: convolutions per decoder level, finest first.
        norm: ``"group"`` (default, GroupNorm) or ``"none"`` (as VGG16 and PixelRL).
        attention: ``False`` drops the self-attention module (ablation: ``s = f``).

    ``forward(state)`` with ``state`` ``(B, in_channels, H, W)``, ``H, W >= 8``, returns
    ``(logits (B, 2, H, W), value (B, 1, H, W))``; ``with_value=False`` skips the value head
    (inference) and returns ``(logits, None)``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        widths: Sequence[int] = (32, 64, 128, 256),
        head_widths: Sequence[int] | None = None,
        head_depths: Sequence[int] = (2, 2, 3),
        norm: str = "group",
        attention: bool = True,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4:
            raise ValueError(f"widths needs 4 entries (VGG16 blocks 1-4), got {widths}")
        head_widths = tuple(int(w) for w in (head_widths or [2 * w for w in widths[:3]]))
        head_depths = tuple(int(d) for d in head_depths)
        if len(head_widths) != 3 or len(head_depths) != 3:
            raise ValueError("head_widths and head_depths need 3 entries (full, 1/2, 1/4 resolution)")
        _norm(norm, 8)  # validates the name
        self.config = {
            "in_channels": int(in_channels),
            "widths": list(widths),
            "head_widths": list(head_widths),
            "head_depths": list(head_depths),
            "norm": norm,
            "attention": bool(attention),
        }
        self.features = HalfVGG16Features(in_channels, widths, norm)
        self.attention = SelfAttention(widths[3]) if attention else nn.Identity()
        self.policy = DecoderHead(widths[:3], widths[3], head_widths, head_depths, N_ACTIONS, norm)
        self.value = DecoderHead(widths[:3], widths[3], head_widths, head_depths, 1, norm)
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for head in (self.policy, self.value):
            for module in head.levels.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    nn.init.zeros_(module.bias)

    def _check(self, state: torch.Tensor) -> None:
        if state.dim() != 4:
            raise InputError(
                f"PixelDRL-MG is a 2D network and takes (B, C, H, W) states, got shape {tuple(state.shape)}.",
                "Segment 3D volumes slice by slice: put the slices in the batch dimension.",
            )
        if state.shape[1] != self.config["in_channels"]:
            raise InputError(
                f"The state has {state.shape[1]} channels, the network expects {self.config['in_channels']}.",
                "Build the state with the segmentation environment ([image, current mask]).",
            )
        if min(state.shape[-2:]) < MIN_SIZE:
            raise InputError(
                f"Slices of {tuple(state.shape[-2:])} pixels are too small for PixelDRL-MG.",
                f"Resample them to at least {MIN_SIZE} x {MIN_SIZE} pixels.",
            )

    def forward(self, state: torch.Tensor, with_value: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check(state)
        *skips, deep = self.features(state)
        attended = self.attention(deep)
        logits = self.policy(skips, attended)
        value = self.value(skips, attended) if with_value else None
        return logits, value


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_summary(net: PixelDRLNet) -> dict[str, int]:
    """Parameter counts per part (``features``, ``attention``, ``policy``, ``value``, ``total``)."""
    parts = {name: count_parameters(getattr(net, name)) for name in ("features", "attention", "policy", "value")}
    parts["total"] = count_parameters(net)
    return parts


def format_parameter_summary(net: PixelDRLNet) -> str:
    """One line for logs and model cards, e.g. ``7.40M parameters (features 1.91M, ...)``."""
    parts = parameter_summary(net)
    detail = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in parts.items() if name != "total")
    return f"{parts['total'] / 1e6:.2f}M parameters ({detail}; paper: 7.14M)"
