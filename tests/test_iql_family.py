"""Tests of iql.py, maiql.py (+ MAIQL-ft) and ibc.py: the losses that are easy to get wrong, the
discrete-action variants, Table-3 behaviour on the coordination game, and end-to-end smoke runs.

Budget: about a minute on 2 cores (the coordination runs use 64-wide nets and a few hundred steps;
the MuJoCo smoke runs use tiny random datasets written into the session's temporary Minari folder).
"""

import json
import math

import numpy as np
import pytest
import torch

import envs
import ibc
import iql
import maiql

SUMMARY_KEYS = {"algorithm", "env", "obs", "dataset_id", "seed", "config", "eval_episodes", "normalized_score_mean",
                "normalized_score_std", "episode_returns", "episode_normalized_scores", "train_steps", "wall_time_s",
                "git_commit",
                # the run record (docs/reproduction.md): checked against the current code and dataset by results.py
                "method", "budget", "dataset_fingerprint", "code_fingerprint", "episode_lengths"}
# scripts with a learned critic also record its divergence verdict (envs.CriticLog; training.csv beside it)
CRITIC_KEYS = {"critic_value_bound", "critic_diverged"}


# --------------------------------------------------------------------------------------------------
# Losses, by hand
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [iql, maiql])
def test_expectile_loss_hand_computed(module):
    # diff = Q̂ - V: positive errors weigh τ = 0.7, negative ones 1 - τ = 0.3.
    diff = torch.tensor([1.0, -2.0, 0.5])
    expected = (0.7 * 1.0 + 0.3 * 4.0 + 0.7 * 0.25) / 3
    assert module.expectile_loss(diff, 0.7).item() == pytest.approx(expected)
    # τ = 0.5 is half the mean squared error.
    assert module.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * diff.pow(2).mean().item())


