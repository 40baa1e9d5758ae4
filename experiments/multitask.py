r"""Multi-task vs single-task: one MiniLM-L6 encoder for Rotten Tomatoes (2 classes) and tweets (3).

  python launch/sweep.py --study=experiments/multitask.py \
      --workdir=/tmp/ftjax/multitask --report_dir=experiments/results/multitask

Each task alone, then both in one run (one encoder, a head per task) with
batches mixed in proportion to the tasks' sizes (8,530 and 29,794 training
examples) or half and half; every run 150 steps of batch 32 (`short`) at
lr 1e-4, one seed. Single-task runs report their task's metrics as
test/accuracy; multi-task runs report each task's (test/<task>/accuracy) and
their mean (test/accuracy).
"""

TITLE = "Multi-task vs single-task fine-tuning (MiniLM-L6, 150 steps of batch 32)"
METRICS = ["test/rotten_tomatoes/accuracy", "test/tweets/accuracy", "test/accuracy",
           "test/macro_f1", "train_seconds"]
SELECT = ("validation/accuracy", "max")
CURVES = [("validation", "accuracy")]
_CONFIG = "configs/minilm_sentiment.py:short,lr=1e-4,data={}"


def sweep(add):
  for seed in range(1):
    add(config=_CONFIG.format("rotten_tomatoes"), seed=seed)
    add(config=_CONFIG.format("tweets"), seed=seed)
    add(config=_CONFIG.format("rotten_tomatoes+tweets"), seed=seed,
        **{"data.mixing": "proportional"})
    add(config=_CONFIG.format("rotten_tomatoes+tweets"), seed=seed,
        **{"data.mixing": "weights", "data.weights": (1.0, 1.0)})
