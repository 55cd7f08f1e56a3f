"""Rewards as tensors, as UPO combines them: the per-row weighted sum, the gap under which two rewards are a tie, and
the standardisation within groups of rows (`normalize_rewards_by`, e.g. per domain) before GRPO forms advantages."""


def weighted_sum(rewards_per_func, weights):
    """Per-row weighted sum of a `(rows, funcs)` reward tensor. NaN (not applicable) entries are skipped; a row where
    all are NaN stays NaN."""
    import torch

    total = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


# Rewards closer than this are equal: weighted sums of the same rewards in another order differ in the last bits
# (0.3 + 0.4 against 0.7 in float32), and such a "gap" is no preference.
TIE = 1e-6


def normalize_by_group(rewards_per_func, weights, groups: list, eps: float = 1e-4):
    """Standardise rewards within each group of rows (e.g. each `domain`), before GRPO forms group advantages.

    Each reward column is centred on its mean over the group's rows it applies to, and all columns are divided by the
    standard deviation of the *combined* (weighted) reward over the group's rows. When every reward applies to every
    row of a group, the weighted sum TRL computes afterwards is exactly the combined reward standardised per group
    (mean 0, std 1). When a reward is not applicable (NaN, which stays NaN) to some rows of a group, it is centred
    among the others only, so the sum is not standardised: a difference between rows that comes only from which
    rewards apply to them is removed (accuracy 1 and format 0 on some rows, format 0 alone on the others: all get 0),
    while the divisor still counts it. A group whose combined reward is constant (up to rounding: `TIE`, as pair
    mining reads a tie) becomes all zeros.

    Note: within one prompt group (one domain) this is an affine map, so with `scale_rewards="group"` the advantages
    would be unchanged; `UPOConfig` therefore turns GRPO's group scaling off when it is used (the group's std becomes
    its domain's std). It also sets the units of the margin UPO mines pairs against.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(rows, funcs)`): rewards per function, NaN where not applicable.
        weights (`torch.Tensor` of shape `(funcs,)`): reward weights.
        groups (`list`): group key per row (e.g. the domain), same length as `rows`.
    """
    import torch

    combined = weighted_sum(rewards_per_func, weights)
    normalized = rewards_per_func.clone()
    for key in dict.fromkeys(groups):  # first-seen order: deterministic
        rows = torch.tensor([g == key for g in groups], device=rewards_per_func.device)
        scored = combined[rows & ~torch.isnan(combined)]
        if scored.numel() == 0:
            continue
        if scored.max() - scored.min() <= TIE:  # constant up to rounding, which dividing by `eps` would make a gap
            normalized[rows] = rewards_per_func[rows] * 0.0  # zeros; NaN (not applicable) stays NaN
            continue
        std = scored.std(unbiased=False)
        normalized[rows] = (rewards_per_func[rows] - torch.nanmean(rewards_per_func[rows], dim=0)) / (std + eps)
    return normalized