def test_expectile_loss_gradient_pushes_v_to_the_expectile():
    # Minimising over a constant V gives the τ-expectile of the samples, above the mean for τ > 0.5.
    q = torch.tensor([0.0, 1.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        maiql.expectile_loss(q - v, 0.7).backward()
        opt.step()
    assert v.item() == pytest.approx(0.7, abs=1e-4)  # 0.7 (1 - v) = 0.3 v  <=>  v = 0.7


@pytest.mark.parametrize("module", [iql, maiql])
def test_awr_weights_are_clipped(module):
    adv = torch.tensor([-1.0, 0.0, 1.0, 2.0, 10.0])
    w = module.awr_weights(adv, beta=3.0, max_weight=100.0)
    assert torch.allclose(w[:3], torch.tensor([math.exp(-3.0), 1.0, math.exp(3.0)]))
    assert w[3].item() == pytest.approx(100.0)  # exp(6) = 403 -> clipped
    assert w[4].item() == pytest.approx(100.0)  # exp(30) -> clipped, not inf
    assert torch.isfinite(module.awr_weights(torch.tensor([1e4]), 3.0)).all()


# --------------------------------------------------------------------------------------------------
# QMIX mixing
# --------------------------------------------------------------------------------------------------
def test_qmix_mixer_is_monotonic_even_with_negative_raw_weights():
    torch.manual_seed(0)
    n, B = 3, 64
    mixer = maiql.Mixer(in_dim=5, n=n, hidden=16)
    with torch.no_grad():  # make the raw weight outputs negative: |w| must still be used
        mixer.net[-1].weight.mul_(-1.0)
        mixer.net[-1].bias.fill_(-1.0)
    m = torch.randn(B, 5)
    q = torch.randn(n, B, requires_grad=True)
    q_tot = mixer(q, m)
    assert q_tot.shape == (B,)
    grad = torch.autograd.grad(q_tot.sum(), q)[0]
    assert (grad >= 0).all() and (grad > 0).any()
    # Hand check: Q_tot = Σ_i |w_i| Q_i + b with (w, b) the raw MLP outputs.
    wb = mixer.net(m)
    expected = (wb[:, :n].abs() * q.T).sum(1) + wb[:, n]
    assert torch.allclose(q_tot, expected, atol=1e-6)
    # Raising one agent's value never lowers the team value.
    assert (mixer(q + torch.eye(n)[0][:, None], m) >= q_tot - 1e-6).all()


def test_unconstrained_mixer_option_reproduces_the_authors_code():
    torch.manual_seed(0)
    mixer = maiql.Mixer(in_dim=2, n=2, hidden=8, monotonic=False)
    m, q = torch.randn(4, 2), torch.randn(2, 4)
    wb = mixer.net(m)
    assert torch.allclose(mixer(q, m), (wb[:, :2] * q.T).sum(1) + wb[:, 2])


def test_normalized_mixer_weights_are_positive_sum_to_n_and_have_no_free_scale():
    torch.manual_seed(0)
    n = 3
    mixer = maiql.Mixer(in_dim=2, n=n, hidden=8, normalized=True)
    m, q = torch.randn(4, 2), torch.randn(n, 4)
    wb = mixer.net(m)
    w = n * torch.softmax(wb[:, :n], dim=1)  # hand check: Q_tot = Σ_i n softmax(w_raw)_i Q_i + b
    assert torch.allclose(mixer(q, m), (w * q.T).sum(1) + wb[:, n], atol=1e-6)
    assert (w > 0).all() and torch.allclose(w.sum(1), torch.full((4,), float(n)))
    with torch.no_grad():  # scaling the raw weights' layer changes the mix, never the weights' total
        mixer.net[-1].weight[:n].mul_(10.0)
    w10 = n * torch.softmax(mixer.net(m)[:, :n], dim=1)
    assert torch.allclose(w10.sum(1), torch.full((4,), float(n)))


def test_mixer_weights_are_the_ones_forward_mixes_with():
    """Mixer.weights gives the effective weights (|w|, w or n·softmax) the critic diagnostics log."""
    torch.manual_seed(0)
    n, m, q = 3, torch.randn(4, 2), torch.randn(3, 4)
    for kwargs in ({}, {"monotonic": False}, {"normalized": True}):
        mixer = maiql.Mixer(in_dim=2, n=n, hidden=8, **kwargs)
        w, b = mixer.weights(m)
        raw = mixer.net(m)
        assert torch.equal(b, raw[:, n])
        assert torch.equal(mixer(q, m), (w.T * q).sum(-2) + b)
        if kwargs.get("normalized"):
            assert torch.allclose(w.sum(1), torch.full((4,), float(n))) and not torch.allclose(w.abs(), raw[:, :n].abs())
        else:
            assert torch.equal(w, raw[:, :n].abs() if not kwargs else raw[:, :n])


def test_critic_diagnostics_log_the_effective_mixer_weights():
    """Under --normalized-mixer-weights the logged mean |w| is that of n·softmax (= 1 exactly), not the raw output's."""
    torch.manual_seed(0)
    n, B = 2, 6
    agents = maiql.MAIQLAgents(n=n, obs_dim=3, action_dim=2, discrete=False, state_dim=4, joint_action_dim=4,
                               hidden=8, history_len=0, history_in=3, history_dim=8, normalized_mixer_weights=True)
    with torch.no_grad():
        agents.q_mixer.net[-1].weight.mul_(50.0)  # raw outputs far from the effective weights
    b = {"obs": torch.randn(n, B, 3), "hist": None, "actions": torch.rand(n, B, 2) * 2 - 1,
         "states": torch.randn(B, 4), "joint_features": torch.randn(B, 4)}
    out = maiql.critic_diagnostics({"agents": agents}, b)
    assert out["q_mixer_abs_w"] == pytest.approx(1.0) and out["v_mixer_abs_w"] == pytest.approx(1.0)
    with torch.no_grad():
        raw = agents.q_mixer.net(torch.cat([b["states"], b["joint_features"]], dim=1))
    assert out["q_mixer_b"] == pytest.approx(float(raw[:, -1].mean()), rel=1e-6)


def test_mixer_applies_to_both_q_heads():
    mixer = maiql.Mixer(in_dim=2, n=2, hidden=8)
    q = torch.randn(2, 2, 5)  # [heads, n, B]
    m = torch.randn(5, 2)
    out = mixer(q, m)
    assert out.shape == (2, 5)
    assert torch.allclose(out[1], mixer(q[1], m))


# --------------------------------------------------------------------------------------------------
# Networks: discrete variants, tanh-Gaussian log-prob, batched per-agent encoder
# --------------------------------------------------------------------------------------------------
def test_discrete_maiql_agents_log_prob_and_greedy():
    torch.manual_seed(0)
    agents = maiql.MAIQLAgents(n=2, obs_dim=1, action_dim=2, discrete=True, state_dim=1, joint_action_dim=4,
                               hidden=8, history_len=0, history_in=3, history_dim=8)
    x = torch.randn(2, 5, 1)
    a = torch.randint(0, 2, (2, 5))
    logits = agents.policy(x)
    assert torch.allclose(agents.log_prob(x, a), torch.log_softmax(logits, -1).gather(-1, a[..., None]).squeeze(-1))
    assert torch.equal(agents.act(x, greedy=True), logits.argmax(-1))
    q = agents.q_values(x, a)
    assert q.shape == (2, 2, 5)
    full = agents.q(x.repeat(2, 1, 1)).reshape(2, 2, 5, 2)
    assert torch.allclose(q, full.gather(-1, a[None, ..., None].expand(2, -1, -1, 1)).squeeze(-1))


def test_tanh_gaussian_log_prob_hand_computed():
    agents = maiql.MAIQLAgents(n=1, obs_dim=1, action_dim=1, discrete=False, state_dim=1, joint_action_dim=1,
                               hidden=4, history_len=0, history_in=2, history_dim=8)
    with torch.no_grad():  # policy output = (mean 0.2, log_std -0.5) whatever the input
        for w in agents.policy.weights:
            w.zero_()
        agents.policy.biases[-1].copy_(torch.tensor([[[0.2, -0.5]]]))
    a = torch.tensor([[[0.3]]])
    u, std = math.atanh(0.3), math.exp(-0.5)
    expected = -0.5 * ((u - 0.2) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi) - math.log(1 - 0.09 + 1e-5)
    assert agents.log_prob(torch.zeros(1, 1, 1), a).item() == pytest.approx(expected, rel=1e-5)
    # Actions on the bound are finite (clipped to 1 - 1e-5 before atanh).
    assert torch.isfinite(agents.log_prob(torch.zeros(1, 1, 1), torch.ones(1, 1, 1))).all()


def test_history_encoder_is_per_agent():
    torch.manual_seed(0)
    enc = maiql.AgentsHistoryEncoder(n=3, in_dim=5, length=10, d=16)
    h = torch.randn(3, 4, 10, 5)
    out = enc(h)
    assert out.shape == (3, 4, 16)
    h2 = h.clone()
    h2[1] += 1.0  # change agent 1's histories only
    out2 = enc(h2)
    assert torch.allclose(out[0], out2[0]) and torch.allclose(out[2], out2[2])
    assert not torch.allclose(out[1], out2[1])
    # Batch rows do not interact.
    assert torch.allclose(enc(h[:, :1]), out[:, :1], atol=1e-6)


def test_one_encoder_pass_over_two_batches_equals_two_passes():
    # maiql.update runs the target encoder once on the histories at s and s' stacked along the batch.
    torch.manual_seed(0)
    enc = maiql.AgentsHistoryEncoder(n=3, in_dim=5, length=10, d=16)
    h, h_next = torch.randn(3, 4, 10, 5), torch.randn(3, 4, 10, 5)
    both = enc(torch.cat([h, h_next], 1))
    assert torch.allclose(both[:, :4], enc(h), atol=1e-6) and torch.allclose(both[:, 4:], enc(h_next), atol=1e-6)


def test_maiql_soft_update_is_lerp_with_tau():
    target, source = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([[1.0, 2.0]])), target.bias.fill_(4.0)
        source.weight.copy_(torch.tensor([[3.0, -2.0]])), source.bias.fill_(0.0)
    maiql.soft_update(target, source, 0.25)
    assert target.weight.tolist() == [[1.5, 1.0]] and target.bias.tolist() == [3.0]


def test_iql_coordination_heads_score_the_joint_action_taken():
    """Centralised IQL on the game has one output per joint action (4 = 2 x 2): q_values reads each Q head at the
    joint action taken, the greedy joint action is the policy's argmax, log π is the log-softmax at the action."""
    agent = iql.IQLAgent(state_dim=1, action_dim=4, discrete=True, hidden=8, history_len=0, history_in=5, history_dim=8)
    q1, q2 = torch.tensor([0.1, 0.7, -0.3, 0.2]), torch.tensor([0.5, -0.2, 0.9, 0.0])
    logits = torch.tensor([0.2, -1.0, 1.5, 0.3])
    with torch.no_grad():  # outputs that do not depend on the state: last layers' weights 0, biases as above
        agent.q.weights[-1].zero_()
        agent.q.biases[-1].copy_(torch.stack([q1, q2])[:, None, :])
        agent.policy.weights[-1].zero_()
        agent.policy.biases[-1].copy_(logits[None, None, :])
    x = agent.features(torch.rand(6, 1), None)
    taken = torch.tensor([0, 1, 2, 3, 2, 0])
    assert torch.allclose(agent.q_values(x, taken), torch.stack([q1[taken], q2[taken]]))
    assert agent.greedy(x).tolist() == [2] * 6  # both agents right: the largest logit
    assert torch.allclose(agent.log_prob(x, taken), torch.log_softmax(logits, -1)[taken])


# --------------------------------------------------------------------------------------------------
# Table 3 on the coordination game, at a tiny budget
# --------------------------------------------------------------------------------------------------
def _coordination(module, dataset, steps, tmp_path, seed=1):
    args = module.Args(env="coordination", dataset=dataset, seed=seed, total_steps=steps, hidden=64,
                       eval_every=0, eval_episodes=10, checkpoint_every=0, run_dir=str(tmp_path / f"{module.__name__}-{dataset}"))
    return module.main(args)


def test_table3_iql_solves_unfavorable(tmp_path):
    summary = _coordination(iql, "unfavorable", 400, tmp_path)
    assert summary["normalized_score_mean"] == pytest.approx(1.0)
    assert set(summary) == SUMMARY_KEYS | CRITIC_KEYS


def test_table3_ibc_fails_unfavorable(tmp_path):
    # Agent 1 mostly goes left, agent 2 mostly right: each copies its majority action, never agreeing.
    summary = _coordination(ibc, "unfavorable", 300, tmp_path)
    assert summary["normalized_score_mean"] == pytest.approx(0.0)


def test_table3_maiql_solves_favorable(tmp_path):
    summary = _coordination(maiql, "favorable", 400, tmp_path)
    assert summary["normalized_score_mean"] == pytest.approx(1.0)
    assert summary["algorithm"] == "maiql"
    # a learning critic: rewards are 0 or 1, so values stay within 1 / (1 - 0.99) = 100, and the verdict is None
    assert summary["critic_value_bound"] == pytest.approx(100.0) and summary["critic_diverged"] is None
    log = (tmp_path / "maiql-favorable" / "training.csv").read_text().splitlines()
    assert log[0].split(",")[:3] == list(envs.CRITIC_COLUMNS) and log[0].split(",")[3:] == list(maiql.CRITIC_EXTRA_COLUMNS)
    assert [int(line.split(",")[0]) for line in log[1:]] == [400]  # every 1000 steps and at the last one


# --------------------------------------------------------------------------------------------------
# MuJoCo smoke runs on tiny random datasets (written to the session's temporary Minari folder)
# --------------------------------------------------------------------------------------------------
SMOKE = [(m, "reacher", o, "expert-mix") for m in (maiql, ibc) for o in envs.OBS_FUNCTIONS["reacher"]]
SMOKE += [(m, "ant", o, "random") for m in (maiql, ibc) for o in envs.OBS_FUNCTIONS["ant"]]
SMOKE += [(iql, "reacher", "leader-only", "expert-mix"), (iql, "ant", "partial", "random")]


@pytest.mark.parametrize("module,env,obs,dataset", SMOKE, ids=lambda v: getattr(v, "__name__", v))
def test_smoke_mujoco(module, env, obs, dataset, tiny_mujoco_datasets, tmp_path):
    args = module.Args(env=env, obs=obs, dataset=dataset, seed=0, total_steps=6, batch_size=32, hidden=16,
                       history_dim=8, eval_every=3, eval_episodes=1, checkpoint_every=3, run_dir=str(tmp_path / "run"))
    summary = module.main(args)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Reacher records also keep each greedy episode's agent conventions (Table 4a's mechanism)
    assert set(on_disk) == SUMMARY_KEYS | ({"conventions"} if env == "reacher" else set()) | (
        CRITIC_KEYS if module is not ibc else set())
    assert (tmp_path / "run" / "training.csv").exists() == (module is not ibc)
    assert on_disk["train_steps"] == 6 and on_disk["obs"] == obs
    if env == "reacher":
        assert len(on_disk["conventions"]["agents"]) == 1 and 0 <= on_disk["conventions"]["same_share"] <= 1
    assert np.isfinite(summary["normalized_score_mean"]) and len(summary["episode_returns"]) == 1
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    weights = ck["agent" if module is iql else "agents"]
    uses_history = any(k.startswith("encoder.") for k in weights)
    # The 10-step history encoder conditions the decentralised agents on partially observable tasks.
    assert uses_history == (module is not iql and (env, obs) in envs.PARTIALLY_OBSERVABLE)


