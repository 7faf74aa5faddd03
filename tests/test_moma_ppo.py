"""moma_ppo.py: GAE recursion, QMIX mixing, padding maps, rollout masks, and learning on the coordination game."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import envs
from conftest import random_episodes
import moma_ppo
import world_model


def test_gae_against_hand_computed_values():
    # Two rollouts of k = 3. Rollout 0 runs to the horizon (ζ = 0 at the last step); rollout 1 hits a
    # terminal at step 1 (f = 0) and its step 2 is garbage that must not leak into steps 0-1.
    gamma, lam = 0.9, 0.5
    r = torch.tensor([[1.0, 2.0], [0.5, 1.0], [2.0, 100.0]])
    v = torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.6, 0.7], [1.5, 9.0]])  # V(s_0..s_3)
    f = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    zeta = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    adv, ret = moma_ppo.compute_gae(r, v, f, zeta, gamma, lam)
    # rollout 0, by hand
    d2 = 2.0 + 0.9 * 1.5 - 0.6  # bootstrap from V(s_3) at the timeout
    d1 = 0.5 + 0.9 * 0.6 - 0.2
    d0 = 1.0 + 0.9 * 0.2 - 0.3
    a2, a1 = d2, d1 + 0.9 * 0.5 * d2
    a0 = d0 + 0.9 * 0.5 * a1
    # rollout 1: terminal at step 1, so A_1 = r_1 - V(s_1) and nothing from step 2
    b1 = 1.0 - 0.4
    b0 = (2.0 + 0.9 * 0.4 - 0.1) + 0.9 * 0.5 * b1
    np.testing.assert_allclose(adv[:, 0].numpy(), [a0, a1, a2], rtol=1e-6)
    np.testing.assert_allclose(adv[:2, 1].numpy(), [b0, b1], rtol=1e-6)
    np.testing.assert_allclose(ret.numpy(), (adv + v[:-1]).numpy(), rtol=1e-6)


def test_gae_timeout_by_uncertainty_cuts_accumulation():
    r = torch.ones(3, 1)
    v = torch.zeros(4, 1) + 0.5
    f = torch.ones(3, 1)
    zeta = torch.tensor([[1.0], [0.0], [0.0]])  # uncertainty cut at step 1
    adv, _ = moma_ppo.compute_gae(r, v, f, zeta, 1.0, 1.0)
    assert adv[1, 0] == pytest.approx(1.0 + 0.5 - 0.5)  # bootstraps V(s_2), ignores A_2
    assert adv[0, 0] == pytest.approx((1.0 + 0.5 - 0.5) + adv[1, 0])


def test_gae_non_finite_garbage_never_leaks():
    """After a terminal, the model's next state may diverge (no clipping): inf/NaN rewards and values on garbage
    steps must not reach the valid ones (0 * inf = NaN with multiplicative masks)."""
    r = torch.tensor([[1.0], [1.0], [float("nan")]])
    v = torch.tensor([[0.5], [0.5], [float("inf")], [float("nan")]])  # V(s_2) of a diverged terminal state
    f = torch.tensor([[1.0], [0.0], [1.0]])  # terminal at step 1
    zeta = torch.tensor([[1.0], [1.0], [0.0]])
    adv, ret = moma_ppo.compute_gae(r, v, f, zeta, 0.9, 0.95)
    assert torch.isfinite(adv[:2]).all() and torch.isfinite(ret[:2]).all()
    assert adv[1, 0] == pytest.approx(1.0 - 0.5)  # A_1 = r_1 - V(s_1) at the terminal
    assert adv[0, 0] == pytest.approx((1.0 + 0.9 * 0.5 - 0.5) + 0.9 * 0.95 * 0.5)


class DivergingModel:
    """Predicts an infinite next state (and so a terminal, by the termination rule) for rollout 0 at its first step."""

    def step(self, states, joint_actions, clip=True, generator=None, termination_rule=True, eps_g_units="raw"):
        b = states.shape[0]
        nxt = states + 0.01
        nxt[0] = float("inf")
        terminal = torch.zeros(b)
        terminal[0] = 1.0
        return {"next_states": nxt, "rewards": torch.ones(b), "terminals": terminal, "eps_r": torch.zeros(b),
                "eps_g": torch.zeros(b), "aleatoric": torch.zeros(b)}


def test_rollouts_stay_finite_after_a_diverged_terminal():
    torch.manual_seed(0)
    layout, agents = _agents()
    states = torch.randn(50, 27)
    table = torch.randn(4, 51, layout.history_dim)
    index = torch.randint(0, 51, (50, 10))
    batch, stats, _ = moma_ppo.collect_rollouts(agents, DivergingModel(), layout, states, table, index,
                                             _args(clip_to_dataset=False), torch.Generator().manual_seed(0))
    assert len(batch["returns"]) == 1 + 7 * 4  # rollout 0 ends at its first step, the others run k = 4
    for key in ("advantages", "returns", "value_targets", "logp", "obs", "states"):
        assert torch.isfinite(batch[key]).all(), key


def _agents(env="ant", obs="partial", use_history=True, actor_std="parameter"):
    layout = moma_ppo.Layout(env, obs, torch.device("cpu"))
    n, S = layout.n, envs.STATE_DIM[env]
    return layout, moma_ppo.Agents(
        n, layout.obs_dim, layout.action_dim, layout.discrete, S, 32, use_history, layout.history_dim, 16, -0.5,
        torch.zeros(n, 1, layout.obs_dim), torch.ones(n, 1, layout.obs_dim), torch.zeros(S), torch.ones(S),
        actor_std=actor_std)


def test_the_authors_state_dependent_std_starts_at_one_and_is_clamped():
    torch.manual_seed(0)
    layout, agents = _agents(actor_std="state")
    assert agents.log_std is None
    feats = agents.features(torch.randn(4, 64, layout.obs_dim), torch.randn(4, 64, 10, layout.history_dim))
    dist = agents.distribution(feats)
    assert dist.mean.shape == (4, 64, 2) and torch.allclose(dist.stddev, torch.ones(()), atol=0.05)  # log σ ≈ 0
    with torch.no_grad():
        agents.actor[-1].bias[..., 2:] = 5.0  # log σ head far above its upper clamp
    assert torch.allclose(agents.distribution(feats).stddev, torch.ones(()))
    with torch.no_grad():
        agents.actor[-1].bias[..., 2:] = -50.0
    assert torch.allclose(agents.distribution(feats).stddev, torch.full((), float(np.exp(-6.0))))
    # greedy takes the mean half of the output only
    torch.testing.assert_close(agents.greedy(feats), agents.distribution(feats).mean.clamp(-1, 1))


def test_mixer_is_monotonic_in_every_agent_value():
    torch.manual_seed(0)
    layout, agents = _agents("ant", "full", use_history=False)
    feats = torch.randn(4, 64, layout.obs_dim)
    states = torch.randn(64, 27)
    mix = agents.mixer(states)
    agent_values = agents.critic(feats).squeeze(-1)
    v = agents.team_value(feats, states)
    np.testing.assert_allclose(v.detach(), ((mix[:, :4].abs() * agent_values.T).sum(-1) + mix[:, 4]).detach(),
                               rtol=1e-5)
    # dV/dV_i = w_i(s) >= 0: raising any agent's value never lowers the team value
    grads = torch.autograd.grad(v.sum(), agents.critic[-1].bias)[0]
    assert grads.shape == (4, 1, 1) and (grads >= 0).all() and (grads > 0).any()


def test_padding_maps_match_envs():
    layout = moma_ppo.Layout("ant", "partial", torch.device("cpu"))
    states = torch.randn(5, 27)
    obs = layout.observe(states)
    assert obs.shape == (4, 5, 15)
    for i, o in enumerate(envs.split_state("ant", "partial", states)):
        np.testing.assert_array_equal(obs[i, :, : o.shape[1]], o)
        assert (obs[i, :, o.shape[1]:] == 0).all()
    actions = torch.randn(4, 5, 2)
    joint = layout.joint(actions)
    for i, a in enumerate(envs.split_actions("ant", joint)):
        np.testing.assert_array_equal(a, actions[i])


class FakeModel:
    """A test double of world_model.WorldModel.step: constant reward 1, ε_g rising by 1 per step."""

    def __init__(self):
        self.calls = 0

    def step(self, states, joint_actions, clip=True, generator=None, termination_rule=True, eps_g_units="raw"):
        self.calls += 1
        self.termination_rule = termination_rule
        b = states.shape[0]
        eps_g = torch.full((b,), float(self.calls))
        eps_g[::2] = 0.0  # even rollouts: no uncertainty
        terminal = torch.zeros(b)
        terminal[1::4] = float(self.calls == 2)  # rollouts 1, 5, ... hit a terminal at their 2nd step
        return {"next_states": states + 0.01, "rewards": torch.ones(b), "terminals": terminal,
                "eps_r": torch.full((b,), 0.5), "eps_g": eps_g, "aleatoric": torch.full((b,), 3.0)}


def _args(**kw):
    base = dict(env="ant", obs="partial", dataset="random", rollout_horizon=4, rollout_batch=8, lambda_r=0.1,
                lambda_g=0.2, uncertainty_threshold=2.5, use_history=True, terminal_height_margin=0.0)
    base.update(kw)
    return moma_ppo.resolve(moma_ppo.Args(**base))


def test_rollouts_penalty_timeouts_and_terminals():
    torch.manual_seed(0)
    layout, agents = _agents()
    states = torch.randn(50, 27)
    table = torch.randn(4, 51, layout.history_dim)
    index = torch.randint(0, 51, (50, 10))
    args = _args()
    batch, stats, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, args,
                                             torch.Generator().manual_seed(0))
    # Per step: even rollouts never time out early (length 4); odd rollouts have ε_g = 1, 2, 3 ≥ 2.5 at step 3
    # (cut after it, length 3), except rollouts 1 and 5, terminal at step 2 (length 2).
    lengths = {0: 4, 1: 2, 2: 4, 3: 3, 4: 4, 5: 2, 6: 4, 7: 3}
    assert len(batch["returns"]) == sum(lengths.values())
    assert stats["mean_length"] == pytest.approx(sum(lengths.values()) / 8)
    # Reward r~ = 1 - 0.1 min(0.5, 2.5) - 0.2 min(ε_g, 2.5): penalty capped at l_ε, timeout on the unclamped ε_g
    assert stats["penalised_reward"] == pytest.approx(
        np.mean([1 - 0.05 - 0.2 * (0 if r % 2 == 0 else min(j + 1, 2.5)) for r, n in lengths.items()
                 for j in range(n)]), rel=1e-5)
    assert batch["hist"].shape == (4, len(batch["returns"]), 10, layout.history_dim)
    # The aleatoric ablation uses MOPO's max-variance norm instead
    aleatoric = _args(penalty="aleatoric", lambda_aleatoric=0.5)
    _, stats, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, aleatoric,
                                         torch.Generator().manual_seed(0))
    assert stats["penalised_reward"] == pytest.approx(1 - 0.5 * 2.5)
    assert stats["timeouts_by_uncertainty"] == pytest.approx(2 / 8) and stats["terminals"] == pytest.approx(2 / 8)
    # --uncertainty-cut terminal: the same rollouts end at the same steps, but the cut step does not bootstrap
    # (its target is its own reward, as at a predicted terminal) where the timeout bootstraps from V(s')
    for cut in ("timeout", "terminal"):
        batch, stats, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index,
                                                 _args(uncertainty_cut=cut), torch.Generator().manual_seed(0))
        assert len(batch["returns"]) == sum(lengths.values())
        assert stats["timeouts_by_uncertainty"] == pytest.approx(2 / 8) and stats["terminals"] == pytest.approx(2 / 8)
        valid = torch.tensor([[j < lengths[r] for r in range(8)] for j in range(4)]).reshape(-1)
        position = int(valid[: 2 * 8 + 3].sum())  # rollout 3's step 2 (0-based), where ε_g = 3 >= 2.5 cuts it
        cut_reward = 1 - 0.05 - 0.2 * 2.5
        if cut == "terminal":
            assert batch["returns"][position].item() == pytest.approx(cut_reward, rel=1e-5)
        else:
            assert batch["returns"][position].item() != pytest.approx(cut_reward, rel=1e-3)
    # Without adaptive rollouts only the horizon and terminals end rollouts
    fixed = _args(adaptive_rollout=False)
    batch, _, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, fixed,
                                         torch.Generator().manual_seed(0))
    assert len(batch["returns"]) == 6 * 4 + 2 * 2
    # --no-termination-rule reaches the world model (the paper's learned terminal head alone)
    for rule in (True, False):
        model = FakeModel()
        moma_ppo.collect_rollouts(agents, model, layout, states, table, index, _args(termination_rule=rule),
                                  torch.Generator().manual_seed(0))
        assert model.termination_rule is rule


def test_continued_rollouts_start_where_the_last_survivors_stopped():
    """--continue-rollouts p: a share p of the next rollouts starts from the states (and histories) where the last
    iteration's rollouts reached the horizon alive; cut or ended rollouts never carry on; p = 0 draws the same
    dataset starts as the paper's sampler, pool or not."""
    torch.manual_seed(0)
    layout, agents = _agents()
    states = torch.randn(50, 27)
    table = torch.randn(4, 51, layout.history_dim)
    index = torch.randint(0, 51, (50, 10))
    args = _args(continue_rollouts=0.5)
    batch, stats, pool = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, args,
                                                   torch.Generator().manual_seed(0))
    # FakeModel: the even rollouts run the 4 steps (ε_g = 0, no terminal); the odd ones are cut or end
    assert stats["continued"] == 0.0 and stats["start_age"] == 0.0  # nothing to continue from yet
    starts = batch["states"][:8]  # step 0 of the 8 rollouts (every rollout is valid at its first step)
    assert torch.allclose(pool["states"], starts[::2] + 4 * 0.01)  # FakeModel moves a state by 0.01 per step
    assert torch.equal(pool["age"], torch.full((4,), 4.0)) and pool["hist"].shape == (4, 4, 10, layout.history_dim)
    batch2, stats2, pool2 = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, args,
                                                      torch.Generator().manual_seed(1), pool=pool)
    assert stats2["continued"] == 0.5 and stats2["start_age"] == pytest.approx(4 * 4 / 8)
    continued = batch2["states"][:4]  # the continued rollouts come first, in a random order of the pool
    order = [int(torch.nonzero((pool["states"] == s).all(1))[0]) for s in continued]
    assert sorted(order) == [0, 1, 2, 3]
    assert torch.equal(batch2["hist"][:, :4], pool["hist"][:, order])
    assert torch.equal(pool2["age"], torch.tensor([8.0, 8.0, 4.0, 4.0]))  # rollouts 0 and 2 were continued ones
    # p = 0: the dataset starts of the paper's sampler, whatever the pool holds
    paper = _args()
    torch.manual_seed(5)  # the policies sample from torch's global generator
    a, _, none = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, paper,
                                           torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    b, _, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, paper,
                                        torch.Generator().manual_seed(2), pool=pool)
    # (the returns differ: each call moves the agents' return normaliser)
    assert none is None and torch.equal(a["states"], b["states"]) and torch.equal(a["actions"], b["actions"])


