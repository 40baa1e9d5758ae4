r"""How many blocks to freeze: MiniLM-L6 on Rotten Tomatoes, from full fine-tuning to a probe.

  python launch/sweep.py --study=experiments/freeze_blocks.py \
      --workdir=/tmp/ftjax/freeze_blocks --report_dir=experiments/results/freeze_blocks

Freezes the embeddings and the bottom k of the 6 encoder blocks (k = 6 leaves
only the new head: a linear probe), at one learning rate (2e-4), with the
CPU-sized `short` setting (150 steps of batch 32, 32 tokens), three seeds each.
"""

TITLE = "Freezing the bottom k blocks of MiniLM-L6 (Rotten Tomatoes, 150 steps)"
METRICS = ["test/accuracy", "test/macro_f1", "validation/accuracy", "train_seconds"]
SELECT = ("validation/accuracy", "max")
PLOTS = [("freeze_blocks", "test/accuracy")]
CURVES = [("validation", "accuracy")]


def sweep(add):
  for blocks in (0, 2, 4, 6):
    for seed in range(3):
      add(config=f"configs/minilm_sentiment.py:short,lr=2e-4,freeze_blocks={blocks}", seed=seed)
