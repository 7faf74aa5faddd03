"""Tests of itd3bc.py (+ MATD3+BC), icql.py and omar.py: the losses that are easy to get wrong (CQL's
importance-sampled logsumexp, TD3+BC's λ, QMIX monotonic mixing, OMAR's elite update and target
choice), the batched critics, and end-to-end smoke runs on tiny random reacher / ant datasets written
into the session's temporary Minari folder (conftest.py).
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import envs
import icql
import itd3bc
import omar

SUMMARY_KEYS = {"algorithm", "env", "obs", "dataset_id", "seed", "config", "eval_episodes", "normalized_score_mean",
                "normalized_score_std", "episode_returns", "episode_normalized_scores", "train_steps", "wall_time_s",
                "git_commit",
                # the run record (docs/reproduction.md): checked against the current code and dataset by results.py
                "method", "budget", "dataset_fingerprint", "code_fingerprint", "episode_lengths"}


# --------------------------------------------------------------------------------------------------
# CQL
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [icql, omar])
def test_cql_term_hand_computed(module):
    q_data = torch.tensor([1.0, -0.5])
    q_sampled = torch.tensor([[0.0, 2.0, 1.0], [-1.0, 0.5, 3.0]])
    log_density = torch.tensor([[math.log(0.25), -1.0, 0.5], [math.log(0.25), 2.0, -0.3]])
    by_hand = []
    for b in range(2):
        lse = math.log(sum(math.exp(q_sampled[b, j].item() - log_density[b, j].item()) for j in range(3)))
        by_hand.append(lse - q_data[b].item())
    assert module.cql_term(q_data, q_sampled, log_density).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    # Temperature T: T logsumexp(z / T).
    T = 2.0
    by_hand_t = [T * math.log(sum(math.exp((q_sampled[b, j] - log_density[b, j]).item() / T) for j in range(3)))
                 - q_data[b].item() for b in range(2)]
    assert module.cql_term(q_data, q_sampled, log_density, T).item() == pytest.approx(sum(by_hand_t) / 2, rel=1e-6)
    # Leading dims (critic heads, agents) are kept for the caller to sum.
    assert module.cql_term(q_data.expand(2, 3, 2), q_sampled.expand(2, 3, 2, 3), log_density).shape == (2, 3)


def test_cql_term_pushes_sampled_q_down_and_data_q_up():
    q_data = torch.zeros(4, requires_grad=True)
    q_sampled = torch.randn(4, 30, requires_grad=True)
    icql.cql_term(q_data, q_sampled, torch.zeros(4, 30)).backward()
    assert torch.allclose(q_data.grad, torch.full((4,), -0.25))  # minimising raises Q(s, a_data)
    assert (q_sampled.grad > 0).all()  # ... and lowers Q on the sampled actions (softmax weights / B)
    assert torch.allclose(q_sampled.grad.sum(-1), torch.full((4,), 0.25))


def test_cql_proposals_use_log_densities_not_pdfs():
    # The authors' (OMAR-derived) code subtracted the Gaussian *pdf*; we subtract its log-density.
    g = torch.Generator().manual_seed(0)
    n, B, K, a, sigma = 2, 5, 10, 3, 0.01  # tiny noise around 0: nothing gets clipped
    pi = torch.zeros(n, B, a)
    actions, log_density = icql.cql_sample_actions(pi, pi + 0.5, K, sigma, g)
    assert actions.shape == (n, B, 3 * K, a) and log_density.shape == (n, B, 3 * K)
    assert actions.abs().max() <= 1.0
    assert torch.allclose(log_density[..., :K], torch.full((n, B, K), a * math.log(0.5)))  # uniform on [-1, 1]^3
    normal = torch.distributions.Normal(0.0, sigma)
    assert torch.allclose(log_density[..., K:2 * K], normal.log_prob(actions[..., K:2 * K, :]).sum(-1), atol=1e-4)
    assert torch.allclose(log_density[..., 2 * K:], normal.log_prob(actions[..., 2 * K:, :] - 0.5).sum(-1), atol=1e-4)
    assert (actions[..., 2 * K:, :] - 0.5).abs().max() < 0.1  # next-step proposals centre on π(x')


@pytest.mark.parametrize("module", [icql, omar])
def test_sampled_critics_equal_repeated_critics(module):
    torch.manual_seed(0)
    agents = module.TD3Agents(n=3, obs_dim=5, action_dim=2, hidden=16, history_len=0, history_in=7, history_dim=8)
    x, a = torch.randn(3, 4, 5), torch.rand(3, 4, 6, 2) * 2 - 1
    repeated = agents.q_values(x[:, :, None].expand(-1, -1, 6, -1).reshape(3, 24, 5), a.reshape(3, 24, 2))
    assert torch.allclose(agents.q_sampled(x, a), repeated.reshape(2, 3, 4, 6), atol=1e-5)
    assert torch.allclose(agents.q_sampled(x, a, heads=1)[0], repeated.reshape(2, 3, 4, 6)[0], atol=1e-5)
    assert torch.allclose(agents.q1(x, a[:, :, 0]), agents.q_values(x, a[:, :, 0])[0], atol=1e-5)


@pytest.mark.parametrize("module", [itd3bc, icql, omar])
def test_batched_mlp_equals_per_agent_mlps_hand_computed(module):
    # Two agents, one layer 2 -> 1: agent 0 computes x0 + 2 x1 + 0.5, agent 1 computes -x0 + 3 x1.
    mlp = module.AgentsMLP(2, [2, 1])
    with torch.no_grad():
        mlp.weights[0].copy_(torch.tensor([[[1.0], [2.0]], [[-1.0], [3.0]]]))
        mlp.biases[0].copy_(torch.tensor([[[0.5]], [[0.0]]]))
    out = mlp(torch.tensor([[[1.0, 1.0]], [[2.0, 1.0]]]))
    assert out.flatten().tolist() == [3.5, 1.0]
    # A deeper stack equals each agent's own plain MLP (its slice of the stacked weights), ReLU between layers.
    torch.manual_seed(0)
    mlp = module.AgentsMLP(3, [5, 8, 8, 2])
    x = torch.randn(3, 4, 5)
    for i in range(3):
        h = x[i]
        for k, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
            h = h @ w[i] + b[i, 0]
            h = torch.relu(h) if k < 2 else h
        assert torch.allclose(mlp(x)[i], h, atol=1e-6)


@pytest.mark.parametrize("module", [itd3bc, icql, omar])
def test_critic_members_are_per_agent_q1_then_q2(module):
    torch.manual_seed(0)
    n = 3
    agents = module.TD3Agents(n=n, obs_dim=5, action_dim=2, hidden=16, history_len=0, history_in=7, history_dim=8)
    x, a = torch.randn(n, 4, 5), torch.rand(n, 4, 2) * 2 - 1
    q = agents.q_values(x, a)
    w, b = agents.critic.weights, agents.critic.biases
    for head in range(2):
        for i in range(n):
            m = head * n + i  # member layout [Q1_0..Q1_n-1, Q2_0..Q2_n-1]
            h = torch.cat([x[i], a[i]], -1)
            h = torch.relu(h @ w[0][m] + b[0][m, 0])
            h = torch.relu(h @ w[1][m] + b[1][m, 0])
            assert torch.allclose(q[head, i], (h @ w[2][m] + b[2][m, 0])[:, 0], atol=1e-5)


@pytest.mark.parametrize("module", [itd3bc, icql, omar])
def test_soft_update_is_lerp_with_tau(module):
    target, source = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, 2.0]])), target.bias.fill_(4.0)
        source.weight.copy_(torch.tensor([[3.0, -2.0]])), source.bias.fill_(0.0)
    module.soft_update(target, source, 0.25)  # (1 - τ) target + τ source
    assert target.weight.tolist() == [[1.5, 1.0]] and target.bias.tolist() == [3.0]


def test_itd3bc_update_equals_a_per_agent_reference_step():
    """update() (batched agents, fused Adam, foreach soft updates) computes the same critic loss as a plain
    per-agent loop over the TD3 target and both critics, and its parameters after one critic + actor step
    equal a reference Adam step on that per-agent loss."""
    import copy
    torch.manual_seed(0)
    n, B, o, A = 2, 8, 5, 2
    args = itd3bc.Args(env="reacher", hidden=16, policy_noise=0.0)  # no smoothing noise: a deterministic target
    learner = itd3bc.make_learner(args, n, o, A, 0, 7, 10, torch.device("cpu"))
    agents = learner["agents"]
    ref_agents = copy.deepcopy(agents)
    b = dict(obs=torch.randn(n, B, o), next_obs=torch.randn(n, B, o), actions=torch.rand(n, B, A) * 2 - 1,
             rewards=torch.randn(B), terminals=(torch.rand(B) < 0.3).float(), hist=None, next_hist=None,
             states=torch.randn(B, 10), next_states=torch.randn(B, 10))

    def mlp(weights, biases, m, h):
        for k in range(len(weights)):
            h = h @ weights[k][m] + biases[k][m, 0]
            h = torch.relu(h) if k < len(weights) - 1 else h
        return h

    critic_w, critic_b = ref_agents.critic.weights, ref_agents.critic.biases
    loss_ref = 0.0
    for i in range(n):
        with torch.no_grad():  # targets start equal to the online networks
            a_next = torch.tanh(mlp(ref_agents.actor.weights, ref_agents.actor.biases, i, b["next_obs"][i])).clamp(-1, 1)
            q_next = torch.minimum(*(mlp(critic_w, critic_b, k * n + i, torch.cat([b["next_obs"][i], a_next], -1))[:, 0]
                                     for k in range(2)))
            y = b["rewards"] + args.gamma * (1 - b["terminals"]) * q_next
        for k in range(2):
            q = mlp(critic_w, critic_b, k * n + i, torch.cat([b["obs"][i], b["actions"][i]], -1))[:, 0]
            loss_ref = loss_ref + (y - q).pow(2).mean()
    ref_opt = torch.optim.Adam(ref_agents.critic.parameters(), lr=args.learning_rate)  # the default (for-loop/foreach) Adam
    ref_opt.zero_grad()
    loss_ref.backward()
    ref_opt.step()

    losses = itd3bc.update(learner, b, 1, args, torch.Generator().manual_seed(0))  # step 1: critic only
    assert losses["critic_loss"].item() == pytest.approx(loss_ref.item(), rel=1e-5)
    for p, p_ref in zip(agents.critic.parameters(), ref_agents.critic.parameters()):
        assert torch.allclose(p, p_ref, atol=1e-6)
    for p, p0 in zip(agents.actor.parameters(), ref_agents.actor.parameters()):
        assert torch.equal(p, p0)  # no actor step at step 1 (policy_freq = 2)


# --------------------------------------------------------------------------------------------------
# TD3+BC and MATD3+BC
# --------------------------------------------------------------------------------------------------
def test_td3bc_lambda_normalisation():
    q = torch.tensor([[1.0, -3.0], [4.0, 4.0]], requires_grad=True)  # two learners, batch of two
    lam = itd3bc.td3bc_lambda(q, alpha=2.5)
    assert torch.allclose(lam, torch.tensor([2.5 / 2.0, 2.5 / 4.0]))
    assert not lam.requires_grad  # λ only rescales; it is not differentiated
    pi = torch.tensor([[[0.5], [0.0]], [[-1.0], [1.0]]])  # [n=2, B=2, a=1]
    data = torch.tensor([[[0.0], [0.0]], [[0.0], [0.5]]])
    loss = itd3bc.td3bc_actor_loss(q, pi, data, alpha=2.5)
    by_hand = -(1.25 * (-1.0) + 0.625 * 4.0) + ((0.25 + 0.0) / 2 + (1.0 + 0.25) / 2)
    assert loss.item() == pytest.approx(by_hand)
    (grad,) = torch.autograd.grad(loss, q)
    assert torch.allclose(grad, torch.tensor([[-0.625, -0.625], [-0.3125, -0.3125]]))  # -λ / B, λ held fixed
    # Scale invariance of the Q term: scaling Q by 100 leaves λ·Q unchanged.
    assert itd3bc.td3bc_actor_loss(100 * q, pi, data, 2.5).item() == pytest.approx(by_hand, rel=1e-6)


def test_matd3bc_mixer_is_monotonic_even_with_negative_raw_weights():
    torch.manual_seed(0)
    n, B = 4, 32
    mixer = itd3bc.Mixer(state_dim=6, n=n, hidden=16)
    with torch.no_grad():  # negative raw outputs: the mixer must use |w|
        mixer.net[-1].weight.mul_(-1.0)
        mixer.net[-1].bias.fill_(-1.0)
    s = torch.randn(B, 6)
    q = torch.randn(2, n, B, requires_grad=True)  # both critic heads share the mixer
    q_tot = mixer(q, s)
    assert q_tot.shape == (2, B)
    (grad,) = torch.autograd.grad(q_tot.sum(), q)
    assert (grad >= 0).all() and (grad > 0).any()
    wb = mixer.net(s)
    assert torch.allclose(q_tot[1], (wb[:, :n].abs() * q[1].T).sum(1) + wb[:, n], atol=1e-6)
    # Raising one agent's value never lowers the team value.
    assert (mixer(q + torch.eye(n)[2][:, None], s) >= q_tot - 1e-6).all()


def test_mixer_input_appends_the_joint_action_agent_major():
    states = torch.arange(6.0).reshape(2, 3)  # B = 2, S = 3
    actions = torch.tensor([[[10.0, 11.0], [12.0, 13.0]], [[20.0, 21.0], [22.0, 23.0]]])  # [n=2, B=2, a=2]
    assert itd3bc.mixer_input(states, actions, action_aware=False) is states
    joint = itd3bc.mixer_input(states, actions, action_aware=True)
    assert torch.equal(joint, torch.tensor([[0.0, 1.0, 2.0, 10.0, 11.0, 20.0, 21.0],
                                            [3.0, 4.0, 5.0, 12.0, 13.0, 22.0, 23.0]]))


def test_only_an_action_aware_mixer_couples_the_actors_gradients():
    """With QMIX's state-only mixer, Q_tot = Σ_i w_i(s) Q_i(x_i, a_i) + b(s): agent 0's action gradient does not
    depend on agent 1's action (no coordination signal reaches the actor). Reading the joint action, it does."""
    torch.manual_seed(0)
    n, B, a, S = 2, 5, 2, 4
    agents = itd3bc.TD3Agents(n, obs_dim=3, action_dim=a, hidden=16, history_len=0, history_in=5, history_dim=8)
    x, s = torch.randn(n, B, 3), torch.randn(B, S)
    base = torch.rand(n, B, a) * 2 - 1

    def grad_of_agent0(mixer, aware, partner_action):
        acts = base.clone()
        acts[1] = partner_action
        acts.requires_grad_(True)
        q_tot = mixer(agents.q1(x, acts), itd3bc.mixer_input(s, acts, aware))
        (g,) = torch.autograd.grad(q_tot.sum(), acts)
        return g[0]

    other = -base[1]
    state_only = itd3bc.Mixer(S, n, 16)
    assert torch.allclose(grad_of_agent0(state_only, False, base[1]), grad_of_agent0(state_only, False, other))
    aware = itd3bc.Mixer(S + n * a, n, 16)
    assert not torch.allclose(grad_of_agent0(aware, True, base[1]), grad_of_agent0(aware, True, other), atol=1e-4)


