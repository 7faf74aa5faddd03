#!/usr/bin/env bash
# Reproduce the paper's tables with one command:
#
#   ./run_all.sh            # Tables 3, 4a and 4b, then print them
#   ./run_all.sh 3          # only Table 3 (Iterated Coordination Game, minutes)
#   ./run_all.sh 4a         # only Table 4a (two-agent Reacher)
#   ./run_all.sh 4b         # only Table 4b (four-agent Ant; many CPU hours, see README)
#   ./run_all.sh table      # only print the tables from the finished runs in runs/
#
# Every cell of the tables runs in its own folder runs/paper/<env>__<obs>__<dataset>__<algorithm>__<seed>: a
# finished run (summary.json there) is skipped, a stopped one (checkpoint.pt, no summary) is resumed, so the
# script can be stopped and restarted at any time without losing work. The tables are printed from
# runs/paper only, so a quick experiment of yours elsewhere in runs/ (other budgets) never enters them. Extra flags after the table name go to every script
# (e.g. `./run_all.sh 4b --cuda`). Seeds: SEEDS_GAME (default 10 seeds, as the paper) and SEEDS_MUJOCO
# (default 3 seeds, as the paper).
set -euo pipefail
cd "$(dirname "$0")"
WHAT=${1:-all}
shift || true
EXTRA=("$@")
SEEDS_GAME=${SEEDS_GAME:-"1 2 3 4 5 6 7 8 9 10"}
SEEDS_MUJOCO=${SEEDS_MUJOCO:-"1 2 3"}
PAPER_RUNS=runs/paper
export HF_HUB_OFFLINE=1

# run SCRIPT ENV OBS DATASET SEED [flags...]: one training run unless it already finished.
run() {
  local script=$1 env=$2 obs=$3 dataset=$4 seed=$5
  shift 5
  local exp=${script%.py}
  for flag in "$@"; do case $flag in --finetune) exp=maiql_ft ;; --mixer) exp=matd3bc ;; esac; done
  local dir="$PAPER_RUNS/${env}__${obs}__${dataset}__${exp}__${seed}"
  if [ -f "$dir/summary.json" ]; then
    echo "done already: $dir"
    return
  fi
  local resume=()
  [ -f "$dir/checkpoint.pt" ] && resume=(--resume)
  echo ">>> python $script --env $env --obs $obs --dataset $dataset --seed $seed --exp-name $exp --run-dir $dir ${resume[*]:-} $* ${EXTRA[*]:-}"
  python "$script" --env "$env" --obs "$obs" --dataset "$dataset" --seed "$seed" --exp-name "$exp" --run-dir "$dir" \
    "${resume[@]}" "$@" "${EXTRA[@]}"
}

table3() {  # Iterated Coordination Game: IQL, MAIQL, IBC, MOMA-PPO on the three datasets
  for script in moma_ppo.py iql.py ibc.py maiql.py; do
    for dataset in favorable neutral unfavorable; do
      for seed in $SEEDS_GAME; do
        run "$script" coordination full "$dataset" "$seed"
      done
    done
  done
}

table4a() {  # two-agent Reacher, expert-mix dataset, three observation functions
  for obs in all-observant independent leader-only; do
    for seed in $SEEDS_MUJOCO; do
      [ "$obs" = all-observant ] && run iql.py reacher "$obs" expert-mix "$seed"  # centralised: FO only
      run maiql.py reacher "$obs" expert-mix "$seed"
      run itd3bc.py reacher "$obs" expert-mix "$seed" --mixer
      run ibc.py reacher "$obs" expert-mix "$seed"
      run itd3bc.py reacher "$obs" expert-mix "$seed"
      run icql.py reacher "$obs" expert-mix "$seed"
      run omar.py reacher "$obs" expert-mix "$seed"
      run moma_ppo.py reacher "$obs" expert-mix "$seed"
    done
  done
}

table4b() {  # four-agent Ant, four datasets, full and partial observability
  for obs in full partial; do
    for dataset in random medium full-replay expert; do
      for seed in $SEEDS_MUJOCO; do
        [ "$obs" = full ] && run iql.py ant "$obs" "$dataset" "$seed"
        run maiql.py ant "$obs" "$dataset" "$seed"
        run maiql.py ant "$obs" "$dataset" "$seed" --finetune
        run ibc.py ant "$obs" "$dataset" "$seed"
        run itd3bc.py ant "$obs" "$dataset" "$seed"
        run icql.py ant "$obs" "$dataset" "$seed"
        run omar.py ant "$obs" "$dataset" "$seed"
        run moma_ppo.py ant "$obs" "$dataset" "$seed"
      done
    done
  done
}

print_tables() {  # mean ± standard error over seeds of the final normalised scores, as the paper reports
  PAPER_RUNS=$PAPER_RUNS python - <<'EOF'
import collections, glob, json, math, os
rows = collections.defaultdict(list)
for path in sorted(glob.glob(os.environ["PAPER_RUNS"] + "/*/summary.json")):
    s = json.load(open(path))
    exp = s.get("config", {}).get("exp_name", s["algorithm"])
    rows[(s["env"], s["obs"], s["dataset_id"], exp)].append(s["normalized_score_mean"])
if not rows:
    print(f"no finished runs in {os.environ['PAPER_RUNS']}/")
for env in ("coordination", "reacher", "ant"):
    keys = sorted(k for k in rows if k[0] == env)
    if not keys:
        continue
    algos = sorted({k[3] for k in keys})
    tasks = sorted({k[1:3] for k in keys}, key=lambda t: (t[0], t[1]))
    print(f"\n{env}: normalised score, mean ± s.e.m. over seeds (n seeds)")
    print("| obs | dataset | " + " | ".join(algos) + " |")
    print("|---|---|" + "---|" * len(algos))
    for obs, dataset in tasks:
        cells = []
        for a in algos:
            v = rows.get((env, obs, dataset, a))
            if not v:
                cells.append("")
                continue
            mean = sum(v) / len(v)
            sem = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else 0.0
            cells.append(f"{mean:.2f} ± {sem:.2f} ({len(v)})")
        print(f"| {obs} | {dataset} | " + " | ".join(cells) + " |")
EOF
}

case $WHAT in
  3) table3 ;;
  4a) table4a ;;
  4b) table4b ;;
  all) table3; table4a; table4b ;;
  table) ;;
  *) echo "usage: ./run_all.sh [3|4a|4b|all|table] [extra flags for every script]" >&2; exit 2 ;;
esac
print_tables
