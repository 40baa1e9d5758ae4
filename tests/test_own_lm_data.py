"""Language-model data from the user's own files: chat, prompt-completion and text rows."""

import json

import pytest

from configs import smollm2_chat
from conftest import ONE_DEVICE, with_overrides
from ftjax import metrics, trainer
from ftjax.data import check, file_lm, inputs, sources
from ftjax.errors import ConfigError, DataError


def _conversation(i, weight=None):
  answer = {"role": "assistant", "content": f"Order {i} ships tomorrow."}
  first = {"role": "assistant", "content": "Let me check."}
  if weight is not None:
    first["weight"] = weight
  return [{"role": "system", "content": "You are a support agent."},
          {"role": "user", "content": f"Where is order {i}?"}, first,
          {"role": "user", "content": "Thanks."}, answer]


def _jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(record) + "\n" for record in records)
  return str(path)


def _load(tmp_path, fmt, train, validation=(), fractions=(0.9, 0.05, 0.05)):
  columns = {"messages": "messages", "prompt": "prompt", "completion": "completion",
             "text": "text"}
  config = file_lm.config_for(fmt, [[train], list(validation), []], columns, fractions)
  splits, _ = sources.load_file_splits(file_lm.FileLanguageModel, config,
                                       str(tmp_path / "tfds"))
  return config.kind, splits


def _decoded(split):
  return [json.loads(split[i]["messages"]) for i in range(len(split))]


def test_openai_chat_rows_keep_system_messages_and_weights(tmp_path):
  records = [{"messages": _conversation(i, weight=0)} for i in range(40)]
  records.append({"messages": _conversation(99)[:2]})  # no assistant turn: skipped
  kind, splits = _load(tmp_path, "json", _jsonl(tmp_path / "chat.jsonl", records))
  assert kind == "messages"
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [36, 2, 2]
  every = sorted((m for s in splits.values() for m in _decoded(s)), key=lambda m: m[1]["content"])
  assert every == sorted((r["messages"] for r in records[:40]), key=lambda m: m[1]["content"])
  assert every[0][0]["role"] == "system" and every[0][2]["weight"] == 0


def test_prompt_completion_rows_become_a_user_and_an_assistant_turn(tmp_path):
  rows = [{"prompt": f"Spell {i}:", "completion": f"number {i}"} for i in range(20)]
  rows += [{"prompt": [{"role": "system", "content": "Be exact."},
                       {"role": "user", "content": "Spell 99:"}],
            "completion": [{"role": "assistant", "content": "ninety-nine"}]}]
  validation = _jsonl(tmp_path / "validation.jsonl", rows[:2])
  kind, splits = _load(tmp_path, "json", _jsonl(tmp_path / "pc.jsonl", rows), [validation])
  assert kind == "prompt_completion"
  assert _decoded(splits["validation"]) == [
      [{"role": "user", "content": "Spell 0:"}, {"role": "assistant", "content": "number 0"}],
      [{"role": "user", "content": "Spell 1:"}, {"role": "assistant", "content": "number 1"}]]
  assert len(splits["train"]) + len(splits["test"]) == 21
  every = [m for s in ("train", "test") for m in _decoded(splits[s])]
  assert [m[0]["role"] for m in every if m[-1]["content"] == "ninety-nine"] == ["system"]


def test_text_rows_and_chat_json_in_a_csv_cell(tmp_path):
  text = tmp_path / "corpus.csv"
  text.write_text("text\n" + "".join(f'"Passage {i}, with a comma."\n' for i in range(30)))
  kind, splits = _load(tmp_path, "csv", str(text))
  assert kind == "text" and splits["train"][0]["text"].decode().startswith("Passage ")
  chats = tmp_path / "chats.csv"
  chats.write_text("messages\n" + "".join(
      '"' + json.dumps(_conversation(i)).replace('"', '""') + '"\n' for i in range(30)))
  kind, splits = _load(tmp_path / "chats", "csv", str(chats))
  assert kind == "messages" and _decoded(splits["train"])[0][0]["role"] == "system"


@pytest.mark.parametrize("record, match", [
    ({"question": "?", "answer": "!"}, r"line 1: the row has the columns \['answer', "
     r"'question'\], none of config.data.columns' messages"),
    ({"messages": [{"role": "tool", "content": "42"}]}, r"line 1: message 0: role 'tool' is "
     r"not one of \['system', 'user', 'assistant'\]"),
    ({"messages": "not a list"}, r"line 1: column 'messages': not a JSON list of messages"),
    ({"prompt": "Q", "completion": [{"role": "assistant", "content": "A"}]},
     r"line 1: columns \['prompt', 'completion'\]: give both as strings or both as lists"),
    ({"prompt": [{"role": "user", "content": "Q"}],
      "completion": [{"role": "user", "content": "A"}]},
     r"line 1: column 'completion': the completion must be assistant messages"),
], ids=["no known column", "unknown role", "messages not a list", "mixed prompt types",
        "completion by the user"])
