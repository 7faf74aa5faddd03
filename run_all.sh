#!/usr/bin/env bash
# Reproduce the paper's tables with one command:
#
#   ./run_all.sh            # Tables 3, 4a and 4b, then docs/results.md
#   ./run_all.sh 3          # only Table 3 (Iterated Coordination Game)
#   ./run_all.sh 4a         # only Table 4a (two-agent Reacher)
#   ./run_all.sh 4b         # only Table 4b (four-agent Ant; many CPU hours)
#   ./run_all.sh ablation   # the §6.3 ablation: MOMA-PPO's penalty and adaptive rollouts, ant full-replay FO and PO
#   ./run_all.sh plan 4b    # only print what `./run_all.sh 4b` would do (cells, done, estimated CPU hours)
#   ./run_all.sh crossplay  # Table 4a's cross-play: each finished seed's agents in teams with the other seeds'
#   ./run_all.sh table      # only write docs/results.md from the records in results/
#   ./run_all.sh plots      # only draw the learning curves docs/plots/*.png from results/ (and rewrite docs/results.md)
#
# Budgets: BUDGET=quick (default: a few CPU hours per table on a 2-core machine, except Table 4b, see the plan),
# BUDGET=default (the scripts' own defaults, as the earlier hand runs of results/legacy.md) or BUDGET=paper
# (the paper's protocol: 1M gradient steps as the authors' code, MOMA-PPO at its presets). The flags of each budget are in
# budget_flags below; the plan printed before anything runs gives the cells, what is done and the estimated
# CPU hours (speeds measured here, results.py SECONDS_PER_STEP).
#
# Every cell runs in its own folder runs/run_all/<budget>/<env>__<obs>__<dataset>__<method>__<seed> and, when it
# finishes, copies its small record (summary.json, curve.csv, command.txt) to results/<table>/<same name>/, which
# is committed. A cell whose record is in results/ at this budget is skipped, a stopped one (checkpoint.pt, no
# summary) is resumed, so the script can be stopped and restarted at any time. A record made at another budget is
# replaced (git keeps the old one); tables are written per budget and never mix them. A done cell whose record is
# stale (its code or dataset changed since) is kept and flagged in the tables; REFRESH_STALE=1 runs it again. Extra flags after the
# target go to every script (e.g. `./run_all.sh 4b --cuda`, `./run_all.sh 3 --torch-threads 1`). Seeds:
# SEEDS_GAME (default 10 seeds, as the paper) and SEEDS_MUJOCO (default 3 seeds, as the paper).
# JOBS=N runs N cells at once (logs in runs/run_all/<budget>/logs/); give each its share of the cores, e.g.
# `JOBS=2 ./run_all.sh diagnosis --torch-threads 1` on a 2-core machine.
# ONLY="favorable__iql__ ..." keeps only the cells whose name (<env>__<obs>__<dataset>__<method>__<seed>) contains
# one of these strings. RESULTS=<dir> and RUNS=<dir> move the records and the run folders (default results and
# runs/run_all/<budget>; relative to the repository); with another RESULTS docs/results.md is not rewritten.
#
# On a Slurm cluster: `./run_all.sh 4b --slurm [--partition P] [--account A] [--time T] [--mem M] [--gres G] [--dry-run]`
# writes runs/run_all/<budget>/slurm/<target>-<date>/ (cells.txt, array.sbatch, submit.sh) and submits one array
# task per cell that is not done: each task runs `./run_all.sh --cell cells.txt <task id>`, i.e. exactly what the
# local run would run for that cell (done: skipped, stopped: resumed, record copied to results/). CPUs, memory and
# time per task come from the cost estimates of the plan (results.py), one sbatch per resource class; a prepare job
# builds the missing datasets and world models first. --dry-run only writes the folder. slurm.py has the details.
# The whole script is one brace group, which bash reads to its closing brace before running any of it: an edit saved
# while a run is going on then cannot change what that run executes (bash otherwise reads a script as it goes).
{
set -euo pipefail
cd "$(dirname "$0")"
WHAT=${1:-all}
shift || true
PLAN_ONLY=0
if [ "$WHAT" = plan ]; then
  PLAN_ONLY=1
  WHAT=${1:-all}
  shift || true
fi
CELL_FILE="" CELL_LINE=""
if [ "$WHAT" = --cell ]; then  # ./run_all.sh --cell FILE N [extra flags]: the cell on line N of FILE (a Slurm task)
  [ $# -ge 2 ] || { echo "usage: ./run_all.sh --cell CELLS_FILE LINE [extra flags]" >&2; exit 2; }
  CELL_FILE=$1 CELL_LINE=$2
  shift 2
fi
SLURM=0
SBATCH_OPTS=()  # --partition, --account, --time, --mem, --gres: for sbatch, not for the scripts
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --slurm) SLURM=1 ;;
    --dry-run) SBATCH_OPTS+=("$1") ;;
    --partition | --account | --time | --mem | --gres)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      SBATCH_OPTS+=("$1=$2")
      shift ;;
    --partition=* | --account=* | --time=* | --mem=* | --gres=*) SBATCH_OPTS+=("$1") ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done
