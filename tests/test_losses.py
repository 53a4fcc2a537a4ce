"""Every preference loss against values computed by hand from the paper's formula."""

import math

import pytest
import torch

from preftune.losses import LOSSES, preference_loss

# Two pairs. Log-ratios r = log pi - log ref: chosen [1.0, -0.5], rejected [-1.0, 0.5]
# so h = r_w - r_l = [2.0, -1.0].
PI_W = torch.tensor([-10.0, -20.5])
PI_L = torch.tensor([-12.0, -19.5])
REF_W = torch.tensor([-11.0, -20.0])
REF_L = torch.tensor([-11.0, -20.0])
BETA = 0.5


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def expected(loss_type: str, label_smoothing: float = 0.0) -> list[float]:
    h = [2.0, -1.0]
    if loss_type == "sigmoid":
        return [-math.log(sig(BETA * x)) for x in h]
    if loss_type == "robust":
        e = label_smoothing
        return [-(1 - e) * math.log(sig(BETA * x)) - e * math.log(sig(-BETA * x)) for x in h]
    if loss_type == "ipo":
        return [(x - 1 / (2 * BETA)) ** 2 for x in h]
    if loss_type == "hinge":
        return [max(0.0, 1 - BETA * x) for x in h]
    if loss_type == "kto_pair":
        r_w, r_l = [1.0, -0.5], [-1.0, 0.5]
        z_w = max(0.0, sum(r_w) / 2)  # 0.25
        z_l = max(0.0, sum(r_l) / 2)  # max(0, -0.25) = 0
        return [((1 - sig(BETA * (w - z_l))) + (1 - sig(BETA * (z_w - lo)))) / 2 for w, lo in zip(r_w, r_l)]
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "kto_pair", "robust"])
def test_loss_matches_hand_computed(loss_type):
    out = preference_loss(loss_type, PI_W, PI_L, REF_W, REF_L, beta=BETA)
    torch.testing.assert_close(out.losses, torch.tensor(expected(loss_type)), rtol=1e-6, atol=1e-6)


def test_robust_with_label_smoothing():
    out = preference_loss("robust", PI_W, PI_L, REF_W, REF_L, beta=BETA, label_smoothing=0.2)
    torch.testing.assert_close(out.losses, torch.tensor(expected("robust", 0.2)), rtol=1e-6, atol=1e-6)


def test_rewards_are_beta_times_logratios():
    out = preference_loss("sigmoid", PI_W, PI_L, REF_W, REF_L, beta=BETA)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, -0.25]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.5, 0.25]))


def test_zero_logratio_gives_log2_for_dpo():
    x = torch.tensor([-3.0])
    out = preference_loss("sigmoid", x, x, x, x, beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2))


def test_gradient_pushes_chosen_up_and_rejected_down():
    for loss_type in LOSSES:
        pi_w, pi_l = PI_W.clone().requires_grad_(), PI_L.clone().requires_grad_()
        preference_loss(loss_type, pi_w, pi_l, REF_W, REF_L, beta=BETA).losses.sum().backward()
        # Pair 1 (h = -1) is ranked wrong: every loss must push it towards chosen.
        assert pi_w.grad[1] < 0 and pi_l.grad[1] > 0, loss_type


def test_bad_loss_type_and_beta():
    with pytest.raises(ValueError, match="--loss_type"):
        preference_loss("nope", PI_W, PI_L, REF_W, REF_L, beta=0.1)
    with pytest.raises(ValueError, match="--beta"):
        preference_loss("sigmoid", PI_W, PI_L, REF_W, REF_L, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("robust", PI_W, PI_L, REF_W, REF_L, beta=0.1, label_smoothing=0.7)
