"""Preference losses: pure functions of policy and reference sequence log-probs.

Every loss takes the summed log-probabilities of the chosen and rejected replies under the policy
(pi) and the reference (ref), shape [batch], and returns the per-pair loss, shape [batch]. They all
work on the same quantity, the difference of implicit rewards

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

where y_w is the chosen ("winning") and y_l the rejected ("losing") reply. The implicit reward of a
reply is beta * (log pi(y|x) - log ref(y|x)) (DPO paper, section 5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _logratio_difference(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """h = (log pi_w - log ref_w) - (log pi_l - log ref_l), the difference of log-ratios."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def sigmoid_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """DPO: -log sigmoid(beta * h).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model", Eq. 7.
    """
    h = _logratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -F.logsigmoid(beta * h)


def robust_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Conservative DPO (cDPO): the labels are flipped with probability eps = label_smoothing.

    -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO", Eq. 3. With eps = 0
    this is plain DPO. (TRL's `robust` loss is the unbiased estimator of Chowdhury et al. 2024; we
    ship the cDPO form, which is the one with a bounded, well-behaved optimum.)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}")
    h = _logratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """IPO: (h - 1 / (2 * beta))^2, with beta playing the role of the regularizer tau.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17. The paper's h uses per-token *average* log-probs; pass averaged
    log-probs (`--ipo_average_logps`, on by default) to match it.
    """
    h = _logratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """SLiC hinge loss on the log-ratio difference: max(0, 1 - beta * h).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 1 (the
    calibration term), with the reference-normalized likelihoods used by DPO; beta = 1 / delta.
    """
    h = _logratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.relu(1 - beta * h)


def kto_pair_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """KTO on paired data, the seed recipe's `kto_pair` (TRL <= 0.8).

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8, with
    the reference point z0 (a KL estimate) taken from the batch: the chosen replies are measured
    against the rejected half's mean log-ratio and vice versa,

        loss = ((1 - sigmoid(beta * (r_w - z_l))) + (1 - sigmoid(beta * (z_w - r_l)))) / 2,
        r = log pi - log ref,   z_w = max(0, mean(r_w)),   z_l = max(0, mean(r_l)).

    The mean of this over pairs equals TRL's mean over its concatenated 2*batch terms. z is detached,
    as in the paper: it is a reference point, not a training signal.
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    chosen_kl = chosen_logratio.mean().clamp(min=0).detach()
    rejected_kl = rejected_logratio.mean().clamp(min=0).detach()
    chosen_term = 1 - torch.sigmoid(beta * (chosen_logratio - rejected_kl))
    rejected_term = 1 - torch.sigmoid(beta * (chosen_kl - rejected_logratio))
    return (chosen_term + rejected_term) / 2


LossFn = Callable[..., Tensor]

LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "kto_pair": kto_pair_loss,
    "robust": robust_loss,
}


@dataclass
class PreferenceLossOutput:
    """The per-pair loss and the implicit rewards that are logged beside it."""

    losses: Tensor  # [batch]
    chosen_rewards: Tensor  # [batch], beta * (log pi_w - log ref_w), detached
    rejected_rewards: Tensor  # [batch], beta * (log pi_l - log ref_l), detached


def preference_loss(
    loss_type: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Compute the named loss and the implicit rewards for a batch of pairs."""
    if loss_type not in LOSSES:
        raise ValueError(f"--loss_type {loss_type!r} is not one of {', '.join(LOSSES)}")
    if beta <= 0:
        raise ValueError(f"--beta must be positive, got {beta}")
    fn = LOSSES[loss_type]
    kwargs = {"label_smoothing": label_smoothing} if loss_type == "robust" else {}
    losses = fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, **kwargs)
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=beta * (policy_chosen - ref_chosen).detach(),
        rejected_rewards=beta * (policy_rejected - ref_rejected).detach(),
    )
