r"""Preparing a large labelled-text file: ftjax beside Hugging Face `datasets`, in one run.

    python bench/data_prepare.py --rows=1000000

Writes a CSV and a Parquet file of `--rows` labelled texts (three classes, texts
of 8 to 40 words, seeded), then prepares each, in a fresh process per tool and
format so that peak memory is the process's own:

- ftjax: `config.data.name=csv|parquet` with `config.data.files.train`, i.e. the
  streamed two-pass read, the stratified 80/10/10 split and ArrayRecord files;
- datasets: `load_dataset("csv" | "parquet", data_files=...)` into an empty
  cache (Arrow files), then `train_test_split` twice for the same 80/10/10
  (not stratified: `stratify_by_column` needs a ClassLabel column, which a CSV
  load does not make).

Prints a table: seconds, rows/s and peak resident memory (RSS, from
`getrusage`) of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORDS = ("order refund invoice crash login error quote pricing demo upgrade shipping late "
          "broken screen password account billing charge card support please help thanks "
          "urgent today again still missing").split()


def write_files(folder: str, rows: int, seed: int = 0) -> dict[str, str]:
  """A CSV and a Parquet file of the same `rows` (text, label) rows."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  paths = {"csv": os.path.join(folder, "tickets.csv"),
           "parquet": os.path.join(folder, "tickets.parquet")}
  labels = np.array(["billing", "tech", "sales"])
  writer = None
  with open(paths["csv"], "w", newline="") as f:
    out = csv.writer(f)
    out.writerow(["text", "label"])
    for start in range(0, rows, 100_000):
      count = min(100_000, rows - start)
      lengths = rng.integers(8, 41, count)
      words = rng.integers(0, len(_WORDS), lengths.sum())
      cuts = np.cumsum(lengths)[:-1]
      texts = [f"ticket {start + i}: " + " ".join(_WORDS[w] for w in chunk)
               for i, chunk in enumerate(np.split(words, cuts))]
      chunk_labels = labels[rng.integers(0, 3, count)].tolist()
      out.writerows(zip(texts, chunk_labels))
      table = pa.table({"text": texts, "label": chunk_labels})
      writer = writer or pq.ParquetWriter(paths["parquet"], table.schema)
      writer.write_table(table)
  writer.close()
  return paths


def _ftjax(fmt: str, path: str, work: str) -> dict[str, int]:
  sys.path.insert(0, REPO)
  from ftjax.data import file_classification, sources  # pylint: disable=g-import-not-at-top
  columns = {"text": "text", "text_pair": "", "label": "label"}
  config = file_classification.config_for(fmt, [[path], [], []], columns, (), (0.8, 0.1, 0.1))
  splits, _ = sources.load_file_splits(file_classification.FileClassification, config, work)
  return {split: len(source) for split, source in splits.items()}


def _datasets(fmt: str, path: str, work: str) -> dict[str, int]:
  import datasets  # pylint: disable=g-import-not-at-top
  datasets.disable_progress_bars()
  train = datasets.load_dataset(fmt, data_files={"train": path}, cache_dir=work)["train"]
  first = train.train_test_split(test_size=0.2, seed=0)
  rest = first["test"].train_test_split(test_size=0.5, seed=0)
  return {"train": len(first["train"]), "validation": len(rest["train"]),
          "test": len(rest["test"])}


def _child(tool: str, fmt: str, path: str, work: str) -> None:
  """Prepares in this process and prints {"seconds", "splits", "rss_mib"} as JSON."""
  started = time.perf_counter()
  splits = (_ftjax if tool == "ftjax" else _datasets)(fmt, path, work)
  seconds = time.perf_counter() - started
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  print(json.dumps({"seconds": seconds, "splits": splits, "rss_mib": rss}))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--child", nargs=3, metavar=("TOOL", "FORMAT", "PATH"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--work", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _child(*args.child, args.work)
    return
  with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    paths = write_files(folder, args.rows)
    sizes = {fmt: os.path.getsize(p) / 2**20 for fmt, p in paths.items()}
    print(f"wrote {args.rows:,} rows in {time.perf_counter() - started:.0f} s: CSV "
          f"{sizes['csv']:.0f} MiB, Parquet {sizes['parquet']:.0f} MiB", flush=True)
    results = []
    for fmt, path in paths.items():
      for tool in ("ftjax", "datasets"):
        work = tempfile.mkdtemp(dir=folder)
        out = subprocess.run([sys.executable, __file__, "--child", tool, fmt, path,
                              f"--work={work}"], capture_output=True, text=True, check=False,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
          sys.exit(f"{tool} on {fmt} failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append((fmt, tool, result))
        print(f"{tool} {fmt}: {result}", flush=True)
  print(f"\n| file ({args.rows:,} rows) | tool | seconds | rows/s | peak RSS | "
        "train / validation / test |")
  print("|---|---|---|---|---|---|")
  for fmt, tool, r in results:
    splits = " / ".join(f"{r['splits'][s]:,}" for s in ("train", "validation", "test"))
    print(f"| {fmt} | {tool} | {r['seconds']:.1f} | {args.rows / r['seconds']:,.0f} | "
          f"{r['rss_mib']:,.0f} MiB | {splits} |")


if __name__ == "__main__":
  main()
