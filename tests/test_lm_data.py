"""Tests for the language-model data sets: chat conversations and Shakespeare passages."""

from __future__ import annotations

import json
import os
import random

import pytest

from ftjax import data
from ftjax.data import openai_chat
from ftjax.data.presets import chat
from ftjax.data.presets import shakespeare as sh
from ftjax.errors import DataError

# The splits are fixed once for the life of the data sets: these pin them, so
# a change in parsing, hashing or rounding on any machine fails here.
CHAT_SIZES = {"train": 4420, "validation": 245, "test": 246}
CHAT_SKIPPED = {
    "chitchat: no assistant turn (skipped)": 3151,
    "chitchat: empty messages dropped": 33,
    "chitchat: turns merged across a dropped empty turn": 9,
    "chitchat: duplicate conversations (skipped)": 4,
    "chatterbot: string entries": 1,
    "chatterbot: no assistant turn (skipped)": 1,
    "chatterbot: duplicate conversations (skipped)": 1127,
}
SHAKESPEARE_SIZES = {"train": 2336, "validation": 241, "test": 224}
SHAKESPEARE_HELD_OUT = {"validation": ["henry_iv_part_2", "henry_v", "timon_of_athens"],
                        "test": ["cymbeline", "henry_vi_part_2", "troilus_and_cressida"]}


def _rows(source) -> list[dict]:
  return source.__getitems__(list(range(len(source))))


def _decoded(splits: dict) -> dict[str, list[dict]]:
  return {name: [{k: v.decode() for k, v in row.items()} for row in _rows(source)]
          for name, source in splits.items()}


@pytest.fixture(scope="session")
def chat_rows(data_dir) -> dict[str, list[dict]]:
  return _decoded(data.load_splits("chat", data_dir))


@pytest.fixture(scope="session")
def shakespeare_rows(data_dir) -> dict[str, list[dict]]:
  return _decoded(data.load_splits("shakespeare", data_dir))


def _conversation(i: int, **extra) -> dict:
  return {"messages": [{"role": "user", "content": f"Question {i}?"},
                       {"role": "assistant", "content": f"Answer {i}."}], **extra}


def _write_jsonl(path, records: list) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


# --- Chat: the packaged corpus -----------------------------------------------


def test_registered():
  assert {"chat", "shakespeare"} <= set(data.dataset_names())


def test_chat_split_sizes_and_disjoint(chat_rows):
  assert {name: len(rows) for name, rows in chat_rows.items()} == CHAT_SIZES
  ids = {name: {row["id"] for row in rows} for name, rows in chat_rows.items()}
  assert sum(len(s) for s in ids.values()) == sum(CHAT_SIZES.values())
  assert not ids["train"] & ids["validation"]
  assert not ids["train"] & ids["test"]
  assert not ids["validation"] & ids["test"]
  for rows in chat_rows.values():
    assert {row["source"] for row in rows} == {"chitchat", "chatterbot"}


def test_chat_examples_alternate_and_have_an_assistant_turn(chat_rows):
  contents = set()
  for rows in chat_rows.values():
    for row in rows:
      assert row["id"].startswith(row["source"] + "/")
      messages = json.loads(row["messages"])
      roles = [m["role"] for m in messages]
      assert roles == [openai_chat.ROLES[i % 2] for i in range(len(roles))], row["id"]
      assert "assistant" in roles
      assert all(set(m) == {"role", "content"} for m in messages)
      assert all(m["content"] and m["content"] == m["content"].strip() for m in messages)
      contents.add(row["messages"])
  assert len(contents) == sum(CHAT_SIZES.values())  # No duplicate conversation.


def test_chat_skipped_counts():
  conversations, counts = chat.read_examples()
  assert dict(counts) == CHAT_SKIPPED
  assert len(conversations) == sum(CHAT_SIZES.values())


# --- Chat: custom JSONL and malformed input ----------------------------------


def test_chat_custom_jsonl(tmp_path, data_dir):
  records = [_conversation(i) for i in range(40)]
  records.insert(5, {"messages": [{"role": "user", "content": "Anyone there?"}]})
  records.insert(9, "")  # Blank lines are ignored.
  path = _write_jsonl(tmp_path / "chats.jsonl", records)
  conversations, counts = chat.read_examples(path)
  assert len(conversations) == 40
  assert dict(counts) == {"custom: no assistant turn (skipped)": 1}
  assert conversations[5]["id"] == "custom/line7"
  splits = data.load_splits("chat", data_dir, source_path=path)
  assert {k: len(v) for k, v in splits.items()} == {"train": 36, "validation": 2, "test": 2}
  row = splits["test"][0]
  assert row["source"] == b"custom"
  assert json.loads(row["messages"])[0]["role"] == "user"


