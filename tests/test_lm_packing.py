"""Chat formatting with assistant-only targets, and packing of examples into rows."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import tiny_decoders
from ftjax import models
from ftjax.data import lm, tokenizer as tokenizer_lib
from ftjax.errors import ConfigError, DataError
from ftjax.hub import assets

ARCH = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_hf_tokenizer(assets.model_dir("smollm2-135m-instruct"))


def _chat(i, turns=2, words=3):
  messages = []
  for t in range(turns):
    messages.append({"role": "user", "content": f"question {i} {t} " + "why " * words})
    messages.append({"role": "assistant", "content": f"answer {i} {t} " + "because " * words})
  return {"id": f"c{i}".encode(), "messages": json.dumps(messages).encode()}


def test_only_assistant_tokens_and_their_end_of_turn_are_trained(tokenizer):
  formatter = lm.ChatFormatter(tokenizer)
  messages = json.loads(_chat(0)["messages"])
  ids, trained = formatter.encode(messages, "c0")
  assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
  assert _trained_texts(tokenizer, ids, trained) == [
      m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]


def test_a_system_message_is_rendered_and_weight_0_answers_are_not_trained(tokenizer):
  formatter = lm.ChatFormatter(tokenizer)
  messages = [{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": "Colour of the sky?"},
              {"role": "assistant", "content": "Green.", "weight": 0},
              {"role": "user", "content": "Really?"},
              {"role": "assistant", "content": "Blue.", "weight": 1}]
  ids, trained = formatter.encode(messages, "c0")
  plain = [{"role": m["role"], "content": m["content"]} for m in messages]
  assert tokenizer.decode(ids) == tokenizer.apply_chat_template(plain, tokenize=False)
  assert "You answer in one word." in tokenizer.decode(ids)
  assert _trained_texts(tokenizer, ids, trained) == ["Blue.<|im_end|>"]


def test_a_tokenizer_without_a_template_takes_a_built_in_one_or_a_file(tmp_path):
  tokenizer = tokenizer_lib.load_hf_tokenizer(assets.model_dir("smollm2-135m-instruct"))
  tokenizer.chat_template = None  # as a base model's
  with pytest.raises(DataError, match="has no chat template: set config.data.chat_template"):
    lm.ChatFormatter(tokenizer)
  messages = json.loads(_chat(0)["messages"])
  answers = [m["content"] for m in messages if m["role"] == "assistant"]
  ids, trained = lm.ChatFormatter(tokenizer, *lm.chat_template("chatml")).encode(messages,
                                                                                 "c0")
  assert tokenizer.decode(ids).startswith("<|im_start|>user\nquestion 0 0 why")
  assert _trained_texts(tokenizer, ids, trained) == [a + "<|im_end|>" for a in answers]
  template = tmp_path / "turns.jinja"
  template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                      "{% endfor %}")
  ids, trained = lm.ChatFormatter(tokenizer, *lm.chat_template(str(template))).encode(
      messages, "c0")
  assert tokenizer.decode(ids).startswith("user: question 0 0 why")
  texts = _trained_texts(tokenizer, ids, trained)
  assert len(texts) == 2 and all(a in t for a, t in zip(answers, texts)), texts
  assert lm.chat_template_problem(str(template)) == lm.chat_template_problem("gemma") == ""
  assert "must be empty (the tokenizer's own template), one of ['chatml', 'gemma']" in (
      lm.chat_template_problem("gemma3"))


def test_a_template_without_a_system_role_names_the_conversation():
  tokenizer = tokenizer_lib.load_hf_tokenizer(assets.model_dir("smollm2-135m-instruct"))
  tokenizer.chat_template = (  # as Gemma's first templates: no system role
      "{% for m in messages %}{% if m['role'] == 'system' %}"
      "{{ raise_exception('System role not supported') }}{% endif %}"
      "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello."}]
  with pytest.raises(DataError, match=r"chats.jsonl: line 4: the chat template of .* cannot "
                     r"render it: System role not supported"):
    lm.ChatFormatter(tokenizer).encode(messages, "chats.jsonl: line 4")


def test_packed_rows_hold_every_example_once_in_its_own_segment(tokenizer):
  formatter = lm.ChatFormatter(tokenizer)
  source = [_chat(i, turns=1 + i % 3, words=i % 7) for i in range(40)]
  rows = lm.pack_chat(source, formatter, max_length=192, pad_id=tokenizer.pad_token_id,
                      order_seed=0)
  stats = rows.stats
  assert stats.examples == 40 and stats.truncated == stats.skipped_no_target == 0
  assert stats.rows < 30 and stats.fill > 0.6  # several examples share a row
  expected = sorted(tuple(formatter.encode(json.loads(e["messages"]), "")[0]) for e in source)
  found = []
  for r in range(len(rows)):
    row = rows[r]
    for segment in range(1, row["segment_ids"].max() + 1):
      where = np.flatnonzero(row["segment_ids"] == segment)
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
      ids = row["input_ids"][where]
      np.testing.assert_array_equal(row["targets"][where[:-1]], ids[1:])
      assert not row["loss_mask"][where[-1]]  # no target across examples
      found.append(tuple(ids))
    assert not row["loss_mask"][row["segment_ids"] == 0].any()
  assert sorted(found) == expected
  assert sum(int(rows[r]["loss_mask"].sum()) for r in range(len(rows))) == stats.target_tokens


def test_overlong_chat_is_truncated_skipped_or_refused_and_counted(tokenizer):
  formatter = lm.ChatFormatter(tokenizer)
  source = [_chat(0, words=200), _chat(1, turns=1)]
  pad = tokenizer.pad_token_id
  truncated = lm.pack_chat(source, formatter, max_length=96, pad_id=pad,
                           overlong="truncate").stats
  # The long question leaves no assistant token in the first 96: truncated, then skipped.
  assert truncated.truncated == 1 and truncated.truncated_tokens > 300
  assert truncated.skipped_no_target == 1 and truncated.rows == 1
  skipped = lm.pack_chat(source, formatter, max_length=96, pad_id=pad, overlong="skip").stats
  assert skipped.skipped_overlong == 1 and skipped.truncated == 0 and skipped.rows == 1
  with pytest.raises(DataError, match="example c0: .* tokens, more than config.data.max_length=96"):
    lm.pack_chat(source, formatter, max_length=96, pad_id=pad, overlong="error")
  with pytest.raises(ConfigError, match="config.data.overlong='drop'"):
    lm.pack_chat(source, formatter, max_length=96, pad_id=pad, overlong="drop")


def _trained_texts(tokenizer, ids, trained):
  spans, current = [], []
  for token, on in zip(ids, trained):
    if on:
      current.append(int(token))
    elif current:
      spans.append(tokenizer.decode(current))
      current = []
  return spans + ([tokenizer.decode(current)] if current else [])


def test_long_conversation_is_split_into_windows_of_whole_exchanges(tokenizer):
  formatter = lm.ChatFormatter(tokenizer)
  system = {"role": "system", "content": "Be brief."}
  messages = [system] + json.loads(_chat(0, turns=12, words=4)["messages"])
  messages.append({"role": "user", "content": "a last question nobody answers"})
  windows = formatter.encode_windows(messages, "c0", max_length=128)
  assert len(windows) > 2
  answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
  found = []
  for ids, trained in windows:
    assert len(ids) <= 128
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # repeated
    assert "nobody answers" not in text
    found += _trained_texts(tokenizer, ids, trained)
  assert found == answers  # every answer once, in order
  rows = lm.pack_chat([{"id": b"c0", "messages": json.dumps(messages)}], formatter,
                      max_length=128, pad_id=tokenizer.pad_token_id)
  assert rows.stats.split_conversations == 1 and rows.stats.windows == len(windows)
  assert rows.stats.truncated == 0


def test_conversation_without_assistant_turn_is_skipped_and_counted(tokenizer):
  formatter = lm.ChatFormatter(tokenizer)
  lonely = {"id": b"lonely", "messages": json.dumps([{"role": "user", "content": "hi"}])}
  rows = lm.pack_chat([lonely, _chat(1)], formatter, max_length=128,
                      pad_id=tokenizer.pad_token_id)
  assert rows.stats.skipped_no_target == 1 and rows.stats.examples == 2
  assert "skipped no target: 1" in rows.stats.summary("chat train")
  with pytest.raises(DataError, match="no example left to train on"):
    lm.pack_chat([lonely], formatter, max_length=128, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("raw, problem", [
    (b"[{\"role\": \"user\"", "are not valid JSON"),
    (b"{\"role\": \"user\", \"content\": \"x\"}", "must be a list"),
    (b"[{\"role\": \"user\", \"content\": 3}]", "must be a list"),
])
def test_malformed_messages_name_the_example(tokenizer, raw, problem):
  formatter = lm.ChatFormatter(tokenizer)
  with pytest.raises(DataError, match=f"example bad-7: messages {problem}"):
    lm.pack_chat([{"id": b"bad-7", "messages": raw}], formatter, max_length=64, pad_id=0)


def test_text_passages_are_split_not_truncated(tokenizer):
  passages = [{"id": b"p0", "text": ("To be or not to be. " * 60).encode()},
              {"id": b"p1", "text": b"A short line."}]
  rows = lm.pack_text(passages, tokenizer, max_length=64, pad_id=tokenizer.pad_token_id)
  stats = rows.stats
  lengths = [len(tokenizer(p["text"].decode())["input_ids"]) + 1 for p in passages]  # + EOS
  assert stats.split_passages == 1 and stats.tokens == sum(lengths)
  every = np.concatenate([rows[r]["input_ids"][rows[r]["segment_ids"] > 0]
                          for r in range(len(rows))])
  assert len(every) == sum(lengths)


def test_packed_row_logits_equal_each_example_alone():
  """Segment ids and positions keep packed examples from seeing each other."""
  model, params = models.create(tiny_decoders.model_config(arch=ARCH), seed=0)
  rng = np.random.default_rng(0)
  examples = [rng.integers(1, 64, size=n).astype(np.int32) for n in (9, 14, 5)]
  packer = lm._Packer(32, pad_id=0)  # pylint: disable=protected-access
  for ids in examples:
    packer.add(ids, np.ones(len(ids), bool))
  row = packer.arrays()
  assert row["input_ids"].shape == (1, 32)
  packed = model.apply(params, {k: jnp.asarray(v) for k, v in row.items()}, train=False)
  offset = 0
  for ids in examples:
    alone = model.apply(params, {"input_ids": jnp.asarray(ids[None]),
                                 "positions": jnp.arange(len(ids))[None],
                                 "segment_ids": jnp.ones((1, len(ids)), jnp.int32)}, train=False)
    np.testing.assert_allclose(packed[0, offset:offset + len(ids)], alone[0], atol=1e-5)
    offset += len(ids)