if [ $SLURM = 0 ] && [ ${#SBATCH_OPTS[@]} -gt 0 ]; then
  echo "error: ${SBATCH_OPTS[0]} is an option of --slurm" >&2
  exit 2
fi
BUDGET=${BUDGET:-quick}
SEEDS_GAME=${SEEDS_GAME:-"1 2 3 4 5 6 7 8 9 10"}
SEEDS_MUJOCO=${SEEDS_MUJOCO:-"1 2 3"}
RESULTS=${RESULTS:-results}
RUNS=${RUNS:-runs/run_all/$BUDGET}
NAME_CACHE=${NAME_CACHE:-${MOMA_CACHE_DIR:-data/cache}/run_all_method_names.tsv}  # method_of's answers, see there
NAME_CODE=""  # no cache where the files are not all here (a partial copy of the repository): ask every time
if [ -f moma_ppo.py ] && [ -f envs.py ] && [ -f world_model.py ]; then
  NAME_CODE=$(cat moma_ppo.py envs.py world_model.py | sha1sum | cut -c1-16)
fi
ONLY=${ONLY:-}
STALE_FILE=${STALE_FILE:-}  # the done-but-stale cells (REFRESH_STALE=1 runs them again); written by the plan
JOBS=${JOBS:-1}  # cells run at once (e.g. JOBS=2 with --torch-threads 1 on 2 cores: each cell alone on a core)
FAILED=0
# Background cells (JOBS > 1) ignore Ctrl-C in a script: stop them with it (they resume from their checkpoints).
trap 'kill $(jobs -p) 2>/dev/null; exit 130' INT TERM
PLAN_FILE=""
export HF_HUB_OFFLINE=1

case $BUDGET in
  quick | default | paper) ;;
  *) echo "error: unknown BUDGET=$BUDGET (quick, default or paper)" >&2; exit 2 ;;
esac

# budget_flags SCRIPT ENV OBS: the training-length flags of one cell at $BUDGET (and denser evaluations where the
# run is short, so its learning curve has points).
budget_flags() {
  local script=$1 env=$2 obs=$3 po=0
  case $obs in independent | leader-only | partial) po=1 ;; esac
  case $BUDGET in
    default) ;;  # the scripts' defaults
    paper)  # the authors' 1,000,001 gradient steps; MOMA-PPO's presets (the paper does not state its iterations)
      [ "$script" = moma_ppo.py ] || echo "--total-steps 1000000 --eval-every 50000" ;;
    quick)  # a smoke-scale reproduction: checks the pipeline and the rough ordering, far from convergence
      local steps=5000 cql_steps=1000 iterations=50
      [ "$env" = ant ] && steps=2000 cql_steps=500 iterations=80  # MOMA-PPO's Ant preset
      [ $po = 1 ] && steps=1000 cql_steps=250  # the history encoder dominates the cost
      if [ "$script" = moma_ppo.py ]; then
        if [ "$env" = coordination ]; then echo "--eval-every 2"; else echo "--iterations $iterations --eval-every 5"; fi
      elif [ "$env" = coordination ]; then  # solved (or failed for good) after ~1k steps
        echo "--total-steps 1000 --eval-every 100"
      elif [ "$script" = icql.py ] || [ "$script" = omar.py ]; then  # ~30x the cost of a TD3 step (CQL samples)
        echo "--total-steps $cql_steps --eval-every $((cql_steps / 4))"
      else
        echo "--total-steps $steps --eval-every $((steps / 4))"
      fi ;;
  esac
}