def test_chat_jsonl_in_the_openai_format_keeps_system_messages_and_weights(tmp_path):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello.", "weight": 0},
              {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]
  path = _write_jsonl(tmp_path / "openai.jsonl", [
      {"messages": messages},
      {"messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Unanswered"}]}])
  conversations, counts = openai_chat.read_jsonl(path)
  assert [c["messages"] for c in conversations] == [messages]
  assert dict(counts) == {"custom: no assistant turn (skipped)": 1}


def test_chat_split_ignores_file_order(tmp_path):
  records = [_conversation(i, id=f"c{i}", source="ab"[i % 2]) for i in range(60)]
  first, _ = openai_chat.read_jsonl(_write_jsonl(tmp_path / "a.jsonl", records))
  random.Random(1).shuffle(records)
  again, _ = openai_chat.read_jsonl(_write_jsonl(tmp_path / "b.jsonl", records))
  named = [[{first[i]["id"] for i in part} for part in chat.split_conversations(first)],
           [{again[i]["id"] for i in part} for part in chat.split_conversations(again)]]
  assert named[0] == named[1]
  # 30 per source, cut at round(27) and round(28.5): 27 / 2 / 1 each.
  assert [len(part) for part in named[0]] == [54, 4, 2]
  for part in chat.split_conversations(first):  # Stratified: both sources everywhere.
    assert {first[i]["source"] for i in part} == {"a", "b"}


def test_chat_duplicates_dropped(tmp_path):
  path = _write_jsonl(tmp_path / "dup.jsonl", [_conversation(1), _conversation(2),
                                               _conversation(1, id="again")])
  conversations, counts = chat.read_examples(path)
  assert [c["id"] for c in conversations] == ["custom/line1", "custom/line2"]
  assert counts["custom: duplicate conversations (skipped)"] == 1


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"text": "no messages"}, "non-empty list 'messages'"),
    ({"messages": []}, "non-empty list 'messages'"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "'tool' is not one of"),
    ({"messages": [{"role": "user", "content": "A"}, {"role": "system", "content": "B"}]},
     "message 1: role 'system'; after an optional first 'system' message, roles must"),
    ({"messages": [{"role": "user", "content": "A", "weight": 0}]}, "message 0: 'weight' is "
     "for assistant messages, 0 \\(not trained\\) or 1, not 0 on a 'user' message"),
    ({"messages": [{"role": "user", "content": "A"},
                   {"role": "assistant", "content": "B", "weight": 0.5}]}, "not 0.5"),
    ({"messages": [{"role": "assistant", "content": "Hi."}]}, "must alternate"),
    ({"messages": [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]},
     "message 1: role 'user'; after an optional first 'system' message, roles must "
     "alternate"),
    ({"messages": [{"role": "user", "content": "  "}]}, "non-empty string"),
    ({"messages": [{"role": "user", "content": 3}]}, "non-empty string"),
    ({"messages": [{"role": "user", "text": "Hi"}]}, "expected an object with the keys 'role' "
     "and 'content'"),
    (_conversation(9, id=7), "'id' must be a non-empty string"),
    (_conversation(9, id="c1"), "id 'custom/c1' repeats line 2"),
])
def test_chat_malformed_line_names_the_line(tmp_path, bad, reason):
  path = _write_jsonl(tmp_path / "bad.jsonl",
                      [_conversation(0), _conversation(1, id="c1"), bad, _conversation(3)])
  with pytest.raises(DataError, match=reason) as info:
    openai_chat.read_jsonl(path)
  assert f"{path}: line 3" in str(info.value)


def test_chat_missing_empty_and_too_small(tmp_path):
  missing = str(tmp_path / "absent.jsonl")
  with pytest.raises(DataError, match="not found"):
    data.load_splits("chat", str(tmp_path / "tfds"), source_path=missing)
  with pytest.raises(DataError, match=f"{missing}: file not found"):
    openai_chat.read_jsonl(missing)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  with pytest.raises(DataError, match="file is empty"):
    openai_chat.read_jsonl(str(empty))
  small = _write_jsonl(tmp_path / "small.jsonl", [_conversation(i) for i in range(5)])
  with pytest.raises(DataError, match="leave the validation split empty"):
    data.load_splits("chat", str(tmp_path / "tfds"), source_path=small)
  lonely = _write_jsonl(tmp_path / "lonely.jsonl",
                        [{"messages": [{"role": "user", "content": "Hello?"}]}])
  with pytest.raises(DataError, match="no conversation with an assistant turn"):
    chat.read_examples(lonely)