def test_maiql_finetune_adds_online_data_and_resumes(tiny_mujoco_datasets, tmp_path):
    run = tmp_path / "ft"
    common = dict(env="reacher", obs="leader-only", dataset="expert-mix", seed=0, batch_size=32, hidden=16,
                  history_dim=8, eval_every=0, eval_episodes=1, populate_every=2, run_dir=str(run))
    summary = maiql.main(maiql.Args(total_steps=8, finetune=True, checkpoint_every=4, **common))
    assert summary["algorithm"] == "maiql-ft" and summary["train_steps"] == 16  # offline + as many fine-tuning steps
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    n_offline = len(envs.load_dataset("reacher", "expert-mix", "leader-only"))
    online = ck["online"]["rewards"].shape[0]
    assert online == n_offline  # reacher never terminates: exactly as many online as offline transitions
    # Online histories point at real rows (dataset or this rollout), never past the filled part.
    index = ck["online"]["hist_index"]
    pad_row = n_offline + n_offline + 10 + 1 - 1  # offline rows, capacity (N + rollout_length), then padding
    assert ((index < n_offline + online) | (index == pad_row)).all()
    assert (index >= n_offline).any() and (index < n_offline).any()  # rollout steps after a dataset history
    resumed = maiql.main(maiql.Args(total_steps=10, finetune=True, checkpoint_every=0, resume=True, **common))
    assert resumed["train_steps"] == 20