# method_of SCRIPT ENV OBS [flags...]: the method name the script gives its record (moma_ppo.py's method_name).
method_of() {
  local script=$1 method=${1%.py} env=$2 obs=$3
  shift 3
  # MAIQL-ft and MATD3+BC (maiql.py --finetune, itd3bc.py --mixer), named as the scripts name them
  for flag in "$@"; do case $flag in --finetune) method=${method}_ft ;; --mixer) method=ma${method#i} ;; esac; done
  if [ "$method" = moma_ppo ]; then
    local other=0
    for flag in "$@"; do case $flag in --penalty | aleatoric | --no-adaptive-rollout) ;; *) other=1 ;; esac; done
    if [ $other = 1 ]; then  # any other setting: ask moma_ppo.py itself (it names every changed setting)
      # Each ask is a Python start that imports torch (1.5-3 s), for every such row in the plan pass and again in the
      # run pass: ~4 of an Ant diagnosis cell's 15 minutes went on naming the table's 70 rows. So the answers are
      # kept in NAME_CACHE, keyed by the code that makes them (NAME_CODE: a hash of moma_ppo.py, envs.py and world_model.py).
      local key="${NAME_CODE:-} $env $obs $*" name=""
      if [ -n "${NAME_CACHE:-}" ] && [ -n "${NAME_CODE:-}" ] && [ -f "$NAME_CACHE" ]; then
        name=$(awk -F '\t' -v k="$key" '$1 == k { print $2; exit }' "$NAME_CACHE")
      fi
      if [ -z "$name" ]; then
        name=$(python -c "import sys, moma_ppo; print(moma_ppo.method_name_from_argv(sys.argv[1:]))" --env "$env" --obs "$obs" "$@") || return
        if [ -n "$name" ] && [ -n "${NAME_CACHE:-}" ] && [ -n "${NAME_CODE:-}" ]; then
          mkdir -p "$(dirname "$NAME_CACHE")"
          printf '%s\t%s\n' "$key" "$name" >> "$NAME_CACHE"  # one short line: appends from two run_all.sh do not mix
        fi
      fi
      echo "$name"
      return
    fi
    for flag in "$@"; do [ "$flag" = aleatoric ] && method="$method-aleatoric"; done
    for flag in "$@"; do [ "$flag" = --no-adaptive-rollout ] && method="$method-no_adaptive_rollout"; done
  fi
  echo "$method"
}

# running PIDFILE: is the run_all.sh named in a cell's pid file ("pid [host [Slurm job]]") still running that cell?
# A Slurm job is asked of Slurm (its task may run on another node); a pid only on its own host.
running() {
  local pid host job
  read -r pid host job < "$1" || true
  if [ -n "$job" ]; then
    [ -n "$(squeue -h -j "$job" -t RUNNING,COMPLETING 2>/dev/null)" ]
  elif [ -n "$host" ] && [ "$host" != "$HOSTNAME" ]; then
    echo "note: $1 names pid $pid on $host; not this machine's, so not checked" >&2
    return 1
  else
    kill -0 "$pid" 2>/dev/null
  fi
}