def test_terminal_height_margin_ends_rollouts_near_the_top_of_the_healthy_range():
    """--terminal-height-margin m: a predicted torso height above 1.0 - m ends the rollout as a terminal (no
    bootstrap); below it, the env's own rule (FakeModel moves every state by +0.01 per step)."""
    torch.manual_seed(0)
    layout, agents = _agents()
    table = torch.randn(4, 51, layout.history_dim)
    index = torch.randint(0, 51, (50, 10))
    states = torch.randn(50, 27)
    states[:, 0] = 0.885  # z after 1 step 0.895, after 2 steps 0.905
    batch, stats, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index,
                                                _args(terminal_height_margin=0.1), torch.Generator().manual_seed(0))
    assert len(batch["returns"]) == 2 * 8 and stats["terminals"] == 1.0  # every rollout ends at its 2nd step
    # the 2nd step's target is its own reward: nothing is bootstrapped after a terminal
    assert batch["returns"][8:].tolist() == pytest.approx([1 - 0.05 - 0.2 * (0 if r % 2 == 0 else 2) for r in range(8)],
                                                          rel=1e-5)
    batch, stats, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, _args(),
                                                torch.Generator().manual_seed(0))
    assert len(batch["returns"]) == 4 + 2 + 4 + 3 + 4 + 2 + 4 + 3  # without it: the lengths of the test above
    with pytest.raises(envs.MomaError, match="no such rule"):
        moma_ppo.main(moma_ppo.Args(env="reacher", terminal_height_margin=0.1))