def test_action_aware_mixer_needs_the_mixer(tmp_path):
    with pytest.raises(envs.MomaError, match="--action-aware-mixer needs --mixer"):
        itd3bc.main(_tiny(itd3bc, tmp_path, env="reacher", obs="independent", dataset="expert-mix",
                          action_aware_mixer=True))


# --------------------------------------------------------------------------------------------------
# OMAR
# --------------------------------------------------------------------------------------------------
def test_omar_elite_update_hand_computed():
    samples = torch.tensor([[-0.9], [0.1], [0.4], [0.8], [-0.2]])  # [S=5, a=1]
    q = torch.tensor([0.0, 3.0, 5.0, 1.0, 2.0])
    elites, elite_q, mu, sigma = omar.omar_elite_update(samples, q, n_elites=3)
    assert torch.allclose(elite_q, torch.tensor([5.0, 3.0, 2.0]))  # sorted, best first
    assert torch.allclose(elites[:, 0], torch.tensor([0.4, 0.1, -0.2]))
    assert mu.item() == pytest.approx(0.1)
    assert sigma.item() == pytest.approx(0.3 + 1e-6)  # unbiased std of (0.4, 0.1, -0.2) = 0.3
    # The next iteration pools its samples with the previous elites.
    new = torch.tensor([[0.0], [0.2], [0.3], [-1.0], [1.0]])
    new_q = torch.tensor([1.0, 4.0, 6.0, -5.0, 0.5])
    elites2, elite_q2, mu2, _ = omar.omar_elite_update(new, new_q, 3, elites, elite_q)
    assert torch.allclose(elite_q2, torch.tensor([6.0, 5.0, 4.0]))
    assert torch.allclose(elites2[:, 0], torch.tensor([0.3, 0.4, 0.2]))
    assert mu2.item() == pytest.approx(0.3)