# run TABLE SCRIPT ENV OBS DATASET SEED [flags...]: one table cell unless its record is already in results/.
run() {
  local table=$1 script=$2 env=$3 obs=$4 dataset=$5 seed=$6
  shift 6
  local method name
  method=$(method_of "$script" "$env" "$obs" "$@")
  name="${env}__${obs}__${dataset}__${method}__${seed}"
  if [ -n "$ONLY" ]; then
    local want keep=0
    for want in $ONLY; do case $name in *"$want"*) keep=1 ;; esac; done
    [ $keep = 1 ] || return 0
  fi
  local flags
  read -r -a flags <<< "$(budget_flags "$script" "$env" "$obs")"
  flags+=("$@")
  if [ -n "$PLAN_FILE" ]; then
    echo "$table $script $env $obs $dataset $seed $method ${flags[*]}" >> "$PLAN_FILE"
    # the same cell as run()'s arguments, quoted (line for line): what a Slurm task gives run()
    { printf '%q ' "$table" "$script" "$env" "$obs" "$dataset" "$seed" "$@"; echo; } >> "$PLAN_FILE.args"
    return
  fi
  local record="$RESULTS/$table/$name/summary.json" dir="$RUNS/$name"
  if [ -f "$record" ] && grep -q "\"budget\": \"$BUDGET\"" "$record"; then
    if [ "${REFRESH_STALE:-0}" = 1 ] && grep -qx "$table/$name" "$STALE_FILE"; then
      echo "stale, run again: $RESULTS/$table/$name"
      [ -d "$dir" ] && mv "$dir" "$dir.stale-$(date +%s)"  # keep the old run (its checkpoints) aside, start afresh
    else
      echo "done already: $RESULTS/$table/$name"
      return
    fi
  fi
  if [ -f "$dir/summary.json" ]; then  # finished, but its record is not in results/ (e.g. results/ was reset)
    echo "recording the finished run $dir"
    python -c "import envs, sys; envs.save_record(*sys.argv[1:])" "$dir" "$RESULTS/$table" "$name"
    return
  fi
  # A cell another run_all.sh is running right now (its pid in runs/run_all/<budget>/<cell>.pid) is left to it.
  local pidfile="$RUNS/$name.pid"
  if [ -f "$pidfile" ] && running "$pidfile"; then
    local who
    read -r -a who < "$pidfile" || true
    echo "running already (pid ${who[0]}${who[1]:+ on ${who[1]}}${who[2]:+, Slurm job ${who[2]}}): $name"
    return
  fi
  local resume=()
  [ -f "$dir/checkpoint.pt" ] && resume=(--resume)
  local cmd=(python "$script" --env "$env" --obs "$obs" --dataset "$dataset" --seed "$seed" --exp-name "$method"
             --run-dir "$dir" --results-dir "$RESULTS/$table" --budget "$BUDGET" "${resume[@]}" "${flags[@]}" "${EXTRA[@]}")
  if [ "$JOBS" -gt 1 ]; then  # JOBS cells at a time, each logging to runs/run_all/<budget>/logs/<cell>.log
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || FAILED=$((FAILED + 1)); done
    echo ">>> ${cmd[*]}  (log: $RUNS/logs/$name.log)"
    mkdir -p "$RUNS/logs"
    "${cmd[@]}" >> "$RUNS/logs/$name.log" 2>&1 &
    echo "$! $HOSTNAME" > "$pidfile"
  else
    echo ">>> ${cmd[*]}"
    mkdir -p "$RUNS"
    echo "$$ $HOSTNAME ${SLURM_JOB_ID:-}" > "$pidfile"
    "${cmd[@]}"
    rm -f "$pidfile"
  fi
}

table3() {  # Iterated Coordination Game: IQL, MAIQL, IBC, MOMA-PPO on the three datasets
  for script in moma_ppo.py iql.py ibc.py maiql.py; do
    for dataset in favorable neutral unfavorable; do
      for seed in $SEEDS_GAME; do
        run 3 "$script" coordination full "$dataset" "$seed"
      done
    done
  done
}

table4a() {  # two-agent Reacher, expert-mix dataset, three observation functions
  for obs in all-observant independent leader-only; do
    for seed in $SEEDS_MUJOCO; do
      [ "$obs" = all-observant ] && run 4a iql.py reacher "$obs" expert-mix "$seed"  # centralised: FO only
      run 4a maiql.py reacher "$obs" expert-mix "$seed"
      run 4a itd3bc.py reacher "$obs" expert-mix "$seed" --mixer
      run 4a ibc.py reacher "$obs" expert-mix "$seed"
      run 4a itd3bc.py reacher "$obs" expert-mix "$seed"
      run 4a icql.py reacher "$obs" expert-mix "$seed"
      run 4a omar.py reacher "$obs" expert-mix "$seed"
      run 4a moma_ppo.py reacher "$obs" expert-mix "$seed"
    done
  done
}

