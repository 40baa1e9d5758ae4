r"""LoRA rank x learning rate: MiniLM-L6 on Rotten Tomatoes.

  python launch/sweep.py --study=experiments/lora_rank_lr.py \
      --workdir=/tmp/ftjax/lora_rank_lr --report_dir=experiments/results/lora_rank_lr

LoRA (alpha = 2 x rank) on the attention query and value kernels, the new head
trained in full, with the CPU-sized `short` setting (150 steps, warmup 15, batch
32, 32 tokens), three seeds per point of the grid.
"""

from ftjax.sweeps import search

TITLE = "LoRA rank x learning rate (MiniLM-L6, Rotten Tomatoes, 150 steps)"
METRICS = ["test/accuracy", "test/macro_f1", "validation/accuracy", "train_seconds"]
SELECT = ("validation/accuracy", "max")
PLOTS = [("lr", "test/accuracy"), ("rank", "test/accuracy")]
CURVES = [("validation", "accuracy")]


def sweep(add):
  for seed in range(3):  # seeds outermost: a partial sweep covers the whole grid
    for point in search.grid(rank=[4, 16], lr=[5e-4, 2e-3]):
      add(config="configs/minilm_sentiment.py:short,peft=lora,rank={rank},lr={lr}".format(
          **point), seed=seed)