def test_omar_keeps_the_searched_action_only_if_it_beats_the_policy():
    pi = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    best = torch.tensor([[0.9, 0.9], [-0.9, -0.9]])
    target = omar.omar_choose_target(pi, torch.tensor([1.0, 2.0]), best, torch.tensor([1.5, 1.0]))
    assert torch.allclose(target, torch.tensor([[0.9, 0.9], [0.3, 0.4]]))


def test_omar_search_finds_the_critic_peak():
    g = torch.Generator().manual_seed(0)
    peak = torch.tensor([0.5, -0.3])
    q1 = lambda a: -(a - peak).pow(2).sum(-1)  # noqa: E731  [n, B, S, a] -> [n, B, S]
    pi = torch.full((2, 64, 2), -0.9)
    target = omar.omar_search(q1, pi, q1(pi[:, :, None])[..., 0], iters=2, n_samples=20, n_elites=5,
                              init_mu=0.0, init_sigma=2.0, generator=g)
    assert (q1(target[:, :, None])[..., 0] > q1(pi[:, :, None])[..., 0]).all()
    assert (target - peak).norm(dim=-1).mean() < 0.4
    # A policy already at the peak is kept: no sample can beat it.
    at_peak = peak.expand(2, 64, 2).clone()
    kept = omar.omar_search(q1, at_peak, torch.zeros(2, 64), 2, 20, 5, 0.0, 2.0, g)
    assert torch.equal(kept, at_peak)


