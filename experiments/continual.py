r"""Continual fine-tuning, Rotten Tomatoes then tweets: forgetting, L2-SP, EWC and replay.

  python launch/sweep.py --study=experiments/continual.py \
      --workdir=/tmp/ftjax/continual --report_dir=experiments/results/continual

Stage A trains MiniLM-L6 with a head per task on Rotten Tomatoes only (tweets'
weight 0). Each stage-B run starts from stage A's best weights (`init_from`) and
trains on tweets only, measuring the test split before and after: forgetting is
the Rotten Tomatoes test accuracy lost. Against forgetting: L2-SP (a penalty
toward stage A's weights, strength 1), EWC (the same, weighted by the Fisher
information of 512 Rotten Tomatoes training examples, strength 1) and replay
(20% of each batch from a buffer of 1,000 Rotten Tomatoes examples). 150 steps
of batch 32 (`short`) per stage, lr 1e-4 then 2e-4, one seed.
"""

TITLE = "Continual fine-tuning: Rotten Tomatoes, then tweets (MiniLM-L6, 150 steps each)"
METRICS = ["test_at_start/rotten_tomatoes/accuracy", "test/rotten_tomatoes/accuracy",
           "forgetting/rotten_tomatoes", "test/tweets/accuracy", "train_seconds"]
CURVES = [("validation", "rotten_tomatoes/accuracy"), ("validation", "tweets/accuracy")]
_TASKS = "configs/minilm_sentiment.py:short,data=rotten_tomatoes+tweets"
_WEIGHTS = {"data.mixing": "weights"}


def sweep(add):
  stage_a = add(config=f"{_TASKS},lr=1e-4", name="A_rotten_tomatoes",
                **_WEIGHTS, **{"data.weights": (1.0, 0.0)})
  tweets_only = {**_WEIGHTS, "data.weights": (0.0, 1.0), "init_from": stage_a,
                 "early_stopping.metric": "tweets/accuracy"}
  stage_b = f"{_TASKS},lr=2e-4"
  add(config=stage_b, name="B_naive", **tweets_only)
  add(config=f"{stage_b},regularizer=l2sp,strength=1.0", name="B_l2sp_1", **tweets_only)
  add(config=f"{stage_b},regularizer=ewc,strength=1.0", name="B_ewc_1", **tweets_only)
  add(config=stage_b, name="B_replay_0.2",
      **{**tweets_only, "data.weights": (0.2, 0.8), "data.train_examples": (1000, 0)})