def test_terminal_height_margin_is_ants_preset_and_named_where_a_run_departs_from_it():
    """Ant's preset has the 0.1 margin (docs/diagnosis.md point 24); the other envs have no height rule; the real
    simulator needs no correction of its heights, so --ground-truth runs without it and its name does not say so."""
    resolve = lambda **kw: moma_ppo.resolve(moma_ppo.Args(**kw))  # noqa: E731
    assert resolve(env="ant", obs="partial").terminal_height_margin == 0.1
    assert resolve(env="ant", obs="full", dataset="full-replay").terminal_height_margin == 0.1
    assert resolve(env="reacher").terminal_height_margin == 0.0 and resolve(env="coordination").terminal_height_margin == 0
    assert moma_ppo.method_name(resolve(env="ant", obs="partial")) == "moma_ppo"
    assert moma_ppo.method_name(resolve(env="ant", terminal_height_margin=0.0)) == "moma_ppo-terminal_height_margin=0"
    assert moma_ppo.method_name_from_argv(["--env", "ant", "--terminal-height-margin", "0.1"]) == "moma_ppo"
    truth = resolve(env="ant", ground_truth=True)
    assert truth.terminal_height_margin == 0.0 and moma_ppo.method_name(truth) == "moma_ppo-ground_truth"
    with pytest.raises(envs.MomaError, match="drop one"):
        moma_ppo.main(moma_ppo.Args(env="ant", ground_truth=True, terminal_height_margin=0.1))