# --------------------------------------------------------------------------------------------------
# End-to-end smoke runs on tiny random datasets (the session's temporary Minari folder)
# --------------------------------------------------------------------------------------------------
SMOKE = [(m, "reacher", o, "expert-mix") for m in (itd3bc, icql, omar) for o in envs.OBS_FUNCTIONS["reacher"]]
SMOKE += [(m, "ant", o, "random") for m in (itd3bc, icql, omar) for o in envs.OBS_FUNCTIONS["ant"]]


def _tiny(module, tmp_path, **kw):
    config = dict(seed=0, total_steps=6, batch_size=16, hidden=16, history_dim=8, eval_every=0, eval_episodes=1,
                  checkpoint_every=3, run_dir=str(tmp_path / "run"))
    return module.Args(**{**config, **kw})


@pytest.mark.parametrize("module,env,obs,dataset", SMOKE, ids=lambda v: getattr(v, "__name__", v))
def test_smoke_mujoco(module, env, obs, dataset, tiny_mujoco_datasets, tmp_path):
    extra = dict(cql_samples=2) if module is not itd3bc else {}
    summary = module.main(_tiny(module, tmp_path, env=env, obs=obs, dataset=dataset,
                                **(dict(eval_every=3) if env == "reacher" else {}), **extra))
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Reacher records also keep each greedy episode's agent conventions (Table 4a's mechanism)
    # every script here has a critic: its divergence verdict (envs.CriticLog) and training.csv
    assert set(on_disk) == SUMMARY_KEYS | ({"conventions"} if env == "reacher" else set()) | {
        "critic_value_bound", "critic_diverged"}
    assert on_disk["critic_diverged"] is None and (tmp_path / "run" / "training.csv").exists()
    assert on_disk["train_steps"] == 6 and on_disk["obs"] == obs
    if env == "reacher":
        assert len(on_disk["conventions"]["agents"]) == 1 and 0 <= on_disk["conventions"]["same_share"] <= 1
    assert on_disk["algorithm"] == module.__name__ and on_disk["env"] == env
    assert np.isfinite(summary["normalized_score_mean"]) and len(summary["episode_returns"]) == 1
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    uses_history = any(k.startswith("encoder.") for k in ck["agents"])
    assert uses_history == ((env, obs) in envs.PARTIALLY_OBSERVABLE)  # the 10-step encoder on PO tasks only
    assert (ck["target_encoder"] is not None) == uses_history


