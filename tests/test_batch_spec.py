"""`registry.batch_spec` (what a batch holds, from the config alone) against real batches."""

import os

import numpy as np

from ftjax.data import lm, pipeline, registry, tokenizer as tokenizer_lib
from ftjax.hub import assets


def _spec_of(batch: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  return {k: (v.shape[1:], np.dtype(v.dtype)) for k, v in batch.items()}


def _expected(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  kind = registry.check(config)[0].kind
  return {k: (shape, np.dtype(dtype))
          for k, (shape, dtype) in registry.batch_spec(kind, config.data).items()}


def test_batch_spec_matches_tokenized_classification_batches(debug_config):
  tokenizer = tokenizer_lib.load_tokenizer(
      os.path.join(assets.model_dir(debug_config.model.pretrained), "tokenizer.json"),
      debug_config.data.max_length)
  preprocess = pipeline.text_classification_preprocess(tokenizer)
  batch = preprocess({"text": np.array([b"a fine film", b"dull"], object),
                      "label": np.array([1, 0])})
  batch["mask"] = np.ones(2, bool)  # added by the pipeline (see ftjax.data.pipeline)
  assert _spec_of(batch) == _expected(debug_config)


def test_batch_spec_matches_packed_language_model_rows():
  from configs import smollm2_chat  # pylint: disable=g-import-not-at-top
  config = smollm2_chat.get_config("debug")
  tokenizer = tokenizer_lib.load_hf_tokenizer(assets.model_dir(config.data.tokenizer))
  rows = lm.pack_text([{"text": b"some text"}, {"text": b"more"}], tokenizer,
                      max_length=config.data.max_length, pad_id=0)
  batch = pipeline.stack_examples([rows[i] for i in range(len(rows))])
  batch["mask"] = np.ones(len(rows), bool)
  assert _spec_of(batch) == _expected(config)