def test_continued_rollouts_resume_as_if_never_stopped(monkeypatch, tmp_path):
    """The pool of survivors is part of the checkpoint: 2 iterations, then --resume to 3, give the weights of 3 in
    one go."""
    _random_dataset("ant", "random", n_episodes=4, steps=60)
    monkeypatch.setitem(world_model.PRESETS, "ant",
                        dict(hidden_dim=16, n_hidden_layers=1, max_steps=20, eval_every=10, lr_decays=2, patience=5))
    common = dict(env="ant", obs="partial", dataset="random", rollout_batch=16, rollout_horizon=3, minibatch_size=16,
                  hidden_dim=16, embed_dim=8, eval_every=5, eval_episodes_during=1, eval_episodes=1,
                  checkpoint_every=1, continue_rollouts=0.75, uncertainty_threshold=1e9)
    moma_ppo.main(moma_ppo.Args(iterations=3, run_dir=str(tmp_path / "straight"), **common))
    moma_ppo.main(moma_ppo.Args(iterations=2, run_dir=str(tmp_path / "resumed"), **common))
    assert len(torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["rollout_pool"]["states"]) > 0
    moma_ppo.main(moma_ppo.Args(iterations=3, run_dir=str(tmp_path / "resumed"), resume=True, **common))
    straight, resumed = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False) for r in ("straight", "resumed"))
    for key, value in straight["agents"].items():
        assert torch.equal(resumed["agents"][key], value), key
    with open(tmp_path / "straight" / "training.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["continued"]) == 0.0 and float(rows[2]["continued"]) > 0 and float(rows[2]["start_age"]) > 0


def test_value_range_is_the_discounted_reward_range_less_the_penalty_cap():
    rewards = np.array([-2.0, 0.5, 3.0], dtype=np.float32)
    # lowest: (-2 - 0.1 * 2.5 - 0.2 * 2.5) / (1 - 0.9) = -27.5; highest: 3 / (1 - 0.9) = 30
    assert moma_ppo.value_range(rewards, _args(gamma=0.9)) == pytest.approx((-27.5, 30.0))
    # MOPO's aleatoric penalty: λ_a l_ε = 0.5 * 2.5
    assert moma_ppo.value_range(rewards, _args(gamma=0.9, penalty="aleatoric", lambda_aleatoric=0.5)) == \
        pytest.approx((-32.5, 30.0))
    # no penalty (the coordination game's λ = 0, l_ε = inf): no inf * 0 = NaN
    assert moma_ppo.value_range(rewards, _args(gamma=0.9, lambda_r=0.0, lambda_g=0.0,
                                               uncertainty_threshold=float("inf"))) == pytest.approx((-20.0, 30.0))


def test_bounded_values_take_the_critic_out_of_the_returns_where_the_range_is_a_point():
    """With values bounded to [0, 0], every bootstrap is 0, so two critics give the same λ-returns (the rewards'
    own discounted sums); unbounded, they differ."""
    torch.manual_seed(0)
    layout, _ = _agents()
    states = torch.randn(50, 27)
    table = torch.randn(4, 51, layout.history_dim)
    index = torch.randint(0, 51, (50, 10))
    returns = {}
    for critic_seed in (0, 1):
        torch.manual_seed(critic_seed)
        layout, agents = _agents()
        for bounds in (None, (0.0, 0.0)):
            batch, _, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index, _args(),
                                                 torch.Generator().manual_seed(0), bounds)
            returns[critic_seed, bounds] = batch["returns"]
    assert torch.equal(returns[0, (0.0, 0.0)], returns[1, (0.0, 0.0)])
    assert not torch.allclose(returns[0, None], returns[1, None])
    # rollout 1 ends at a predicted terminal at step 2 (FakeModel): its first step's return is r + γ λ r
    # (λ-return over two steps with zero bootstraps: δ_0 = r, δ_1 = r, A_0 = δ_0 + γλ δ_1)
    r = 1 - 0.1 * 0.5 - 0.2 * 1.0  # step 1 of an odd rollout: ε_g = 1
    r2 = 1 - 0.1 * 0.5 - 0.2 * 2.0
    assert returns[0, (0.0, 0.0)][1].item() == pytest.approx(r + 0.99 * 0.95 * r2, rel=1e-5)