@pytest.mark.parametrize("env,obs,dataset", [("reacher", "leader-only", "expert-mix"), ("ant", "partial", "random")])
@pytest.mark.parametrize("action_aware", [False, True])
def test_smoke_matd3bc(env, obs, dataset, action_aware, tiny_mujoco_datasets, tmp_path):
    summary = itd3bc.main(_tiny(itd3bc, tmp_path, env=env, obs=obs, dataset=dataset, mixer=True,
                                action_aware_mixer=action_aware))
    assert summary["algorithm"] == "matd3bc" and summary["train_steps"] == 6
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ck["mixer"] is not None and ck["target_mixer"] is not None
    n, a = len(envs.action_dims(env)), envs.action_dims(env)[0]
    state_dim = ck["mixer"]["net.0.weight"].shape[1] - (n * a if action_aware else 0)
    assert state_dim == envs.load_dataset(env, dataset, obs, history_len=1).states.shape[1]


def test_resume_continues_the_run(tiny_mujoco_datasets, tmp_path):
    first = omar.main(_tiny(omar, tmp_path, env="reacher", obs="independent", dataset="expert-mix", cql_samples=2))
    assert first["train_steps"] == 6
    # the checkpoint's training time so far (the first run's summary also counts its final evaluation, which the
    # resumed run does not repeat: comparing with it failed whenever that evaluation outlasted the 3 resumed steps)
    trained_before = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["wall_s"]
    resumed = omar.main(dataclass_replace(_tiny(omar, tmp_path, env="reacher", obs="independent", dataset="expert-mix",
                                                cql_samples=2), total_steps=9, resume=True))
    assert resumed["train_steps"] == 9 and resumed["wall_time_s"] > trained_before > 0