table4b() {  # four-agent Ant, four datasets, full and partial observability
  # medium and full-replay first (the datasets the paper's strategy claims are about), every method of a seed before
  # the next seed, the cheapest methods first: a partial table already compares methods on the same seeds
  for dataset in medium full-replay expert random; do
    for seed in $SEEDS_MUJOCO; do
      for obs in full partial; do
        run 4b moma_ppo.py ant "$obs" "$dataset" "$seed"
        run 4b itd3bc.py ant "$obs" "$dataset" "$seed"
        [ "$obs" = full ] && run 4b iql.py ant "$obs" "$dataset" "$seed"
        run 4b ibc.py ant "$obs" "$dataset" "$seed"
        run 4b maiql.py ant "$obs" "$dataset" "$seed"
        run 4b icql.py ant "$obs" "$dataset" "$seed"
        run 4b omar.py ant "$obs" "$dataset" "$seed"
        run 4b maiql.py ant "$obs" "$dataset" "$seed" --finetune
      done
    done
  done
}

ablation() {  # §6.3: epistemic (the paper's) vs MOPO's aleatoric penalty, with and without adaptive rollouts
  for obs in full partial; do
    for seed in $SEEDS_MUJOCO; do
      run ablation moma_ppo.py ant "$obs" full-replay "$seed"
      run ablation moma_ppo.py ant "$obs" full-replay "$seed" --no-adaptive-rollout
      run ablation moma_ppo.py ant "$obs" full-replay "$seed" --penalty aleatoric
      run ablation moma_ppo.py ant "$obs" full-replay "$seed" --penalty aleatoric --no-adaptive-rollout
    done
  done
}

