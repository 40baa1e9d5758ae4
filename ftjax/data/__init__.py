"""Input pipelines: local TFDS data sets, tokenization and grain iterators.

Typical use on every host of a run::

  splits = load_splits("rotten_tomatoes", data_dir)
  preprocess = text_classification_preprocess(load_tokenizer(path, 128))
  train = train_iterator(splits["train"], preprocess, batch_size=32, seed=0,
                         num_epochs=None, shard_index=jax.process_index(),
                         shard_count=jax.process_count())

See `ftjax.data.pipeline` for the batch contract.
"""

from ftjax.data.pipeline import (
    Head,
    eval_batches,
    num_eval_batches,
    read_examples,
    stack_examples,
    text_classification_preprocess,
    train_iterator,
)
from ftjax.data.sources import dataset_names, load_splits
from ftjax.data.tokenizer import TextTokenizer, load_tokenizer

__all__ = [
    "Head",
    "TextTokenizer",
    "dataset_names",
    "eval_batches",
    "load_splits",
    "load_tokenizer",
    "num_eval_batches",
    "read_examples",
    "stack_examples",
    "text_classification_preprocess",
    "train_iterator",
]
