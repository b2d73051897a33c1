"""Backbones every family builds on, sized from (C, H, W): an encoder trunk maps an image to a
feature vector (`.feature_dim`), a decoder trunk maps a code back to per-pixel parameters shaped
like the image. `mlp`, `conv` (the plain stack older saved models use) and `resconv` (the default).
Which one a model gets is its config's `backbone` field; heads belong to each family.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from vaemodels.common import ModelConfig

# ----------------------------------------------------------------------------------------------
# Backbones: an encoder trunk maps an image to a feature vector; a decoder trunk maps a code
# vector back to per-pixel parameters (logits / pre-sigmoid means) of shape (C, H, W).
# ----------------------------------------------------------------------------------------------


class MLPEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], hidden_dim: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.net = nn.Sequential(*layers)
        self.feature_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], code_dim: int, hidden_dim: int, num_layers: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = code_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers += [nn.Linear(width, math.prod(input_shape)), nn.Unflatten(1, tuple(input_shape))]
        self.net = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code)


def conv_stage_shapes(input_shape: tuple[int, int, int], channels: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Shapes after each stride-2 stage; stages stop once a side would drop below 4 pixels."""
    _, h, w = input_shape
    shapes = []
    for c in channels:
        if min(h, w) // 2 < 2 or (shapes and min(h, w) <= 4):
            break
        h, w = h // 2, w // 2
        shapes.append((c, h, w))
    if not shapes:  # tiny images: keep one stage so the conv backbone still has a conv
        shapes.append((channels[0], max(h // 2, 1), max(w // 2, 1)))
    return shapes


class ConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        layers: list[nn.Module] = []
        in_c = input_shape[0]
        for c, _, _ in stages:
            layers += [nn.Conv2d(in_c, c, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            in_c = c
        c, h, w = stages[-1]
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], code_dim: int, channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        c, h, w = stages[-1]
        layers: list[nn.Module] = [
            nn.Linear(code_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, c * h * w), nn.ReLU(),
            nn.Unflatten(1, (c, h, w)),
        ]
        # Walk the encoder's stages backwards; output_padding makes odd sizes (7 -> 14 -> 28) exact.
        targets = [s[1:] for s in stages[:-1]][::-1] + [tuple(input_shape[1:])]
        out_channels = [s[0] for s in stages[:-1]][::-1] + [input_shape[0]]
        in_c, cur = c, (h, w)
        for i, ((th, tw), out_c) in enumerate(zip(targets, out_channels)):
            pad = (th - 2 * cur[0], tw - 2 * cur[1])
            if not all(p in (0, 1) for p in pad):
                raise ValueError(f"conv decoder cannot reach {(th, tw)} from {cur}")
            layers.append(nn.ConvTranspose2d(in_c, out_c, kernel_size=4, stride=2, padding=1, output_padding=pad))
            if i < len(targets) - 1:
                layers.append(nn.ReLU())
            in_c, cur = out_c, (th, tw)
        self.net = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code)


# The residual backbone. Why each piece: GroupNorm keeps activations scaled without making a
# sample's output depend on its batch (BatchNorm would change log p(x) between train and eval);
# residual blocks add depth where the maps are small (<= RES_BLOCK_MAX_SIDE a side), which costs
# little on a CPU, while the large maps keep one strided conv each; the decoder upsamples with
# transposed convs whose kernel (4) is a multiple of the stride (2), so no checkerboard, sized
# exactly with output_padding (7 -> 14 -> 28, 8 -> 16 -> 32 -> 64) — a nearest resize + 3x3 conv
# measured 3-5x slower per step here; and each decoder stage adds a projection of the code
# (latent + one-hot class for conditional families) as a per-channel bias, so the label and z
# reach every scale instead of only the first dense layer, where the label is easy to ignore.

RES_BLOCK_MAX_SIDE = 8


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), pre-activation style (He et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)  # each block starts as the identity: a shallow net at step 0
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def _res_block_or_identity(channels: int, h: int, w: int) -> nn.Module:
    return ResBlock(channels) if max(h, w) <= RES_BLOCK_MAX_SIDE else nn.Identity()


class ResConvEncoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        layers: list[nn.Module] = []
        in_c = input_shape[0]
        for c, h, w in stages:
            layers += [nn.Conv2d(in_c, c, kernel_size=4, stride=2, padding=1), _norm(c), nn.SiLU(),
                       _res_block_or_identity(c, h, w)]
            in_c = c
        c, h, w = stages[-1]
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden_dim), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResConvDecoder(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], code_dim: int, channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        stages = conv_stage_shapes(input_shape, channels)
        c, h, w = stages[-1]
        self.stem = nn.Sequential(
            nn.Linear(code_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, c * h * w), nn.Unflatten(1, (c, h, w)),
        )
        # walk the encoder's stages backwards, each time to the exact size the encoder came from
        targets = [s[1:] for s in stages[:-1]][::-1] + [tuple(input_shape[1:])]
        out_channels = [s[0] for s in stages[:-1]][::-1] + [input_shape[0]]
        self.code_bias, self.blocks, self.ups = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        in_c, cur = c, (h, w)
        for i, ((th, tw), out_c) in enumerate(zip(targets, out_channels)):
            pad = (th - 2 * cur[0], tw - 2 * cur[1])
            if not all(p in (0, 1) for p in pad):
                raise ValueError(f"conv decoder cannot reach {(th, tw)} from {cur}")
            self.code_bias.append(nn.Linear(code_dim, in_c))
            self.blocks.append(_res_block_or_identity(in_c, *cur))
            up: list[nn.Module] = [nn.ConvTranspose2d(in_c, out_c, 4, stride=2, padding=1, output_padding=pad)]
            if i < len(targets) - 1:  # the last one gives the likelihood's parameters: no norm, no activation
                up += [_norm(out_c), nn.SiLU()]
            self.ups.append(nn.Sequential(*up))
            in_c, cur = out_c, (th, tw)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        h = self.stem(code)
        for bias, block, up in zip(self.code_bias, self.blocks, self.ups):
            h = up(block(h + bias(code)[:, :, None, None]))
        return h


def build_encoder(config: ModelConfig, input_shape: tuple[int, int, int]) -> nn.Module:
    """Encoder trunk: image -> features of size `.feature_dim` (heads are the family's business)."""
    if config.backbone == "mlp":
        return MLPEncoder(input_shape, config.dense_width, config.mlp_layers)
    if config.backbone == "conv":
        return ConvEncoder(input_shape, config.conv_channels, config.dense_width)
    return ResConvEncoder(input_shape, config.conv_channels, config.dense_width)


def build_decoder(config: ModelConfig, input_shape: tuple[int, int, int], code_dim: int) -> nn.Module:
    """Decoder trunk: code of size `code_dim` -> per-pixel parameters shaped like the image."""
    if config.backbone == "mlp":
        return MLPDecoder(input_shape, code_dim, config.dense_width, config.mlp_layers)
    if config.backbone == "conv":
        return ConvDecoder(input_shape, code_dim, config.conv_channels, config.dense_width)
    return ResConvDecoder(input_shape, code_dim, config.conv_channels, config.dense_width)