diagnosis() {  # why MOMA-PPO lost on ant medium: one run per hypothesis (docs/diagnosis.md)
  local it=(--iterations "${DIAG_ITERATIONS:-80}" --eval-every 10 --eval-episodes-during 5) seed=1
  local now=("${it[@]}")  # today's Ant preset, with the terminal-height margin (point 24)
  it+=(--terminal-height-margin 0)  # every Ant row made before the margin became the preset, and so named
  local old=(--minibatch-size 4096)  # the preset's minibatch before row (c) made it 1,024: the rows made before
  # in order of what they can rule out first (JOBS=2 runs them in pairs)
  # the paper's timeout cut (the preset the diagnosis started from) and the terminal cut that replaced it
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" "${old[@]}" --uncertainty-cut timeout
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" "${old[@]}" --ground-truth   # (b) the real simulator
  run diagnosis moma_ppo.py ant full medium $seed "${it[@]}" "${old[@]}" --uncertainty-cut timeout  # (a) full obs.
  run diagnosis moma_ppo.py ant full medium $seed "${it[@]}" "${old[@]}" --no-adaptive-rollout     # (d) no cut
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" "${old[@]}" --no-adaptive-rollout
  for s in 1 2 3; do run diagnosis moma_ppo.py ant full medium $s "${it[@]}" "${old[@]}"; done  # (i) terminal cut
  for s in 1 2; do run diagnosis moma_ppo.py ant partial medium $s "${it[@]}" "${old[@]}"; done
  for s in 1 2; do run diagnosis moma_ppo.py ant full full-replay $s "${it[@]}" "${old[@]}"; done  # another dataset
  # (c) 4x the updates per iteration: today's preset (minibatch 1,024)
  for s in 1 2 3; do
    run diagnosis moma_ppo.py ant full medium $s "${it[@]}"
    run diagnosis moma_ppo.py ant partial medium $s "${it[@]}"
    run diagnosis moma_ppo.py ant full full-replay $s "${it[@]}"
  done
  # not run yet
  run diagnosis moma_ppo.py ant full medium $seed "${it[@]}" --use-history True              # the history encoder
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --minibatch-size 256         # (c) 16x: CleanRL's ratio
  # (c) the authors' shape: 2,020 synthetic transitions per iteration, minibatches of 64 (155 updates each) at
  # lr 5e-5, λ 0.98; 10x the iterations, so it sees as many synthetic transitions as the preset rows
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --iterations $((${DIAG_ITERATIONS:-80} * 10)) \
    --eval-every 100 --rollout-batch 202 --minibatch-size 64 --learning-rate 5e-5 --gae-lambda 0.98
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --start-history policy \
    --history-actions mean                                                                   # (g) own-action histories
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --actor-std state \
    --entropy-target -2 --action-penalty 1                                                   # (e) the authors' actor
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --eps-g-units standardised   # (d) ε_g units
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --lambda-g 1.0               # (d) 10x penalty
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --start-history zeros        # (g) reset histories
  for s in 1 2 3; do  # speed: the agents in bfloat16 (1.7x); seed 1 alone could not tell (docs/diagnosis.md point 18)
    run diagnosis moma_ppo.py ant partial medium $s "${it[@]}" --bf16
  done
  # (j) full-replay's jumps (docs/diagnosis.md point 10): the policy jumps in states it reaches itself after many
  # steps, which 10-step rollouts from dataset states never visit. Longer rollouts at the same synthetic
  # transitions per iteration (the terminal cut stops them where the model is uncertain, as MOReL's HALT state);
  # the authors' actor (bounded σ, entropy target, a penalty on |μ| > 1); a longer discount horizon (γ 0.995
  # weighs a 1e-3 per-step jump hazard twice as heavily)
  run diagnosis moma_ppo.py ant full full-replay $seed "${it[@]}" --rollout-horizon 20 --rollout-batch 1000
  run diagnosis moma_ppo.py ant full full-replay $seed "${it[@]}" --rollout-horizon 50 --rollout-batch 400
  run diagnosis moma_ppo.py ant full full-replay $seed "${it[@]}" --actor-std state --entropy-target -2 \
    --action-penalty 1
  run diagnosis moma_ppo.py ant full full-replay $seed "${it[@]}" --gamma 0.995
  # the 50-step rollouts on the other seeds and cells (are they the fix, or one lucky seed?)
  for s in 2 3; do
    run diagnosis moma_ppo.py ant full full-replay $s "${it[@]}" --rollout-horizon 50 --rollout-batch 400
  done
  run diagnosis moma_ppo.py ant full medium $seed "${it[@]}" --rollout-horizon 50 --rollout-batch 400
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --rollout-horizon 50 --rollout-batch 400
  run diagnosis moma_ppo.py ant partial full-replay $seed "${it[@]}" --rollout-horizon 50 --rollout-batch 400
  # (k) the last iterate's variance (point 12): a learning rate annealed linearly to 0 (CleanRL's default), on the
  # cells whose seeds swung most (full/full-replay, full/medium seed 2), then with the 50-step rollouts
  for s in 1 2 3; do run diagnosis moma_ppo.py ant full full-replay $s "${it[@]}" --anneal-lr; done
  run diagnosis moma_ppo.py ant full medium 2 "${it[@]}" --anneal-lr
  run diagnosis moma_ppo.py ant partial medium $seed "${it[@]}" --anneal-lr
  for s in 1 2; do
    run diagnosis moma_ppo.py ant full full-replay $s "${it[@]}" --anneal-lr --rollout-horizon 50 --rollout-batch 400
  done
  # (l) Table 4a's leader-only gap (docs/diagnosis.md point 22): the follower (the elbow's agent, who does not see the
  # target) ends with its elbow angle shrunk towards its average. Is it the world
  # model (the real simulator) or the 10-step rollouts, which never show the follower what its partner does after
  # 10 steps of acting together (25-step rollouts, the same synthetic steps per iteration)? Evaluations on 100 episodes.
  # (Twice the iterations is not a row here: run names leave --iterations out, so it would take Table 4a's cell's run
  # folder. It ran by hand, recorded as moma_ppo-iterations=800: the command is in its record and in point 22.)
  local reacher=(--eval-episodes-during 100)
  run diagnosis moma_ppo.py reacher leader-only expert-mix $seed "${reacher[@]}" --ground-truth
  run diagnosis moma_ppo.py reacher leader-only expert-mix $seed "${reacher[@]}" --rollout-horizon 25 --rollout-batch 400
  # none of the three closes it (point 22): the PPO side. Four times the updates per iteration (what Ant's row c
  # needed), and the authors' actor (a state-dependent σ, adaptive entropy, an action-bound penalty; ours ends with σ 0.09)
  run diagnosis moma_ppo.py reacher leader-only expert-mix $seed "${reacher[@]}" --minibatch-size 512
  run diagnosis moma_ppo.py reacher leader-only expert-mix $seed "${reacher[@]}" --actor-std state --entropy-target -2 \
    --action-penalty 1
  # (m) full-replay's jumps again (points 10, 12, 23): 50-step rollouts helped but started from 400 dataset states.
  # Continued rollouts keep 2,000 rollouts of 10 steps per iteration, 90% of them carrying on from where last
  # iteration's survivors stopped: chains of ~100 steps of the policy's own states, from as many starts as the preset
  for s in 1 2 3; do run diagnosis moma_ppo.py ant full full-replay $s "${it[@]}" --continue-rollouts 0.9; done
  # they do not help (point 23): the model misses the run-up to the policy's jumps from 5-10 steps out (probe `jumps`:
  # it predicts a peak of 0.75 m where the torso reaches 1.02 m). A pessimistic rule: predicted z > 0.9 is a terminal
  # (the margin is Ant's preset since point 24, so these rows are named moma_ppo; the rows above, made without it,
  # carry --terminal-height-margin 0)
  for s in 1 2 3; do run diagnosis moma_ppo.py ant full full-replay $s "${now[@]}"; done
  # a preset is one for every Ant dataset and observability: the same margin on the other cells' seed 1
  run diagnosis moma_ppo.py ant full medium $seed "${now[@]}"
  run diagnosis moma_ppo.py ant partial medium $seed "${now[@]}"
  run diagnosis moma_ppo.py ant partial full-replay $seed "${now[@]}"
  # partial/full-replay seed 1 lost with it (0.438 against 0.601): seed noise or a real cost? Seeds 2-3 of every cell
  for s in 2 3; do
    run diagnosis moma_ppo.py ant partial full-replay $s "${now[@]}"
    run diagnosis moma_ppo.py ant full medium $s "${now[@]}"
    run diagnosis moma_ppo.py ant partial medium $s "${now[@]}"
  done
  # with the margin, 84-85% of full-replay's greedy episodes reach 1,000 steps (the bar: 90%) and the model predicts
  # a peak of 0.94 m five steps before the policies' jumps (point 23): does moving the rule down to 0.85 m (1.1% of
  # both datasets' states, against 0.3-0.4% above 0.9 m) charge enough of the run-up? One value, three seeds
  for s in 1 2 3; do run diagnosis moma_ppo.py ant full full-replay $s "${now[@]}" --terminal-height-margin 0.15; done
}

