"""torchvision's MobileNetV2 (width 1.0) in plain PyTorch, with torchvision's state-dict names.

The torchvision wheel does not work with the torch installed here, so the network
is written out: the same layers in the same order, so that torchvision's ImageNet
checkpoint (`ftjax.hub.vision.weights_file("mobilenet_v2")`) loads with
`load_state_dict` unchanged. It is the PyTorch reference of the vision parity tests
and of `bench/vision_train_step.py`; it imports torch only.
"""

from __future__ import annotations

import torch
from torch import nn

# (expand ratio t, output channels c, blocks n, first stride s): the paper's table 2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
LAST_CHANNELS = 1280


def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int,
                  groups: int = 1) -> nn.Sequential:
  """Convolution (no bias, 'same' padding for odd kernels), BatchNorm, ReLU6.

  Args:
    cin: input channels.
    cout: output channels.
    kernel: square kernel size.
    stride: stride of the convolution.
    groups: convolution groups (`cin` for a depthwise convolution).

  Returns:
    The three layers, named 0, 1, 2 as torchvision's `Conv2dNormActivation`.
  """
  return nn.Sequential(
      nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
      nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
  """torchvision's InvertedResidual: 1x1 expand, 3x3 depthwise, linear 1x1 project."""

  def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
    """Builds the block.

    Args:
      cin: input channels.
      cout: output channels.
      stride: stride of the depthwise convolution.
      expand_ratio: hidden channels over `cin` (1: no expansion layer).
    """
    super().__init__()
    hidden = cin * expand_ratio
    layers = [conv_bn_relu6(cin, hidden, 1, 1)] if expand_ratio != 1 else []
    layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
               nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    self.conv = nn.Sequential(*layers)
    self.use_res_connect = stride == 1 and cin == cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """The block's output; the input is added when the shapes allow."""
    return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
  """torchvision's `mobilenet_v2()` (width 1.0): `features`, pooling, `classifier`.

  Attributes:
    features: the stem, the 17 inverted residual blocks and the 1x1 top convolution.
    classifier: dropout and the linear head.
  """

  def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
    """Builds the network with freshly initialised (PyTorch default) weights.

    Args:
      num_classes: outputs of the linear head.
      dropout: dropout rate before the head.
    """
    super().__init__()
    layers: list[nn.Module] = [conv_bn_relu6(3, 32, 3, 2)]
    cin = 32
    for t, c, n, s in SETTINGS:
      for i in range(n):
        layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
        cin = c
    layers.append(conv_bn_relu6(cin, LAST_CHANNELS, 1, 1))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(LAST_CHANNELS, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Logits [B, num_classes] of images [B, 3, H, W]."""
    x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
    return self.classifier(x)
