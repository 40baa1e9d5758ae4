r"""A TPE search with pruning over LoRA's learning rate, warmup, rank and alpha: MiniLM-L6 on Rotten Tomatoes.

  python launch/sweep.py --study=experiments/lora_search.py \
      --workdir=/tmp/ftjax/lora_search --report_dir=experiments/results/lora_search

The same CPU-sized `short` setting as the grid of `experiments/lora_rank_lr.py`
(150 steps, batch 32, 32 tokens, evaluated every 50 steps), one seed per trial.
16 trials sampled by Optuna's TPE (the first 10 at random), a trial stopped at an
evaluation where its validation accuracy is below the median of the earlier
trials' at that step. The grid spent 12 runs x 150 = 1,800 training steps.
"""

from ftjax.sweeps import search

TITLE = "TPE search over LoRA lr, warmup, rank and alpha (MiniLM-L6, Rotten Tomatoes, 150 steps)"

SEARCH = dict(
    config="configs/minilm_sentiment.py:short,peft=lora",
    space={"optimizer.lr": search.log_uniform(2e-4, 5e-3),
           "optimizer.warmup_steps": search.int_uniform(0, 30),
           "peft.rank": search.choice([4, 8, 16]),
           "peft.alpha": search.choice([8.0, 16.0, 32.0])},
    trials=16, metric=("validation/accuracy", "max"), sampler="tpe", pruner="median", seed=0)