# Table 4a's cross-play (envs.py, "Cross-play"): for every row and method with two or more finished seeds at this
# budget (run folders that still hold their checkpoints), each seed's agents in teams with every other seed's, written
# to results/4a/crossplay/<cell>.json. Each run is resumed with its own first command: a finished run trains nothing
# and keeps its record; only the stitched teams are played. A report newer than every run of its group is kept.
crossplay() {
  local obs method seed dir other report cmd fresh
  for obs in all-observant independent leader-only; do
    for method in iql maiql matd3bc ibc itd3bc icql omar moma_ppo; do
      local dirs=()
      for seed in $SEEDS_MUJOCO; do
        dir="$RUNS/reacher__${obs}__expert-mix__${method}__$seed"
        [ -f "$dir/summary.json" ] && [ -f "$dir/checkpoint.pt" ] && dirs+=("$dir")
      done
      [ ${#dirs[@]} -ge 2 ] || continue
      for dir in "${dirs[@]}"; do
        local others=()
        report="$RESULTS/4a/crossplay/$(basename "$dir").json"
        fresh=1
        [ -f "$report" ] && [ "$report" -nt "$dir/summary.json" ] || fresh=0
        for other in "${dirs[@]}"; do
          [ "$other" = "$dir" ] && continue
          others+=("$other")
          [ -f "$report" ] && [ "$report" -nt "$other/summary.json" ] || fresh=0
        done
        if [ $fresh = 1 ]; then
          echo "crossplay: $(basename "$dir") is up to date"
          continue
        fi
        # how the run was started in this folder: its first command that names this run dir (a folder copied from
        # another run, e.g. Table 4a's leader-only cells from runs/diagnosis_long, starts with the other's commands)
        cmd=$( (grep -m1 -e "--run-dir $dir\( \|\$\)" "$dir/command.txt" || head -1 "$dir/command.txt") | sed -e 's/ --resume\b//g')
        echo ">>> $cmd --resume --cross-play-with ${others[*]} ${EXTRA[*]:-}"
        eval "$cmd --resume --cross-play-with ${others[*]} ${EXTRA[*]:-}" || FAILED=$((FAILED + 1))
      done
    done
  done
  return 0
}

cells() {
  case $WHAT in
    3) table3 ;;
    4a) table4a ;;
    4b) table4b ;;
    ablation) ablation ;;
    diagnosis) diagnosis ;;
    all) table3; table4a; table4b ;;
    *) echo "usage: [BUDGET=quick|default|paper] ./run_all.sh [plan] [3|4a|4b|ablation|diagnosis|all|crossplay|table|plots] [--slurm [--dry-run] [--partition P] [--account A] [--time T] [--mem M] [--gres G]] [extra flags]" >&2
       exit 2 ;;
  esac
}

