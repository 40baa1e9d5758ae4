"""Preference losses over the log-probabilities of a pair's chosen and rejected completions.

Each loss maps per-pair log-probabilities (and, for DPO and IPO, those of the
reference model) to a per-pair loss and the implicit rewards that TRL reports;
the formulas are TRL's (`DPOTrainer`, `CPOTrainer` with `loss_type="simpo"`,
`ORPOTrainer`):

- **dpo** (Rafailov et al. 2023): -log sigmoid(beta * d) with d the difference of
  the chosen and rejected log-ratios log pi(y|x) - log pi_ref(y|x) (summed over
  the completion's tokens); with `label_smoothing` e, conservative DPO:
  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d). Rewards beta * log-ratio.
- **ipo** (Azar et al. 2023): (d' - 1 / (2 beta))^2, d' the difference of the
  log-ratios each divided by its completion's token count (as TRL normalises it).
- **simpo** (Meng et al. 2024), no reference: -log sigmoid(beta (a_c - a_r) - gamma)
  over the mean log-probability per token a (label smoothing as DPO's). Rewards
  beta * a.
- **orpo** (Hong et al. 2024), no reference: the chosen sequence's negative
  log-likelihood (prompt and completion tokens, averaged over the batch's tokens,
  as TRL computes it) minus beta * log sigmoid(log odds(a_c) - log odds(a_r)),
  odds(a) = e^a / (1 - e^a). Rewards beta * a.

Bradley-Terry (`bradley_terry`) is the reward model's loss on a pair of scores.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSSES = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_LOSSES = ("dpo", "ipo")  # the ones that compare with a reference model


@dataclasses.dataclass(frozen=True)
class Settings:
  """A preference loss and its constants (`config.preference`)."""

  loss: str = "dpo"
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5

  @property
  def needs_reference(self) -> bool:
    return self.loss in REFERENCE_LOSSES


@dataclasses.dataclass(frozen=True)
class PairLogps:
  """Per-pair sums over completion tokens [B] of the chosen and rejected log-probabilities,
  and their token counts [B]."""

  chosen: jax.Array
  rejected: jax.Array
  chosen_tokens: jax.Array
  rejected_tokens: jax.Array

  def means(self) -> tuple[jax.Array, jax.Array]:
    """The mean log-probability per completion token of each side."""
    return (self.chosen / jnp.maximum(self.chosen_tokens, 1.0),
            self.rejected / jnp.maximum(self.rejected_tokens, 1.0))


@dataclasses.dataclass(frozen=True)
class PairLoss:
  """Per-pair loss and what TRL logs of it, each [B]: the implicit rewards and the
  log-probabilities the loss compares (sums for DPO / IPO, means for SimPO / ORPO)."""

  loss: jax.Array
  chosen_reward: jax.Array
  rejected_reward: jax.Array
  chosen_logps: jax.Array
  rejected_logps: jax.Array


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x < 0, without cancellation (branching at -log 2)."""
  return jnp.where(x < -0.6931471805599453, jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _smoothed(logits: jax.Array, smoothing: float) -> jax.Array:
  """-(1 - e) log sigmoid(z) - e log sigmoid(-z)."""
  return (-(1.0 - smoothing) * jax.nn.log_sigmoid(logits)
          - smoothing * jax.nn.log_sigmoid(-logits))


def pair_loss(settings: Settings, logps: PairLogps, reference: jax.Array | None) -> PairLoss:
  """The loss of each pair (without ORPO's likelihood term, which `orpo_nll` gives).

  Args:
    settings: the loss and its constants.
    logps: the policy's log-probabilities of the pairs' completions.
    reference: [B, 2] the reference model's summed log-probabilities of the chosen
      and rejected completions (DPO and IPO), else None.
  """
  beta = settings.beta
  if settings.needs_reference:
    chosen_ratio = logps.chosen - reference[:, 0]
    rejected_ratio = logps.rejected - reference[:, 1]
    if settings.loss == "dpo":
      loss = _smoothed(beta * (chosen_ratio - rejected_ratio), settings.label_smoothing)
    else:  # ipo: log-ratios per completion token
      delta = (chosen_ratio / jnp.maximum(logps.chosen_tokens, 1.0)
               - rejected_ratio / jnp.maximum(logps.rejected_tokens, 1.0))
      loss = (delta - 1.0 / (2.0 * beta)) ** 2
    return PairLoss(loss, beta * chosen_ratio, beta * rejected_ratio, logps.chosen,
                    logps.rejected)
  chosen, rejected = logps.means()
  if settings.loss == "simpo":
    loss = _smoothed(beta * (chosen - rejected) - settings.simpo_gamma,
                     settings.label_smoothing)
  else:  # orpo: the odds-ratio term, weighted by beta (the paper's lambda)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    loss = -beta * jax.nn.log_sigmoid(log_odds)
  return PairLoss(loss, beta * chosen, beta * rejected, chosen, rejected)


def bradley_terry(chosen: jax.Array, rejected: jax.Array) -> jax.Array:
  """-log sigmoid(r_chosen - r_rejected) per pair: the reward model's loss."""
  return -jax.nn.log_sigmoid(chosen - rejected)