def test_anneal_lr_decays_the_learning_rate_linearly_to_zero(monkeypatch, tmp_path):
    monkeypatch.setitem(world_model.PRESETS, "coordination",
                        dict(hidden_dim=32, n_hidden_layers=2, max_steps=200, eval_every=200, lr_decays=2, patience=2))
    seen = []
    real_collect_rollouts = moma_ppo.collect_rollouts

    def collect_rollouts(agents, *rest, **kwargs):
        seen.append(optimizers[-1].param_groups[0]["lr"])
        return real_collect_rollouts(agents, *rest, **kwargs)

    optimizers = []
    real_adam = torch.optim.Adam

    def adam(*a, **kw):
        optimizers.append(real_adam(*a, **kw))
        return optimizers[-1]

    monkeypatch.setattr(moma_ppo, "collect_rollouts", collect_rollouts)
    monkeypatch.setattr(moma_ppo.torch.optim, "Adam", adam)
    args = moma_ppo.Args(env="coordination", dataset="unfavorable", seed=3, iterations=4, rollout_batch=256,
                         minibatch_size=256, eval_every=4, eval_episodes_during=2, eval_episodes=2,
                         learning_rate=1e-3, anneal_lr=True, run_dir=str(tmp_path / "run"))
    moma_ppo.main(args)
    assert seen == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    # a run that anneals is its own method in the tables (never filed in the preset's cell)
    assert moma_ppo.method_name(moma_ppo.resolve(moma_ppo.Args(env="ant", anneal_lr=True))) == "moma_ppo-anneal_lr=True"


def test_unknown_names_and_bad_flags_give_clear_errors():
    with pytest.raises(envs.MomaError, match="valid choices"):
        moma_ppo.resolve(moma_ppo.Args(env="ant", obs="leader-only"))
    with pytest.raises(envs.MomaError, match="--resume needs --run-dir"):
        moma_ppo.main(moma_ppo.Args(env="coordination", resume=True))


def _help(module) -> str:
    import contextlib
    import io

    import tyro

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(module.Args, args=["--help"])
    return " ".join(out.getvalue().replace("│", " ").split())  # the help box's borders and line breaks out


def test_help_shows_the_per_env_defaults_of_the_presets():
    text = _help(moma_ppo)
    assert "(default per env: coordination 1, reacher 10, ant 10)" in text  # k
    assert "(default per env: coordination 2048, reacher 1000, ant 2000)" in text  # b
    assert "(default per env: coordination inf, reacher 2, ant 2)" in text  # l_ε
    for key in moma_ppo.PRESETS["ant"]:  # every preset field shows its table's values, none shows None
        shown = ", ".join(f"{env} {p[key]:g}" if isinstance(p[key], float) else f"{env} {p[key]}"
                          for env, p in moma_ppo.PRESETS.items())
        assert f"(default per env: {shown})" in text, key
    assert moma_ppo.resolve(moma_ppo.Args(env="reacher")).rollout_batch == 1000


