"""torchvision's ResNet in plain PyTorch, with torchvision's state-dict names.

The torchvision wheel does not work with the torch installed here (and, installed,
stops transformers' vision models from importing), so the network is written out:
the same layers under the same names in the same order, so that a state dict saved
from `torchvision.models.resnet18()` .. `resnet152()` loads with `load_state_dict`
unchanged and gives the same outputs (checked against torchvision 0.28.0's resnet18
and resnet50). It is the torchvision-layout reference of the ResNet parity tests;
it imports torch only.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (64, 128, 256, 512)  # the stages' base widths (`planes`)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm; the first strides."""

  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
               base_width: int = 64):
    """Builds the block.

    Args:
      cin: input channels.
      planes: output channels.
      stride: stride of the first convolution.
      downsample: the shortcut's projection, or None for the identity.
      base_width: must be 64 (torchvision's `width_per_group`).
    """
    super().__init__()
    if base_width != 64:
      raise ValueError("BasicBlock only supports base_width=64")
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  """1x1 reduction, 3x3 (strided: ResNet v1.5), 1x1 expansion to 4 * planes."""

  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None,
               base_width: int = 64):
    """Builds the block (arguments as `BasicBlock`'s; the inner width is
    planes * base_width / 64)."""
    super().__init__()
    width = planes * base_width // 64
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """The three convolutions with BatchNorm, plus the shortcut, then ReLU."""
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision's `ResNet(block, layers)`: stem, `layer1` .. `layer4`, pooling, `fc`."""

  def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
               num_classes: int = 1000, width_per_group: int = 64):
    """Builds the network with freshly initialised (PyTorch default) weights.

    Args:
      block: `BasicBlock` (resnet18/34) or `Bottleneck` (resnet50/101/152).
      layers: blocks per stage, e.g. [2, 2, 2, 2] for resnet18.
      num_classes: outputs of the linear head.
      width_per_group: a bottleneck's inner width per 64 planes (128: wide_resnet).
    """
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    for i, (planes, depth) in enumerate(zip(WIDTHS, layers)):
      stride = 1 if i == 0 else 2
      downsample = None
      if stride != 1 or cin != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
      blocks = [block(cin, planes, stride, downsample, width_per_group)]
      cin = planes * block.expansion
      blocks += [block(cin, planes, 1, None, width_per_group) for _ in range(depth - 1)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Logits [B, num_classes] of images [B, 3, H, W]."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))
