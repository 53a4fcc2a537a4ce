"""Score held-out preference pairs with a policy and its reference.

Two accuracies answer two questions:
- implicit-reward accuracy: does the tuning rank chosen above rejected, i.e. is
  (log pi_w - log ref_w) > (log pi_l - log ref_l)? This is DPO's `rewards/accuracies`.
- likelihood accuracy: does a model, by itself, give the chosen reply a higher log-prob than the
  rejected one? Measured for the reference ("before") and the policy ("after").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from preftune.training.batching import PairCollator
from preftune.training.logprobs import batch_logps


@dataclass
class PairScores:
    chosen_logps: torch.Tensor  # [pairs]
    rejected_logps: torch.Tensor  # [pairs]

    def likelihood_accuracy(self) -> float:
        return (self.chosen_logps > self.rejected_logps).float().mean().item()


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    pairs: list[dict],
    pad_token_id: int,
    batch_size: int = 8,
    show_progress: bool = False,
    desc: str = "scoring pairs",
) -> PairScores:
    """Summed reply log-probs of chosen and rejected for each tokenized pair."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    loader = DataLoader(pairs, batch_size=batch_size, collate_fn=PairCollator(pad_token_id))
    for batch in tqdm(loader, desc=desc, disable=not show_progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        logps = batch_logps(model, batch).logps
        half = logps.shape[0] // 2
        chosen.append(logps[:half].cpu())
        rejected.append(logps[half:].cpu())
    model.train(was_training)
    return PairScores(torch.cat(chosen), torch.cat(rejected))


def implicit_reward_accuracy(policy: PairScores, reference: PairScores) -> float:
    """Fraction of pairs where the policy's implicit reward ranks chosen above rejected."""
    chosen_reward = policy.chosen_logps - reference.chosen_logps
    rejected_reward = policy.rejected_logps - reference.rejected_logps
    return (chosen_reward > rejected_reward).float().mean().item()
