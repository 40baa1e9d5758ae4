r"""Exports a run's best parameters: `python launch/export.py --workdir=DIR --out=OUT`.

--format=merged (default) folds LoRA / DoRA adapters into the base weights and
writes `model.safetensors` with the pretrained checkpoint's tensor names, plus
its config and tokenizer files: `transformers.AutoModel.from_pretrained(OUT)`
loads it; a classifier's config gets the run's classes as `id2label`. --format=adapter writes only the adapters in PEFT's format
(`adapter_config.json` + `adapter_model.safetensors`), for
`peft.PeftModel.from_pretrained(<base model>, OUT)`.
"""

from absl import app, flags

from ftjax import cli, models, runs
from ftjax.errors import ConfigError
from ftjax.hub import export
from ftjax.peft import lora, methods

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's workdir.")
_OUT = flags.DEFINE_string("out", None, "The folder to write.")
_FORMAT = flags.DEFINE_enum("format", "merged", ["merged", "adapter"], "What to export.")
flags.mark_flags_as_required(["workdir", "out"])


def export_run(workdir: str, out: str, what: str) -> list[str]:
  """Rebuilds the run's model, restores its best parameters and writes the export."""
  config, _, module = runs.restore_module(workdir)
  source, name_map, extra = models.hf_format(config.model)
  if what == "merged":
    return export.save_merged(module, out, source_dir=source, name_map=name_map, extra=extra,
                              class_names=runs.class_names(workdir))
  if config.peft.method not in methods.ADAPTERS:
    raise ConfigError(f"--format=adapter needs a LoRA, DoRA or QLoRA run; {workdir} used "
                      f"peft.method={config.peft.method!r}")
  return export.save_peft_adapter(module, out, spec=lora.LoraSpec.from_config(config.peft),
                                  source_dir=source, name_map=name_map)


def _export() -> None:
  names = export_run(_WORKDIR.value, _OUT.value, _FORMAT.value)
  print(f"wrote {len(names)} tensors to {_OUT.value}")


if __name__ == "__main__":
  app.run(cli.main(_export))