def test_trains_the_same_world_model_as_world_model_py(monkeypatch, tmp_path):
    """A missing world model is trained with the settings `python world_model.py --env X` uses (its PRESETS), not
    with settings of MOMA-PPO's own: the same artifact whichever script makes it."""
    import tyro

    asked = []

    def stop(args, device, progress=True):
        asked.append(args)
        raise KeyboardInterrupt  # nothing to train here: only the settings it would have used

    monkeypatch.setattr(world_model, "train_and_save", stop)
    with pytest.raises(KeyboardInterrupt):
        moma_ppo.main(moma_ppo.Args(env="coordination", dataset="neutral", world_model_seed=321,
                                    run_dir=str(tmp_path / "run")))
    cli = tyro.cli(world_model.Args, args=["--env", "coordination", "--dataset", "neutral", "--seed", "321"])
    free = ("torch_threads", "cuda", "force")  # how, not what, it trains
    same = lambda a: {k: v for k, v in dataclasses.asdict(world_model.resolve(a)).items() if k not in free}  # noqa: E731
    assert same(asked[0]) == same(cli)
    assert (same(cli)["hidden_dim"], same(cli)["n_hidden_layers"], same(cli)["max_steps"]) == (64, 2, 3000)


def test_solves_the_unfavorable_coordination_game(monkeypatch, tmp_path):
    # The paper's Table 3: MOMA-PPO coordinates on the dataset where the behaviour agents mostly disagree.
    # At the preset's 20 iterations: with 12 this seed scored 0.9 on an AMD EPYC and 1.0 on an Intel Xeon (the same
    # code; float summation order differs between the CPUs' kernels), so 12 was a budget that barely sufficed.
    monkeypatch.setitem(world_model.PRESETS, "coordination",
                        dict(hidden_dim=32, n_hidden_layers=2, max_steps=600, eval_every=200, lr_decays=2, patience=2))
    args = moma_ppo.Args(env="coordination", dataset="unfavorable", seed=3, iterations=20, rollout_batch=1024,
                         eval_every=100, eval_episodes=20, run_dir=str(tmp_path / "run"))
    summary = moma_ppo.main(args)
    assert summary["normalized_score_mean"] == 1.0  # every round of every greedy episode coordinated
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["episode_normalized_scores"] == [1.0] * 20 and saved["dataset_id"] == "moma/coordination/unfavorable-v0"
    # the record names the world model it trained in: the cached file, its seed and its training (monkeypatched above)
    assert saved["world_model"]["path"] == str(world_model.artifact_path("coordination", "unfavorable", 0))
    assert saved["world_model"]["seed"] == 0 and 0 < saved["world_model"]["train_steps"] <= 600


def test_resume_continues_from_the_checkpoint_instead_of_training_again(monkeypatch, tmp_path):
    """--resume trains only the iterations after the checkpoint, starting from its weights: a finished run resumed
    with the same length trains nothing, one extended by 2 iterations runs 2 (not all 6), with the checkpoint's
    weights when it starts, and the rows the first run wrote to training.csv stay as they were (a retrain from
    scratch would rewrite them with other wall times). A fresh retrain reaches the same score, so the score alone
    cannot tell."""
    monkeypatch.setitem(world_model.PRESETS, "coordination",
                        dict(hidden_dim=32, n_hidden_layers=2, max_steps=600, eval_every=200, lr_decays=2, patience=2))
    run = tmp_path / "run"
    args = moma_ppo.Args(env="coordination", dataset="unfavorable", seed=3, iterations=4, rollout_batch=256,
                         minibatch_size=256, eval_every=2, eval_episodes_during=2, eval_episodes=4, checkpoint_every=2,
                         run_dir=str(run))
    moma_ppo.main(args)
    rows_before = (run / "training.csv").read_text().splitlines()
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == 4 and len(rows_before) == 1 + 4
    started_from = []  # the agents' weights at each iteration's rollouts

    def collect_rollouts(agents, *rest, **kwargs):
        started_from.append({k: v.detach().clone() for k, v in agents.state_dict().items()})
        return real_collect_rollouts(agents, *rest, **kwargs)

    real_collect_rollouts = moma_ppo.collect_rollouts
    monkeypatch.setattr(moma_ppo, "collect_rollouts", collect_rollouts)
    moma_ppo.main(dataclasses.replace(args, resume=True))
    assert started_from == []  # finished: nothing left to train
    moma_ppo.main(dataclasses.replace(args, resume=True, iterations=6))
    assert len(started_from) == 2  # iterations 5 and 6 only
    for key, value in checkpoint["agents"].items():
        assert torch.equal(started_from[0][key], value), key
    rows = (run / "training.csv").read_text().splitlines()
    assert rows[:len(rows_before)] == rows_before and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]


def _random_dataset(env: str, name: str, n_episodes: int, steps: int):
    envs.write_minari_dataset(env, name, random_episodes(env, n_episodes, steps, 0), -50.0, 50.0, "uniform random",
                              "tiny test dataset")