def _chitchat_entry(*turns) -> dict:
  return {"messages": [[{"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender}
                        for text in texts] for sender, texts in turns]}


def test_chitchat_roles_empty_texts_and_senders(tmp_path):
  corpus = {
      "b": _chitchat_entry(("s1", ["Hi", "how are you?"]), ("s2", ["Fine "]),
                           ("s1", [""]), ("s2", ["and you?"])),
      "a": _chitchat_entry(("s1", ["Anyone?"])),
      "c": _chitchat_entry(("s1", ["x"]), ("s2", ["y"]), ("s3", ["z"])),
  }
  path = tmp_path / "dataset.json"
  path.write_text(json.dumps(corpus))
  conversations, counts = chat.read_chitchat(str(path))
  assert conversations == [{"id": "chitchat/b", "source": "chitchat", "messages": [
      {"role": "user", "content": "Hi\nhow are you?"},
      {"role": "assistant", "content": "Fine\nand you?"}]}]
  assert dict(counts) == {"chitchat: empty messages dropped": 1,
                          "chitchat: turns merged across a dropped empty turn": 1,
                          "chitchat: no assistant turn (skipped)": 1,
                          "chitchat: more than two senders (skipped)": 1}


def test_chatterbot_file(tmp_path):
  path = tmp_path / "small.yml"
  path.write_text("categories:\n- small\nconversations:\n"
                  "- - Hello\n  - Hi there \n"
                  "- A question without answer? - '22'\n"
                  "- - One\n  - Two\n  - Three\n")
  conversations, counts = chat.read_chatterbot_file(str(path))
  assert [c["id"] for c in conversations] == ["chatterbot/small/0", "chatterbot/small/2"]
  assert conversations[0]["messages"][1] == {"role": "assistant", "content": "Hi there"}
  assert [m["role"] for m in conversations[1]["messages"]] == ["user", "assistant", "user"]
  assert dict(counts) == {"chatterbot: string entries": 1,
                          "chatterbot: no assistant turn (skipped)": 1}


@pytest.mark.parametrize("reader, file_name, content, reason", [
    (chat.read_chitchat, "dataset.json", "[1, 2]", "expected a JSON object"),
    (chat.read_chitchat, "dataset.json", '{"k": {"messages": [["text"]]}}',
     "entry 'k': turn 0, message 0"),
    (chat.read_chitchat, "dataset.json", '{"k": {"messages": "hi"}}',
     "entry 'k': expected an object with a list 'messages'"),
    (chat.read_chitchat, "dataset.json", '{"k": ', "not valid JSON"),
    (chat.read_chatterbot_file, "bad.yml", "conversations:\n- - Hello\n  - [nested]\n",
     r"conversation 0 \(line 2\): message 1 is list"),
    (chat.read_chatterbot_file, "bad.yml", "conversations:\n- - Hi\n  - Yo\n- - Hello\n  - 42\n",
     r"conversation 1 \(line 4\): message 1 is int"),
    (chat.read_chatterbot_file, "bad.yml", "conversations:\n- {a: b}\n",
     r"conversation 0 \(line 2\): expected a list of strings"),
    (chat.read_chatterbot_file, "bad.yml", "conversations:\n- - Hi\n  - ''\n",
     "message 1 is empty"),
    (chat.read_chatterbot_file, "bad.yml", "categories: [x]\n",
     "expected a mapping with a list 'conversations'"),
    (chat.read_chatterbot_file, "bad.yml", "conversations: [a, b\n", "not valid YAML"),
])
def test_chitchat_and_chatterbot_malformed(tmp_path, reader, file_name, content, reason):
  path = tmp_path / file_name
  path.write_text(content)
  with pytest.raises(DataError, match=reason) as info:
    reader(str(path))
  assert str(path) in str(info.value)


# --- Shakespeare ---------------------------------------------------------------


def test_shakespeare_split_by_play(shakespeare_rows):
  assert {name: len(rows) for name, rows in shakespeare_rows.items()} == SHAKESPEARE_SIZES
  plays = {name: {row["play"] for row in rows} for name, rows in shakespeare_rows.items()}
  ids = {name: {row["id"] for row in rows} for name, rows in shakespeare_rows.items()}
  assert sum(len(p) for p in plays.values()) == len(set().union(*plays.values())) == 42
  assert sum(len(s) for s in ids.values()) == len(set().union(*ids.values()))
  assert {name: sorted(plays[name]) for name in SHAKESPEARE_HELD_OUT} == SHAKESPEARE_HELD_OUT
  assert set(sh.POEMS) <= plays["train"]
  for rows in shakespeare_rows.values():
    assert all(row["id"].split("/")[0] == row["play"] for row in rows)
    assert all(0 < len(row["text"]) <= sh.MAX_PASSAGE_CHARS for row in rows)
  first = shakespeare_rows["validation"][0]
  assert first["id"] == "henry_iv_part_2/0" and first["text"].startswith("KING HENRY IV")


def test_shakespeare_passages_keep_every_word():
  works = sh.read_works()
  assert len(works) == 42 and not any(name.endswith("_f") for name in works)
  for text in works.values():
    assert "\n\n".join(sh.passages(text)).split() == text.split()


def test_passages_cut_only_long_paragraphs():
  short = "\n".join(["Line of verse."] * 3)  # 44 characters.
  long_paragraph = "\n".join(f"Long line {i:02d}." for i in range(10))  # 10 x 13 + 9.
  long_line = "word " * 30
  text = f"{short}\n\n  \n\n{short}\n\n{long_paragraph}\n\n{short}\n\n{long_line}"
  result = sh.passages(text, max_chars=100)
  assert result[0] == f"{short}\n\n{short}"  # Merged: 90 characters.
  assert all(len(p) <= 100 for p in result)
  # Cut at line ends: 7 lines fill 97 characters; the rest joins the next paragraph.
  assert result[1] == "\n".join(f"Long line {i:02d}." for i in range(7))
  assert result[2] == "\n".join(f"Long line {i:02d}." for i in range(7, 10)) + "\n\n" + short
  # The 149-character line is cut at its last space within 100.
  assert [len(p) for p in result[3:]] == [99, 49]
  assert "\n\n".join(result).split() == text.split()


def test_strip_gutenberg():
  text = ("The Project Gutenberg EBook of X\nlicense\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nThe play.\n\n"
          "End of the Project Gutenberg EBook of X\nmore license\n")
  assert sh.strip_gutenberg(text).strip() == "The play."
  assert sh.strip_gutenberg("No markers.\n") == "No markers.\n"


def _write_texts(directory, texts: dict[str, str | bytes]) -> str:
  directory.mkdir(exist_ok=True)
  for name, text in texts.items():
    raw = text.encode() if isinstance(text, str) else text
    (directory / name).write_bytes(raw)
  return str(directory)


def test_shakespeare_custom_folder(tmp_path, data_dir):
  texts = {f"work{i}.txt": "\n\n".join(f"Paragraph {j} of work {i}." for j in range(5))
           for i in range(5)}
  texts["notes.md"] = "Not a text."
  texts["work0.txt"] = "\ufeffHeader\r\n*** START OF THE PROJECT GUTENBERG EBOOK W ***\r\nBody."
  folder = _write_texts(tmp_path / "texts", texts)
  assert sh.read_works(folder)["work0"] == "Body."
  splits = _decoded(data.load_splits("shakespeare", data_dir, source_path=folder))
  plays = {name: {row["play"] for row in rows} for name, rows in splits.items()}
  assert [len(plays[name]) for name in data.sources.SPLITS] == [3, 1, 1]
  assert set().union(*plays.values()) == {f"work{i}" for i in range(5)}


def test_shakespeare_bad_input(tmp_path):
  missing = str(tmp_path / "absent")
  with pytest.raises(DataError, match=f"{missing}: folder not found"):
    sh.read_works(missing)
  with pytest.raises(DataError, match="not found"):
    data.load_splits("shakespeare", str(tmp_path / "tfds"), source_path=missing)
  empty = _write_texts(tmp_path / "empty", {"readme.md": "No texts here."})
  with pytest.raises(DataError, match=r"no \*\.txt files"):
    sh.read_works(empty)
  latin1 = _write_texts(tmp_path / "latin1", {"a.txt": "Fine.", "b.txt": b"Line 1\nCaf\xe9\n"})
  with pytest.raises(DataError, match="line 2: bytes that are not valid UTF-8") as info:
    sh.read_works(latin1)
  assert os.path.join(latin1, "b.txt") in str(info.value)
  blank = _write_texts(tmp_path / "blank", {"a.txt": "Fine.", "b.txt": " \n\n"})
  with pytest.raises(DataError, match="b.txt: file is empty"):
    sh.read_works(blank)
  with pytest.raises(DataError, match="need at least 3 works"):
    sh.split_works(["a", "b"])


# --- Determinism -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat", "shakespeare"])
def test_preparation_is_deterministic(tmp_path, name, chat_rows, shakespeare_rows):
  again = _decoded(data.load_splits(name, str(tmp_path / "tfds")))
  assert again == (chat_rows if name == "chat" else shakespeare_rows)