def test_a_copied_script_files_its_runs_under_its_own_name(tmp_path, monkeypatch):
    """exp_name, the summary's algorithm and method, the record's folder and the code fingerprint come from the
    script's file name (CleanRL's convention): a copy never files its results under the original's name."""
    import importlib.util
    import shutil
    import sys

    copy = tmp_path / "ibc_v2.py"
    shutil.copy(ibc.__file__, copy)
    spec = importlib.util.spec_from_file_location("ibc_v2", copy)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ibc_v2", module)
    spec.loader.exec_module(module)
    assert module.Args().exp_name == "ibc_v2" and ibc.Args().exp_name == "ibc"
    summary = module.main(module.Args(env="coordination", dataset="favorable", seed=1, total_steps=20, hidden=16,
                                      eval_every=0, eval_episodes=2, checkpoint_every=0, run_dir=str(tmp_path / "run"),
                                      results_dir=str(tmp_path / "results")))
    assert summary["algorithm"] == summary["method"] == "ibc_v2"
    assert set(summary["code_fingerprint"]) == {"ibc_v2.py", "envs.py"}
    assert summary["code_fingerprint"]["ibc_v2.py"] == envs.file_hash(copy)
    assert (tmp_path / "results" / "coordination__full__favorable__ibc_v2__1" / "summary.json").exists()