def test_a_malformed_row_names_the_file_and_line(tmp_path, record, match):
  path = _jsonl(tmp_path / "bad.jsonl", [record])
  with pytest.raises(DataError, match=rf"{path}: {match}"):
    _load(tmp_path, "json", path)


def test_every_malformed_row_of_a_chat_file_is_listed(tmp_path):
  good = [json.dumps({"messages": _conversation(i)}) for i in range(30)]
  lines = good[:1] + ['{"messages": [broken'] + good[1:3] + [
      json.dumps({"messages": [{"role": "tool", "content": "42"}]}),
      json.dumps({"messages": [{"role": "user", "content": " "},
                               {"role": "assistant", "content": "Hi"}]}),
      "[1, 2]"] + good[3:]
  path = tmp_path / "chats.jsonl"
  path.write_text("\n".join(lines) + "\n")
  config = with_overrides(smollm2_chat.get_config("debug"), **{
      "data.name": "json", "data.files.train": str(path),
      "data.data_dir": str(tmp_path / "tfds")})
  with pytest.raises(DataError) as error:
    inputs.build(config)
  assert str(error.value).splitlines() == [
      "4 malformed rows in config.data.files:",
      f"  {path}: line 2: invalid JSON: Expecting value (column 15)",
      f"  {path}: line 5: message 0: role 'tool' is not one of ['system', 'user', "
      "'assistant']",
      f"  {path}: line 6: message 0: 'content' must be a non-empty string",
      f"  {path}: line 7: a JSON list, not an object ({{\"column\": value, ...}})"]
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))  # nothing prepared
  path.write_text("\n".join(lines[:1] + lines[4:5] + good[3:]) + "\n")  # one problem
  with pytest.raises(DataError, match=rf"^{path}: line 2: message 0: role 'tool'"):
    inputs.build(config)


def test_chat_config_trains_on_an_openai_chat_file(tmp_path, data_dir):
  path = _jsonl(tmp_path / "support.jsonl", [{"messages": _conversation(i, weight=0)}
                                             for i in range(80)])
  config = smollm2_chat.get_config("debug")
  config = with_overrides(config, **{"data.name": "json", "data.files.train": path,
                                     "data.data_dir": str(tmp_path / "tfds")})
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  validation = [r for r in metrics.read_metrics(tmp_path / "run")
                if r["split"] == "validation"]
  assert validation[-1]["loss"] < validation[0]["loss"]  # it learns the support answers
  assert final["test"]["tokens"] > 0
  check = json.loads((tmp_path / "run" / "data_check.json").read_text())
  assert check["kind"] == "chat"
  assert check["splits"]["train"]["examples"] == 64  # the debug config's max_train_examples


def test_extra_evaluation_sets_are_evaluated_at_every_evaluation(tmp_path, data_dir):
  config = smollm2_chat.get_config("debug")
  config = with_overrides(config, **{"data.data_dir": data_dir,
                                     "data.extra_eval": ("shakespeare",)})
  final = trainer.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
  records = metrics.read_metrics(tmp_path / "run")
  steps = lambda split: [r["step"] for r in records if r["split"] == split]
  assert steps("shakespeare") == steps("validation") == [0, 2, 4]
  assert final["extra_eval"]["shakespeare"]["tokens"] > 0
  assert final["best_step"] == 4  # early stopping still follows the validation split
  for extra, match in ((("tweets",), r"'tweets' is classification data, not data of the task "
                        r"'causal_lm'; packaged data sets of that task: \['chat', "
                        r"'shakespeare'\]"),
                       (("chat",), r"'chat' is the run's data set")):
    with pytest.raises(ConfigError, match=match):
      trainer.run(with_overrides(config, **{"data.extra_eval": extra}), str(tmp_path / "x"),
                  devices=ONE_DEVICE)


def test_the_data_check_counts_windows_of_split_conversations(data_dir):
  """Rows shorter than some conversations: those are split into windows, and what does
  not fit is counted against the examples and windows packed, not the conversations."""
  config = with_overrides(smollm2_chat.get_config("debug"),
                          **{"data.data_dir": data_dir, "data.max_length": 64})
  built = inputs.build(config)
  stats = built.splits["train"].stats
  assert stats.split_conversations > 0 and stats.truncated > 0
  pieces = stats.examples - stats.split_conversations + stats.windows
  warning = next(w for w in check.check(config, built).warnings if w.startswith("train: "))
  assert warning.startswith(f"train: {stats.truncated + stats.skipped_overlong:,} of "
                            f"{pieces:,} examples and windows of split conversations do not "
                            "fit config.data.max_length=64 tokens"), warning