case $WHAT in
  table) python results.py table; exit ;;
  crossplay)
    crossplay
    [ "$RESULTS" = results ] && python results.py table
    [ $FAILED = 0 ] || { echo "$FAILED cross-play evaluations failed" >&2; exit 1; }
    exit ;;
  plots) python results.py plots; exit ;;
esac

if [ -n "$CELL_FILE" ]; then  # a Slurm array task: one cell, then nothing else (no tables)
  line=$(sed -n "${CELL_LINE}p" "$CELL_FILE")
  [ -n "$line" ] || { echo "error: no cell on line $CELL_LINE of $CELL_FILE" >&2; exit 2; }
  echo "cell $CELL_LINE of $CELL_FILE on $HOSTNAME: run $line"
  JOBS=1  # in the foreground: the task ends when its cell does
  eval "run $line"
  exit
fi

# The plan first: every cell of the target, what is done, the estimated CPU time left.
PLAN_FILE=$(mktemp)
STALE_FILE=$(mktemp)
trap 'rm -f "$PLAN_FILE" "$PLAN_FILE.args" "$STALE_FILE"' EXIT
: > "$PLAN_FILE.args"
cells
python results.py plan "$PLAN_FILE" --budget "$BUDGET" --results-dir "$RESULTS" --runs-dir "$RUNS" --stale-list "$STALE_FILE"
[ $PLAN_ONLY = 1 ] && exit 0
if [ $SLURM = 1 ]; then  # write the array (and submit it unless --dry-run); the cells run on the cluster
  BUDGET=$BUDGET RESULTS=$RESULTS RUNS=$RUNS python slurm.py "$WHAT" "$PLAN_FILE" "$STALE_FILE" "${SBATCH_OPTS[@]}" -- "${EXTRA[@]}"
  exit
fi
PLAN_FILE=""
cells
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || FAILED=$((FAILED + 1)); done
write_table() {
  if [ "$RESULTS" = results ]; then python results.py table; else echo "RESULTS=$RESULTS: docs/results.md left as it is"; fi
}
if [ "$FAILED" -gt 0 ]; then
  echo "error: $FAILED cell(s) failed; see $RUNS/logs/" >&2
  write_table
  exit 1
fi
write_table
exit
}
