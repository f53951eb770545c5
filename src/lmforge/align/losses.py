"""The loss math of preference learning and RL fine-tuning, as pure functions on tensors.

Nothing here touches a model: each function takes log-probabilities, scores, values or rewards and
returns a loss (and the numbers worth logging). The trainers in ``rm.py``, ``dpo.py``, ``ppo.py``
and ``grpo.py`` call these; ``tests/align/test_losses.py`` checks them against TRL's formulas.

Shapes: B sequences (pairs, rollouts), R response tokens; ``mask`` (B, R) is 1 on real response
tokens and 0 on padding.

    reward model   -log σ(r_chosen - r_rejected)                               (Bradley–Terry)
    DPO            -log σ(β Δ),  Δ = (log π/π_ref)(chosen) - (log π/π_ref)(rejected)
    IPO            (Δ̄ - 1/(2β))², Δ̄ the same difference averaged per response token
    hinge          max(0, 1 - β Δ)
    PPO            per-token reward = -β_KL·(log π - log π_ref), + score on the last token;
                   GAE: δ_t = r_t + γ V_{t+1} - V_t,  A_t = δ_t + γλ A_{t+1},  returns = A + V;
                   policy loss  max(-A·ρ, -A·clip(ρ, 1±ε)), ρ = π/π_old;
                   value loss   ½ max((V - R)², (clip(V, V_old ± ε_v) - R)²)
    GRPO           A_i = (r_i - mean(group)) / (std(group) + 1e-4), one advantage per completion
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k3", "abs", "mse")


# --- masked statistics -----------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions (Bessel-corrected by default)."""
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions (keeping the mean when ``shift_mean`` is off).
    ``all_sum`` (a tensor -> its sum over processes) takes the statistics over every process's rows,
    as if they were one batch."""
    if all_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        mask = mask.to(x.dtype)
        n = all_sum(mask.sum())
        mean = all_sum((x * mask).sum()) / n
        var = all_sum((((x - mean) ** 2) * mask).sum()) / n * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


# --- reward model ----------------------------------------------------------------------------------
def reward_model_loss(
    chosen: torch.Tensor,  # (B,) scalar scores of the preferred responses
    rejected: torch.Tensor,  # (B,)
    margin: torch.Tensor | None = None,  # (B,) optional: chosen must beat rejected by this much
    center_coef: float | None = None,  # optional: pulls the scores' scale towards zero
) -> torch.Tensor:
    """Bradley–Terry: the negative log-likelihood that the chosen response wins, P = σ(r_c - r_r)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef is not None:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


