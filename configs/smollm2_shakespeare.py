r"""python launch/train.py --config=configs/smollm2_shakespeare.py --workdir=/tmp/ftjax/shakespeare

Domain adaptation of SmolLM2-135M-Instruct to Shakespeare's plays: packed
next-token prediction on every token of passages of the plays, evaluated on
three plays held out from training (so the held-out loss measures adaptation to
unseen text of the domain, not memorisation).

Takes the same variants as configs/smollm2_chat.py (debug, peft=lora|full|qlora|dora,
lr, steps / epochs, batch_size, max_length, rank, dtype, remat, seed).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import smollm2_chat  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return smollm2_chat.language_model_config(arg, data_name="shakespeare")
