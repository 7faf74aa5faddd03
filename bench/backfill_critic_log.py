"""Give a record made before envs.CriticLog existed its training.csv and divergence verdict, from its run's
tensorboard log (losses logged every 1000 steps), so that results.py can tell a diverged critic from a learning one.

    python bench/backfill_critic_log.py <record folder> <run folder with the events file>

Only what the run itself logged is used: `losses/q_loss` (IQL / MAIQL: the two heads' summed mean squared TD
errors), or `losses/td_loss` / `losses/critic_loss` with `losses/q_mean` for the TD3 / CQL family. A run that did not
log its critic's mean value gets that column empty, so its verdict rests on the TD-loss bound alone (weaker: it
fires later, never earlier). The record's summary.json gains critic_value_bound, critic_diverged and
critic_log_backfilled (where the numbers came from); nothing else in it changes.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import envs  # noqa: E402

# per script: the TD-loss tag, how many mean squared errors it sums (given n agents), the reward scale it trained on
TD_TAGS = {"iql": ("losses/q_loss", lambda n: 2), "maiql": ("losses/q_loss", lambda n: 2),
           "icql": ("losses/td_loss", lambda n: 2 * n), "omar": ("losses/td_loss", lambda n: 2 * n),
           "itd3bc": ("losses/critic_loss", lambda n: 2 * n), "matd3bc": ("losses/critic_loss", lambda n: 2)}


def main(record_dir: str, run_dir: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record, summary_path = pathlib.Path(record_dir), pathlib.Path(record_dir) / "summary.json"
    summary = json.loads(summary_path.read_text())
    method, config = summary["method"], summary["config"]
    if method not in TD_TAGS:
        raise SystemExit(f"{method}: no critic to check")
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    td_tag, terms = TD_TAGS[method]
    td = {e.step: e.value for e in events.Scalars(td_tag)}
    value = {e.step: e.value for e in events.Scalars("losses/q_mean")} if "losses/q_mean" in tags else {}
    data = envs.load_dataset(summary["env"], config["dataset"], summary["obs"], history_len=1)
    rewards = data.rewards
    if summary["env"] == "ant" and config.get("normalize_rewards") and method in ("iql", "maiql"):
        returns = data.episode_returns()  # the scale the run trained on (iql.py / maiql.py)
        rewards = rewards * float(1000.0 / max(returns.max() - returns.min(), 1e-6))
    log = envs.CriticLog(record, rewards, config["gamma"], td_terms=terms(data.n_agents))
    for step in sorted(td):
        log.add(step, td_loss=td[step], value_mean=value.get(step, float("nan")))
    summary.update(log.record_fields(), critic_log_backfilled=(
        f"training.csv and this verdict added afterwards by bench/backfill_critic_log.py from the run's tensorboard "
        f"log ({td_tag}" + (", losses/q_mean" if value else "; no mean value was logged") + ")"))
    envs.write_summary(record, summary)
    print(f"{record}: value bound {log.value_bound:.4g}, TD bound {log.td_bound:.4g}; diverged: {summary['critic_diverged']}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
