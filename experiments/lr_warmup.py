r"""Learning rate x warmup for full fine-tuning: MiniLM-L6 on Rotten Tomatoes.

  python launch/sweep.py --study=experiments/lr_warmup.py \
      --workdir=/tmp/ftjax/lr_warmup --report_dir=experiments/results/lr_warmup

Linear decay to 0 after a linear warmup of 0 or 30 steps (30% of the run), at
two peak learning rates, with the CPU-sized `short` setting cut to 100 steps
(batch 32, 32 tokens), three seeds each.
"""

from ftjax.sweeps import search

TITLE = "Learning rate x warmup, full fine-tuning (MiniLM-L6, Rotten Tomatoes, 100 steps)"
METRICS = ["test/accuracy", "test/macro_f1", "validation/accuracy", "train_seconds"]
SELECT = ("validation/accuracy", "max")
PLOTS = [("optimizer.lr", "test/accuracy")]
CURVES = [("validation", "accuracy"), ("train", "loss")]


def sweep(add):
  for seed in range(3):  # seeds outermost: a partial sweep covers the whole grid
    for point in search.grid(**{"optimizer.lr": [5e-5, 2e-4],
                                "optimizer.warmup_steps": [0, 30]}):
      add(config="configs/minilm_sentiment.py:short", seed=seed, total_steps=100, **point)