def dataclass_replace(args, **kw):
    import dataclasses
    return dataclasses.replace(args, **kw)


@pytest.mark.parametrize("module", [itd3bc, icql, omar])
def test_coordination_game_is_refused_clearly(module, tmp_path):
    with pytest.raises(envs.MomaError, match="continuous-action only.*iql.py, maiql.py and ibc.py"):
        module.main(module.Args(env="coordination", run_dir=str(tmp_path / "x")))


def test_bad_input_is_a_moma_error(tmp_path):
    with pytest.raises(envs.MomaError, match="observation function"):
        itd3bc.main(itd3bc.Args(env="reacher", obs="partial", run_dir=str(tmp_path / "x")))
    with pytest.raises(envs.MomaError, match="resume"):
        icql.main(icql.Args(env="reacher", resume=True, run_dir=str(tmp_path / "missing")))
    with pytest.raises(envs.MomaError, match="omar-elites"):
        omar.main(omar.Args(env="reacher", omar_elites=30, run_dir=str(tmp_path / "y")))


def _unfused_encoder(enc, h):
    """The history encoder as docs/deviations.md §6 writes it: embed, add positions, then project the embedding."""
    import torch.nn.functional as F

    n, B, H, _ = h.shape
    x = enc.embed(h.reshape(n, B * H, -1)).reshape(n, B, H, enc.d) + enc.positions
    q, k, v = enc.qkv(x.reshape(n, B * H, enc.d)).reshape(n * B, H, 3 * enc.d).split(enc.d, dim=-1)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(enc.d), dim=-1) @ v
    x = F.layer_norm(x + attn.reshape(n, B, H, enc.d), (enc.d,)) * enc.ln_weight + enc.ln_bias
    scores = torch.bmm(torch.tanh(torch.bmm(x.reshape(n, B * H, enc.d), enc.pool_key)), enc.pool_query)
    return (torch.softmax(scores.reshape(n, B, H, 1), dim=2) * x).sum(2)


