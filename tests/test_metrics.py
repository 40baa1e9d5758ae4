"""The metrics log and TensorBoard events of a run that starts again."""

import pytest

from conftest import tensorboard_scalars
from ftjax.metrics import MetricWriter, read_metrics


def _write_run(writer, last_step):
  for step in range(1, last_step + 1):
    writer.write(step, "train", {"loss": 1.0 / step, "lr": 0.5})
    if step % 2 == 0:
      writer.write(step, "validation", {"accuracy": step / 10})
      writer.write_samples(step, [{"prompt": "a", "completion": str(step)}])


def test_a_start_from_a_checkpoint_keeps_only_what_was_logged_before_it(tmp_path):
  writer = MetricWriter(str(tmp_path))
  _write_run(writer, 6)
  writer.write(6, "test", {"accuracy": 0.7})  # the end of the run, killed before its close
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "split": "tr')  # a record cut short by the kill
  writer.close()

  resumed = MetricWriter(str(tmp_path))
  resumed.truncate_after(4)
  resumed.write(5, "train", {"loss": 0.2, "lr": 0.5})
  resumed.close()

  (tmp_path / "reference").mkdir()
  reference = MetricWriter(str(tmp_path / "reference"))
  _write_run(reference, 4)
  reference.write(5, "train", {"loss": 0.2, "lr": 0.5})
  reference.close()
  assert read_metrics(tmp_path) == read_metrics(tmp_path / "reference")
  assert tensorboard_scalars(tmp_path) == tensorboard_scalars(tmp_path / "reference")
  assert ("train/loss", 6, 1.0 / 6) not in tensorboard_scalars(tmp_path)
  assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_the_end_of_a_finished_run_is_logged_once_when_it_starts_again(tmp_path):
  for _ in range(2):
    writer = MetricWriter(str(tmp_path))
    writer.truncate_after(2)
    if not (tmp_path / "metrics.jsonl").exists():
      _write_run(writer, 2)
    writer.write(2, "test", {"accuracy": 0.7})
    writer.close()
  splits = [(r["step"], r["split"]) for r in read_metrics(tmp_path)]
  assert splits == [(1, "train"), (2, "train"), (2, "validation"), (2, "samples"), (2, "test")]
  test_points = [s for s in tensorboard_scalars(tmp_path) if s[0].startswith("test/")]
  assert test_points == [("test/accuracy", 2, pytest.approx(0.7))]