# --- DPO and its variants --------------------------------------------------------------------------
def dpo_loss(
    chosen_logps: torch.Tensor,  # (B,) log π(chosen | prompt), summed over the response tokens
    rejected_logps: torch.Tensor,  # (B,)
    ref_chosen_logps: torch.Tensor,  # (B,) the same under the frozen reference
    ref_rejected_logps: torch.Tensor,  # (B,)
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,  # (B,) response tokens; IPO averages per token
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards β·log(π/π_ref) of chosen and rejected (B,) each.

    sigmoid  DPO (Rafailov et al. 2023): -log σ(β Δ)
    ipo      IPO (Azar et al. 2023): (Δ̄ - 1/(2β))², the log-ratios averaged per response token
    hinge    SLiC-style: max(0, 1 - β Δ)
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the IPO loss averages per token: pass chosen_lengths and rejected_lengths.")
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}.")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# --- KL to the reference -----------------------------------------------------------------------------
def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the log-probs of the sampled tokens (B, R).

    k1   log π - log π_ref                         (unbiased, can be negative; PPO's reward penalty)
    k3   exp(log π_ref - log π) - (log π_ref - log π) - 1   (unbiased, always >= 0; GRPO's loss term)
    abs  |log π - log π_ref|;  mse  ½ (log π - log π_ref)²
    """
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "k3":
        return torch.exp(-diff) + diff - 1
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}.")


class KLController:
    """The coefficient β of the KL penalty: fixed, or adapted towards a target KL (Ziegler et al. 2019).

    Adaptive: after each batch of ``n_steps`` samples with measured KL ``current``,
    β ← β · (1 + clip(current/target - 1, -0.2, 0.2) · n_steps / horizon).
    """

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = float(init_coef), target, horizon

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, current: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def token_rewards(
    scores: torch.Tensor,  # (B,) one score per response (reward model, function, endpoint)
    logprobs: torch.Tensor,  # (B, R) under the policy that sampled them
    ref_logprobs: torch.Tensor,  # (B, R) under the frozen reference
    mask: torch.Tensor,  # (B, R)
    kl_coef: float,
    kl_kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token rewards (B, R): -β·KL at every token, plus the score on the last real token.
    Also returns the per-token KL (B, R)."""
    kl = kl_penalty(logprobs, ref_logprobs, kl_kind) * mask
    rewards = -kl_coef * kl
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token of each row
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return rewards, kl


# --- PPO -------------------------------------------------------------------------------------------
def gae(
    rewards: torch.Tensor,  # (B, R)
    values: torch.Tensor,  # (B, R) V(s_t) from the value head at rollout time
    mask: torch.Tensor,  # (B, R)
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): advantages and returns (B, R).

    Past the end of a response values and rewards are 0, so the recursion starts cleanly at
    each row's last real token. Advantages are raw here; PPO whitens them per batch.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    R = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv, adv + values


def policy_loss(
    logprobs: torch.Tensor,  # (B, R) under the policy being trained
    old_logprobs: torch.Tensor,  # (B, R) under the policy that sampled (fixed for the PPO epochs)
    advantages: torch.Tensor,  # (B, R), or (B, 1) for one advantage per sequence
    mask: torch.Tensor,  # (B, R)
    clip: float = 0.2,
    clip_high: float | None = None,  # asymmetric clipping (DAPO); None: the same as ``clip``
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per token (B, R), and whether each token was clipped (B, R).

    loss = max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) with ρ = exp(log π - log π_old): the pessimistic bound,
    so one update cannot move a token's probability far from where the rollout saw it.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + high)
    return torch.max(unclipped, clipped), (clipped > unclipped).to(ratio.dtype) * mask


def value_loss(
    values: torch.Tensor,  # (B, R) current value-head predictions
    old_values: torch.Tensor,  # (B, R) predictions at rollout time
    returns: torch.Tensor,  # (B, R) GAE returns
    mask: torch.Tensor,  # (B, R)
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ½·max((V - R)², (clip(V, V_old ± ε) - R)²) averaged over real tokens, and
    the fraction of tokens where the clipped term was the larger."""
    clipped = torch.max(torch.min(values, old_values + clip), old_values - clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(a, b), mask), masked_mean((b > a).to(values.dtype), mask)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each categorical distribution over the last dim (B, R, V) -> (B, R)."""
    return torch.logsumexp(logits, -1) - (F.softmax(logits, -1) * logits).sum(-1)


# --- GRPO ------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each completion's reward minus its group's mean, over the group's
    standard deviation (B,). Rows are grouped consecutively: rows g*G .. g*G+G-1 share a prompt.

    scale="group" divides by the group's std, "batch" by the whole batch's, "none" not at all
    (Dr. GRPO). A group whose rewards are all equal gets advantages of 0: it teaches nothing.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}.")
    grouped = rewards.view(-1, group_size)  # (n_prompts, G)
    mean = grouped.mean(1, keepdim=True)
    adv = (grouped - mean).view(-1)
    if scale == "group":
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = adv / (std.expand_as(grouped).reshape(-1) + eps)
    elif scale == "batch":
        adv = adv / ((rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())) + eps)
    elif scale != "none":
        raise ValueError(f"unknown advantage scale {scale!r}; choose group, batch or none.")
    return adv


def grpo_loss(
    logprobs: torch.Tensor,  # (B, R) under the policy being trained
    old_logprobs: torch.Tensor,  # (B, R) at sampling time
    ref_logprobs: torch.Tensor | None,  # (B, R) under the reference; None when beta = 0
    advantages: torch.Tensor,  # (B,) one per completion
    mask: torch.Tensor,  # (B, R)
    *,
    beta: float = 0.04,
    clip: float = 0.2,
    clip_high: float | None = None,
    normalize: str = "sequence",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective: PPO's clipped surrogate with one advantage per completion, plus β·k3-KL to
    the reference inside the loss (not in the reward). Returns the scalar loss and its parts.

    normalize="sequence" averages tokens within each completion, then completions (GRPO);
    "token" averages over all tokens of the batch together (BNPO/DAPO-style).
    """
    per_token, clipped = policy_loss(logprobs, old_logprobs, advantages[:, None], mask, clip, clip_high)
    kl = None
    if beta != 0.0:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
    mask = mask.to(per_token.dtype)
    if normalize == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif normalize == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        raise ValueError(f"unknown GRPO normalize {normalize!r}; choose sequence or token.")
    stats = {"clip_fraction": masked_mean(clipped, mask)}
    if kl is not None:
        stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats
