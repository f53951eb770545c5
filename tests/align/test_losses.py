"""lmforge.align.losses equals TRL's formulas on identical tensors.

Where the installed TRL (1.x) has the formula, it is called: DPO / IPO / hinge through
``DPOTrainer._compute_loss``, the Bradley–Terry loss through ``RewardTrainer.compute_loss`` and the
GRPO loss through ``GRPOTrainer._compute_loss``, each on a minimal stand-in ``self`` (plain
attributes, a fake model that returns the tensors, an identity accelerator). GRPO's group-normalised
advantages live inside TRL's 1,000-line ``_generate_and_score_completions``; there we compare to
its exact expression, built on TRL's own ``nanstd``. PPO is no longer in TRL 1.x, so GAE, the
per-token KL reward, the adaptive KL controller and the clipped policy/value losses are compared
with trl 0.11.4's ``PPOTrainer`` methods and ``AdaptiveKLController`` (see ``legacy_trl.py``).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.align import losses as L

trl = pytest.importorskip("trl")


class _Accelerator:
    device = torch.device("cpu")
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _stand_in(**attrs) -> SimpleNamespace:
    """The attributes a TRL trainer method reads, and nothing else."""
    base = dict(accelerator=_Accelerator(), model=SimpleNamespace(training=True),
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)  # fmt: skip
    return SimpleNamespace(**base, **attrs)


def _pairs(B=5, R=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    per_token = -torch.rand(2 * B, R, generator=g) * 3  # policy log-probs (chosen rows then rejected rows)
    ref = -torch.rand(2 * B, R, generator=g) * 3
    lengths = torch.randint(2, R + 1, (2 * B,), generator=g)
    mask = (torch.arange(R)[None] < lengths[:, None]).long()
    return per_token * mask, ref * mask, mask


# --- DPO -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(loss_type):
    from trl.trainer.dpo_trainer import DPOTrainer

    per_token, ref_per_token, mask = _pairs()
    B = mask.shape[0] // 2
    beta = 0.3
    # TRL's batch: completion_mask is over input_ids, log-probs over the shifted positions
    completion_mask = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), mask], 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(mask, dtype=torch.bool))  # fmt: skip
    ref = ref_per_token.sum(1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}  # fmt: skip
    me = _stand_in(aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                   loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False)  # fmt: skip
    theirs = DPOTrainer._compute_loss(me, lambda **kw: outputs, inputs, return_outputs=False)

    logps = per_token.sum(1)
    lengths = mask.sum(1)
    losses, chosen_r, rejected_r = L.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type,
                                              chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])  # fmt: skip
    torch.testing.assert_close(losses.mean(), theirs)
    m = me._metrics["train"]
    assert m["rewards/margins"][0] == pytest.approx((chosen_r - rejected_r).mean().item(), rel=1e-6)
    assert m["rewards/accuracies"][0] == pytest.approx((chosen_r > rejected_r).float().mean().item())


def test_dpo_rejects_unknown_loss_type():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge"):
        L.dpo_loss(x, x, x, x, loss_type="kto")


# --- reward model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("margin,center", [(False, None), (True, 0.01)])
def test_reward_model_loss_matches_trl(margin, center):
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(12, 1, generator=g) * 2  # chosen rows then rejected rows, as TRL batches them
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long), "attention_mask": torch.ones(12, 3, dtype=torch.long)}
    if margin:
        inputs["margin"] = torch.rand(6, generator=g)
    me = _stand_in(args=SimpleNamespace(center_rewards_coefficient=center))
    theirs = RewardTrainer.compute_loss(me, lambda **kw: SimpleNamespace(logits=scores), dict(inputs))
    ours = L.reward_model_loss(scores[:6, 0], scores[6:, 0], margin=inputs.get("margin"), center_coef=center)
    torch.testing.assert_close(ours, theirs)


# --- GRPO ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_expression(scale):
    from trl.trainer.utils import nanstd

    G = 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, -1.0, 3.0, 0.0])
    # GRPOTrainer._generate_and_score_completions, multi_objective_aggregation="sum_then_normalize"
    mean_grouped = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    theirs = rewards - mean_grouped
    if scale != "none":
        theirs = theirs / (std + 1e-4)
    ours = L.group_advantages(rewards, G, scale=scale)
    torch.testing.assert_close(ours, theirs)
    assert ours[4:8].abs().max() == 0  # a group with equal rewards teaches nothing


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.04), ("bnpo", 0.1), ("grpo", 0.0)])
def test_grpo_loss_matches_trl(loss_type, beta):
    from trl.trainer.grpo_trainer import GRPOTrainer

    g = torch.Generator().manual_seed(2)
    B, R = 6, 5
    logps = -torch.rand(B, R, generator=g) * 2
    old = logps + torch.randn(B, R, generator=g) * 0.3  # ratios well outside 1 ± 0.2: clipping matters
    ref = logps + torch.randn(B, R, generator=g) * 0.5
    adv = torch.randn(B, generator=g)
    mask = (torch.arange(R)[None] < torch.tensor([5, 3, 4, 1, 5, 2])[:, None]).long()
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, R, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}  # fmt: skip
    me = _stand_in(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, current_gradient_accumulation_steps=1,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
    )  # fmt: skip
    theirs = GRPOTrainer._compute_loss(me, None, inputs)
    ours, stats = L.grpo_loss(logps, old, ref, adv, mask, beta=beta, clip=0.2, clip_high=0.28,
                              normalize="sequence" if loss_type == "grpo" else "token")  # fmt: skip
    torch.testing.assert_close(ours, theirs)
    assert stats["clip_fraction"].item() == pytest.approx(me._metrics["train"]["clip_ratio/region_mean"][0], rel=1e-6)
    if beta:
        assert stats["kl"].item() == pytest.approx(me._metrics["train"]["kl"][0], rel=1e-6)


# --- PPO (against trl 0.11.4, the last TRL with a PPO trainer) ---------------------------------------
@pytest.fixture(scope="module")
def old_trl():
    from legacy_trl import load

    return load()


def _rollout(B=4, R=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(R)[None] < torch.tensor([6, 4, 1, 5])[:B, None]).float()
    return (torch.randn(B, generator=g), -torch.rand(B, R, generator=g) * 2, -torch.rand(B, R, generator=g) * 2,
            torch.randn(B, R, generator=g), mask)  # fmt: skip


@pytest.mark.parametrize("kind,trl_kind", [("k1", "kl"), ("abs", "abs"), ("mse", "mse")])
def test_token_rewards_and_kl_match_trl(old_trl, kind, trl_kind):
    scores, logps, ref, _, mask = _rollout()
    me = SimpleNamespace(config=SimpleNamespace(kl_penalty=trl_kind), kl_ctl=SimpleNamespace(value=0.07))
    me._kl_penalty = lambda a, b: old_trl._kl_penalty(me, a, b)
    rewards, _, kls = old_trl.compute_rewards(me, scores, logps * mask, ref * mask, mask)
    ours, kl = L.token_rewards(scores, logps * mask, ref * mask, mask, kl_coef=0.07, kl_kind=kind)
    torch.testing.assert_close(ours, rewards)
    torch.testing.assert_close(kl, kls * mask)


def test_k3_is_grpo_expression_and_non_negative():
    logps, ref = -torch.rand(3, 4) * 3, -torch.rand(3, 4) * 3
    k3 = L.kl_penalty(logps, ref, "k3")
    torch.testing.assert_close(k3, torch.exp(ref - logps) - (ref - logps) - 1)
    assert (k3 >= 0).all()


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_trl(old_trl, gamma, lam):
    _, _, _, values, mask = _rollout()
    rewards = torch.randn_like(values)
    me = SimpleNamespace(config=SimpleNamespace(gamma=gamma, lam=lam, whiten_rewards=False))
    t_values, t_adv, t_returns = old_trl.compute_advantages(me, values, rewards, mask)
    adv, returns = L.gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(returns, t_returns)
    torch.testing.assert_close(L.whiten(adv, mask), t_adv)  # TRL whitens inside; our PPO does it per batch
    torch.testing.assert_close(L.masked_var(values, mask), old_trl.masked_var(values, mask))


def test_clipped_policy_and_value_losses_match_trl(old_trl):
    _, old_logps, _, old_values, mask = _rollout()
    g = torch.Generator().manual_seed(4)
    logps = old_logps + torch.randn(old_logps.shape, generator=g) * 0.4
    vpreds = old_values + torch.randn(old_values.shape, generator=g) * 0.5
    adv, returns = torch.randn(old_logps.shape, generator=g), torch.randn(old_logps.shape, generator=g)
    logits = torch.randn(*old_logps.shape, 11, generator=g)
    cfg = SimpleNamespace(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, ratio_threshold=1e9)
    pg, vf_scaled, stats = old_trl.loss(SimpleNamespace(config=cfg), old_logps, old_values, logits, vpreds, logps, mask, adv, returns)

    per_token, clipped = L.policy_loss(logps, old_logps, adv, mask, clip=0.2)
    torch.testing.assert_close(L.masked_mean(per_token, mask), pg)
    torch.testing.assert_close(L.masked_mean(clipped, mask), stats["policy"]["clipfrac"])
    vf, vf_clip = L.value_loss(vpreds, old_values, returns, mask, clip=0.2)
    torch.testing.assert_close(0.1 * vf, vf_scaled)
    torch.testing.assert_close(vf_clip, stats["val"]["clipfrac"])
    torch.testing.assert_close(L.masked_mean(L.entropy(logits), mask), stats["policy"]["entropy"])
    assert 0 < L.masked_mean(clipped, mask) < 1  # both branches were exercised


@pytest.mark.parametrize("kl", [0.01, 0.3, 5.0])
def test_adaptive_kl_controller_matches_trl(old_trl, kl):
    theirs, ours = old_trl.AdaptiveKLController(0.2, 0.1, 1000), L.KLController(0.2, target=0.1, horizon=1000)
    for n in (8, 16, 8):
        theirs.update(kl, n)
        ours.update(kl, n)
        assert ours.value == pytest.approx(theirs.value, rel=1e-12)
    fixed = L.KLController(0.2)
    fixed.update(kl, 100)
    assert fixed.value == 0.2 and not fixed.adaptive