@pytest.mark.parametrize("module_name", ["itd3bc", "icql", "omar", "ibc", "iql", "maiql"])
def test_history_encoder_with_fused_projections_is_the_unfused_one(module_name):
    # the speed-up multiplies W_embed W_qkv before the batch: same outputs and same gradients, in double precision
    import importlib

    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    enc = module.AgentsHistoryEncoder(4, 17, 10, 32).double()
    with torch.no_grad():  # non-zero biases, so the per-position term is exercised
        for p in list(enc.embed.biases) + list(enc.qkv.biases):
            p.normal_()
    h = torch.randn(4, 5, 10, 17, dtype=torch.float64)
    fused, reference = enc(h), _unfused_encoder(enc, h)
    assert fused.shape == (4, 5, 32)
    torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(out.pow(2).sum(), list(enc.parameters())) for out in (enc(h), _unfused_encoder(enc, h))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# --bf16: bfloat16 matrix products under torch.autocast, output layers in fp32
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module,mixer,history_len", [(itd3bc, False, 0), (itd3bc, True, 0), (itd3bc, False, 3),
                                                      (icql, False, 0), (icql, False, 3), (omar, False, 0)],
                         ids=lambda v: getattr(v, "__name__", v))
def test_bf16_update_tracks_the_fp32_update(module, mixer, history_len):
    """Two updates (critic, then critic + actor) under bfloat16 autocast give the fp32 updates' losses within
    bfloat16's precision; the Q-values come out of fp32 output layers (in bfloat16 a Q near 300 would be rounded
    to a multiple of 2), and the weights and Adam's state stay fp32."""
    import copy
    torch.manual_seed(0)
    n, B, o, A, S, hd = 2, 256, 6, 2, 10, 5
    args = module.Args(env="reacher", hidden=64, history_dim=16, **(dict(mixer=mixer) if module is itd3bc else {}))
    extra = (S,) if module is itd3bc else ()
    fp32 = module.make_learner(args, n, o, A, history_len, hd, *extra, torch.device("cpu"))
    bf16 = copy.deepcopy(fp32)
    hist = (lambda: torch.randn(n, B, history_len, hd)) if history_len else (lambda: None)
    b = dict(obs=torch.randn(n, B, o), next_obs=torch.randn(n, B, o), actions=torch.rand(n, B, A) * 2 - 1,
             rewards=300 + torch.randn(B), terminals=(torch.rand(B) < 0.1).float(), hist=hist(), next_hist=hist(),
             states=torch.randn(B, S), next_states=torch.randn(B, S))
    for step in (1, 2):
        ref = module.update(fp32, b, step, args, torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module.update(bf16, b, step, args, torch.Generator().manual_seed(step))
        assert out["q"].dtype == torch.float32
        for k in ("critic_loss", "actor_loss"):
            if k in ref:
                assert torch.isfinite(out[k]) and out[k].item() == pytest.approx(ref[k].item(), rel=0.03), k
    assert "actor_loss" in out
    for p in bf16["agents"].parameters():
        assert p.dtype == torch.float32
    for state in bf16["critic_optimizer"].state.values():
        assert state["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("module", [itd3bc, icql, omar])
def test_bf16_smoke(module, tiny_mujoco_datasets, tmp_path):
    """--bf16 end to end on a partially observable task (history encoders): trains, evaluates, records the flag."""
    extra = dict(cql_samples=2) if module is not itd3bc else {}
    summary = module.main(_tiny(module, tmp_path, env="ant", obs="partial", dataset="random", bf16=True, **extra))
    assert summary["train_steps"] == 6 and np.isfinite(summary["normalized_score_mean"])
    assert summary["config"]["bf16"] is True


# --------------------------------------------------------------------------------------------------
# icql.py / omar.py keep their 63 MB CQL activations in the heap (envs.keep_large_allocations_in_the_heap)
# --------------------------------------------------------------------------------------------------
_HEAP_PROBE = """
import hashlib, sys, torch
sys.path.insert(0, {repo!r})
import envs, icql
assert envs.keep_large_allocations_in_the_heap() == ({heap} and sys.platform == "linux")
torch.manual_seed(0)
torch.set_num_threads(1)
n, B, o, A = 4, 256, 27, 8  # Ant's shapes: the sampled actions' hidden layers are [8, 7680, 256] floats, 63 MB
args = icql.Args(env="ant")
learner = icql.make_learner(args, n, o, A, 0, 1, torch.device("cpu"))
b = dict(obs=torch.randn(n, B, o), next_obs=torch.randn(n, B, o), actions=torch.rand(n, B, A) * 2 - 1,
         rewards=torch.randn(B), terminals=torch.zeros(B), hist=None, next_hist=None)
for step in (1, 2):
    icql.update(learner, b, step, args, torch.Generator().manual_seed(step))
digest = hashlib.sha256()
for p in learner["agents"].parameters():
    digest.update(p.detach().numpy().tobytes())
print(digest.hexdigest())
"""


def test_cql_updates_are_bit_identical_with_large_allocations_in_the_heap():
    """icql.py and omar.py keep large allocations in glibc's heap for speed (1.5x on Ant, docs/benchmarks.md): that
    changes where the memory comes from, never the arithmetic. Two Ant-sized ICQL updates give the same weights
    bit for bit with glibc's default (MOMA_KEEP_MMAP=1 disables the switch) and with the switch on."""
    import os
    import pathlib
    import subprocess
    import sys

    repo = str(pathlib.Path(__file__).resolve().parents[1])
    digests = []
    for heap in (False, True):
        env = dict(os.environ, MOMA_KEEP_MMAP="0" if heap else "1")
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE.format(repo=repo, heap=heap)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.append(out.stdout.split()[-1])
    assert len(digests[0]) == 64 and digests[0] == digests[1]


@pytest.mark.parametrize("module", [icql, omar])
def test_cql_runs_evaluate_every_tenth_by_default_and_evaluations_change_no_training(module, tiny_mujoco_datasets,
                                                                                     tmp_path):
    """The default cadence is a tenth of the run (a 5k-step partially observable run once had only its final
    evaluation, i.e. no learning curve); evaluating draws no training random numbers, so the weights are the same."""
    base = dict(env="reacher", obs="independent", dataset="expert-mix", cql_samples=2, total_steps=20)
    module.main(dataclasses.replace(_tiny(module, tmp_path / "a", **base), eval_every=None))
    module.main(_tiny(module, tmp_path / "b", **base))  # eval_every=0: no evaluation until the final one
    steps = [line.split(",")[0] for line in (tmp_path / "a" / "run" / "curve.csv").read_text().splitlines()[1:]]
    assert steps == [str(s) for s in range(2, 21, 2)]  # 9 in-training evaluations and the final one
    a, b = (torch.load(tmp_path / d / "run" / "checkpoint.pt", weights_only=False) for d in "ab")
    assert a["agents"].keys() == b["agents"].keys()
    assert all(torch.equal(a["agents"][k], b["agents"][k]) for k in a["agents"])
    assert module.Args().checkpoint_every <= 1_000  # a 5k-step run checkpoints before its end