@pytest.mark.parametrize("env,obs,dataset,extra", [
    ("ant", "partial", "random", {}),
    ("reacher", "leader-only", "expert-mix", {}),
    ("reacher", "independent", "expert-mix", {"ground_truth": True}),
    # the Ant diagnosis switches together: the authors' actor, adaptive entropy and action penalty, own-action
    # histories, ε_g in standardised units
    ("ant", "partial", "random", {"actor_std": "state", "entropy_target": 50.0, "action_penalty": 1.0,
                                  "start_history": "policy", "history_actions": "mean", "eps_g_units": "standardised"}),
])
def test_runs_end_to_end_on_mujoco(monkeypatch, tmp_path, env, obs, dataset, extra):
    _random_dataset(env, dataset, n_episodes=4, steps=60 if env == "ant" else 50)
    monkeypatch.setitem(world_model.PRESETS, env,
                        dict(hidden_dim=16, n_hidden_layers=1, max_steps=20, eval_every=10, lr_decays=2, patience=5))
    summary = moma_ppo.main(moma_ppo.Args(
        env=env, obs=obs, dataset=dataset, iterations=2, rollout_batch=16, rollout_horizon=3, minibatch_size=16,
        hidden_dim=16, embed_dim=8, eval_every=2, eval_episodes_during=1, eval_episodes=1, checkpoint_every=1,
        run_dir=str(tmp_path / "run"), **extra))
    assert summary["train_steps"] > 0 and np.isfinite(summary["normalized_score_mean"])
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    # training.csv: one row per iteration; the rollout statistics each time, the evaluation where one ran
    with open(tmp_path / "run" / "training.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["iteration"] for r in rows] == ["1", "2"] and tuple(rows[0]) == moma_ppo.TRAINING_COLUMNS
    assert float(rows[1]["mean_length"]) > 0 and float(rows[1]["action_std"]) > 0
    assert rows[0]["eval_score"] == "" and 1 <= float(rows[1]["eval_mean_length"]) <= envs.EPISODE_STEPS[env]
    if "entropy_target" in extra:  # a target far above the joint entropy: α grew from 0 during the updates
        alpha = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["agents"]["entropy_alpha"]
        assert alpha > 0


def test_start_histories_from_the_dataset_the_policy_or_zeros():
    torch.manual_seed(0)
    layout, agents = _agents()
    n_rows = 30
    table = torch.randn(4, n_rows + 1, layout.history_dim)
    table[:, -1] = 0.0  # the padding row
    index = torch.randint(0, n_rows + 1, (n_rows, 10))
    index[:, :3] = n_rows  # every history starts with padding
    rows = torch.tensor([0, 5, 7])
    dataset = moma_ppo.start_histories(agents, layout, table, index, rows, "dataset")
    torch.testing.assert_close(dataset, table[:, index[rows]])
    assert moma_ppo.start_histories(agents, layout, table, index, rows, "zeros").abs().sum() == 0
    policy = moma_ppo.start_histories(agents, layout, table, index, rows, "policy")
    o = layout.obs_dim
    real = index[rows] < n_rows
    torch.testing.assert_close(policy[..., :o][:, real], dataset[..., :o][:, real])  # the dataset's observations
    assert policy[:, ~real].abs().sum() == 0  # padding stays padding
    # ... with the policy's mean action at each history row, given that row's own dataset history
    r = index[rows][0, 5].item()
    expected = agents.greedy(agents.features(table[:, [r], :o], table[:, index[[r]]]))[:, 0]
    torch.testing.assert_close(policy[:, 0, 5, o:], expected.clamp(-1, 1))


def test_history_actions_mean_puts_the_policy_mean_in_rollout_histories():
    torch.manual_seed(0)
    layout, agents = _agents()
    states = torch.randn(50, 27)
    table = torch.randn(4, 51, layout.history_dim)
    index = torch.randint(0, 51, (50, 10))
    o = layout.obs_dim
    for mode in ("sampled", "mean"):
        batch, _, _ = moma_ppo.collect_rollouts(agents, FakeModel(), layout, states, table, index,
                                             _args(history_actions=mode, adaptive_rollout=False),
                                             torch.Generator().manual_seed(0))
        # the newest history entry of every transition after a rollout's first step (24 of 32) holds the previous
        # step's action: the one taken (sampled) or the policy's mean there
        hist_actions = batch["hist"][:, :, -1, o:]
        feats = agents.features(batch["obs"], batch["hist"])
        taken = batch["actions"].clamp(-1, 1)
        means = agents.greedy(feats)
        # every transition after the first step has its predecessor's action in its history: find matches
        matches_taken = (hist_actions[:, :, None] - taken[:, None]).abs().amax(-1).amax(0).lt(1e-6).any(1).float().mean()
        matches_mean = (hist_actions[:, :, None] - means[:, None]).abs().amax(-1).amax(0).lt(1e-5).any(1).float().mean()
        if mode == "sampled":
            assert matches_taken >= 0.7 and matches_mean < 0.1
        else:
            assert matches_mean >= 0.7 and matches_taken < 0.1


def test_uncertainty_cut_preset_per_env():
    # Ant: the cut ends a rollout as a terminal (docs/diagnosis.md); Reacher keeps the paper's timeout, since with
    # rewards <= 0 a terminal's zero future would make reaching model uncertainty attractive; a flag overrides both
    import tyro

    resolved = lambda *flags: moma_ppo.resolve(tyro.cli(moma_ppo.Args, args=list(flags)))  # noqa: E731
    assert resolved("--env", "ant", "--obs", "partial").uncertainty_cut == "terminal"
    assert resolved("--env", "ant", "--obs", "full", "--uncertainty-cut", "timeout").uncertainty_cut == "timeout"
    assert resolved("--env", "reacher", "--obs", "independent").uncertainty_cut == "timeout"
    assert resolved("--env", "coordination").uncertainty_cut == "timeout"


def test_ant_preset_makes_four_times_the_updates_the_diagnosis_started_from():
    # docs/diagnosis.md row (c): minibatches of 1,024 (~95 updates per iteration) instead of 4,096 (20) let the
    # critic value walking within the budget: 0.85 against 0.73 (full) and 0.48 against 0.32 (partial) at 80 iterations
    import tyro

    for obs in ("full", "partial"):
        a = moma_ppo.resolve(tyro.cli(moma_ppo.Args, args=["--env", "ant", "--obs", obs]))
        updates_per_iteration = a.update_epochs * (a.rollout_batch * a.rollout_horizon // a.minibatch_size)
        assert a.minibatch_size == 1024 and updates_per_iteration >= 80, (obs, updates_per_iteration)


def test_history_encoder_with_fused_projections_is_the_unfused_one():
    # the speed-up multiplies W_embed W_qkv before the batch: same outputs and same gradients, in double precision
    import torch.nn.functional as F

    torch.manual_seed(0)
    enc = moma_ppo.HistoryEncoder(4, 17, 32, 10).double()
    with torch.no_grad():
        enc.embed.bias.normal_()
        enc.qkv.bias.normal_()
    history = torch.randn(4, 5, 10, 17, dtype=torch.float64)

    def unfused(history):
        n, b, h, d = history.shape
        x = enc.embed(history.reshape(n, b * h, d)).view(n, b, h, enc.dim) + enc.position_code
        q, k, v = enc.qkv(x.view(n, b * h, enc.dim)).view(n, b, h, 3 * enc.dim).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(enc.dim), dim=-1)
        x = F.layer_norm(x + attention @ v, (enc.dim,)) * enc.norm_weight + enc.norm_bias
        keys = torch.tanh(enc.pool_key(x.view(n, b * h, enc.dim))).view(n, b, h, enc.dim)
        return (torch.softmax((keys * enc.pool_query).sum(-1), dim=-1).unsqueeze(-1) * x).sum(2)

    torch.testing.assert_close(enc(history), unfused(history), rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(f(history).pow(2).sum(), list(enc.parameters())) for f in (enc, unfused)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# --bf16: the agents' matrix products in bfloat16, output layers and the world model in fp32
# --------------------------------------------------------------------------------------------------
def test_bf16_keeps_output_layers_and_the_world_model_fp32_and_tracks_fp32():
    """Under --bf16's autocast the action means, values and mixer weights come out of fp32 output layers, the world
    model predicts in fp32, and the PPO quantities differ from the fp32 network's by bfloat16's rounding only."""
    torch.manual_seed(0)
    layout, agents = _agents()
    S = envs.STATE_DIM["ant"]
    obs, hist = torch.randn(4, 256, layout.obs_dim), torch.randn(4, 256, 10, layout.history_dim)
    states, actions = torch.randn(256, S), torch.rand(4, 256, layout.action_dim) * 2 - 1
    feats = agents.features(obs, hist)
    dist, value = agents.distribution(feats), agents.team_value(feats, states)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats16 = agents.features(obs, hist)
        assert agents.encoder.embed(torch.randn(4, 5, layout.history_dim)).dtype == torch.bfloat16  # hidden: bf16
        dist16, value16 = agents.distribution(feats16), agents.team_value(feats16, states)
        assert dist16.mean.dtype == torch.float32 and value16.dtype == torch.float32
        model = world_model.WorldModel("ant", "test", S, envs.JOINT_ACTION_DIM["ant"], 3, 2, 32, 2)
        pred = model.member_predictions(torch.randn(64, S), torch.rand(64, envs.JOINT_ACTION_DIM["ant"]))
        assert pred["next_states"].dtype == torch.float32 and pred["p_not_terminal"].dtype == torch.float32
    # the rollout's log-probabilities and values move by bfloat16's ~3 significant digits, far inside PPO's clip 0.2
    ratio = (agents.log_prob(dist16, actions) - agents.log_prob(dist, actions)).exp()
    assert (ratio - 1).abs().max() < 0.05 and (value16 - value).abs().max() < 0.05 * value.abs().max() + 1e-3
    assert (ratio - 1).abs().max() > 0  # it did run in bfloat16


def test_bf16_solves_the_unfavorable_coordination_game(monkeypatch, tmp_path):
    """--bf16 learns what fp32 learns on the game (test_solves_the_unfavorable_coordination_game: the same seed)."""
    monkeypatch.setitem(world_model.PRESETS, "coordination",
                        dict(hidden_dim=32, n_hidden_layers=2, max_steps=600, eval_every=200, lr_decays=2, patience=2))
    summary = moma_ppo.main(moma_ppo.Args(env="coordination", dataset="unfavorable", seed=3, iterations=20,
                                          rollout_batch=1024, eval_every=100, eval_episodes=20, bf16=True,
                                          run_dir=str(tmp_path / "run")))
    assert summary["normalized_score_mean"] == 1.0 and summary["config"]["bf16"] is True