def test_bad_input_is_a_moma_error(tmp_path):
    with pytest.raises(envs.MomaError, match="observation function"):
        maiql.main(maiql.Args(env="reacher", obs="partial", run_dir=str(tmp_path / "x")))
    with pytest.raises(envs.MomaError, match="resume"):
        ibc.main(ibc.Args(env="coordination", resume=True, run_dir=str(tmp_path / "missing")))
    with pytest.raises(envs.MomaError, match="total-steps"):
        iql.main(iql.Args(env="coordination", total_steps=0, run_dir=str(tmp_path / "y")))


# --------------------------------------------------------------------------------------------------
# --bf16: bfloat16 matrix products under torch.autocast, output layers in fp32
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [maiql, ibc, iql])
def test_bf16_networks_keep_fp32_outputs(module):
    """Under bfloat16 autocast the hidden layers run in bfloat16 but every network's output layer (and MAIQL's
    mixer head) in fp32: the outputs are fp32 and equal the fp32 network's within bfloat16's precision."""
    torch.manual_seed(0)
    net = module.AgentsMLP(3, [12, 64, 64, 4])
    x = torch.randn(3, 128, 12)
    ref = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)
    if module is maiql:
        mixer = maiql.Mixer(10, 3, 32)
        values, m = 300 + torch.randn(2, 3, 16), torch.randn(16, 10)
        ref = mixer(values, m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mixer(values, m)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.5)


@pytest.mark.parametrize("module", [maiql, ibc, iql])
def test_bf16_smoke(module, tiny_mujoco_datasets, tmp_path):
    """--bf16 end to end on partially observable Ant (history encoders): trains, evaluates, records the flag."""
    args = module.Args(env="ant", obs="partial", dataset="random", seed=0, total_steps=6, batch_size=32, hidden=16,
                       history_dim=8, eval_every=0, eval_episodes=1, checkpoint_every=3, run_dir=str(tmp_path / "run"),
                       bf16=True)
    summary = module.main(args)
    assert summary["train_steps"] == 6 and np.isfinite(summary["normalized_score_mean"])
    assert summary["config"]["bf16"] is True
