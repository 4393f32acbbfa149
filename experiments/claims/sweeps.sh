#!/usr/bin/env bash
# The sweeps behind the claims table of experiments/README.md, on one model, resumable.
#
#   bash experiments/claims/sweeps.sh --list                  # the groups, in order
#   MODEL=checkpoints/fashion_mnist/unet TAG=converged bash experiments/claims/sweeps.sh   # every group (hours)
#   ONLY='skip_|rho_m' bash experiments/claims/sweeps.sh      # the groups whose name matches the regex
#   PART=0/2 bash experiments/claims/sweeps.sh & PART=1/2 bash experiments/claims/sweeps.sh   # two processes
#   DRY=1 MODEL=m TAG=t bash experiments/claims/sweeps.sh     # print each sweep's overrides, run nothing
#
# Each group runs its sweeps with resume=true into multirun/claims/<tag>/<sweep> (a job whose metrics.json
# was made by the same config is skipped, so a killed run continues where it stopped) and archives each
# finished sweep's small result files to experiments/data/claims/<tag>/<sweep> (report.py archive), which
# is what the tables read. Paired comparisons: a group first runs its base jobs with save_features=true,
# then every other job with metrics.paired_with=<its base>, so metrics.json holds fid_diff and its paired
# standard error against the base on the same noise.
#
# Environment: MODEL (required: a save_pretrained folder that no training writes into while the sweeps run;
# copy a live export first), TAG (required: names the data folder, e.g. converged or early), MODEL_COND (the
# class-conditional model of the guidance group, default the shipped one),
# N (samples per sweep job, default 500), N_HEAD (headline rows, default 5000), PY (default .venv/bin/python),
# RHO (the rho_bottom list), CLIP (the analytic group's halves, x0 unclipped / clipped: default "false true";
# CLIP=true runs the clipped half alone, e.g. in a second process), RUNS / DATA (the two roots above).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
MODEL_COND=${MODEL_COND:-checkpoints/fashion_mnist_cond/unet}
if [[ "${1:-}" != "--list" && ( -z "${MODEL:-}" || -z "${TAG:-}" ) ]]; then
  echo "sweeps.sh: set MODEL=<model folder> and TAG=<data folder name> (e.g. MODEL=checkpoints/fashion_mnist/unet TAG=converged)" >&2
  exit 2
fi
MODEL=${MODEL:-}; TAG=${TAG:-}
N=${N:-500}
N_HEAD=${N_HEAD:-5000}
RUNS=${RUNS:-multirun/claims/$TAG}
DATA=${DATA:-experiments/data/claims/$TAG}
RHO=${RHO:-0.5,0.6,0.7,0.8,0.85,0.9,0.95,1.05,1.1,1.2}   # rho_bottom besides the base's 1 (rho_top = 1)

run() {   # run <sweep> <overrides...>: one multirun into $RUNS/<sweep>, then its archive
  local name=$1; shift
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=offline HF_HUB_OFFLINE=1
  echo "== $RUNS/$name: $*"
  if [[ -n "${DRY:-}" ]]; then printf 'run.py -m'; printf ' %q' "$@"; printf '\n'; return; fi
  # the model and the base folder are the same for every job of a sweep: left out of the job folder names
  # (a / in them would nest the folders); the resolved config and metrics.json keep them
  "$PY" run.py -m logger=none resume=true "backbone.pretrained=$MODEL" "hydra.sweep.dir=$RUNS/$name" \
    'hydra.job.config.override_dirname.exclude_keys=[resume,backbone.pretrained,metrics.paired_with]' "$@"
  "$PY" experiments/report.py archive "$RUNS/$name" "$DATA/$name" >/dev/null
}

base() {  # base <sweep> <subdir pattern> <overrides...>: the rho = 1 / no-strategy jobs the others pair with
  local name=$1 subdir=$2; shift 2
  run "$name" save_features=true "hydra.sweep.subdir=$subdir" "$@"
}

skip_sampler() {  # Skip-Tuning with one ODE sampler at about 5 / 10 / 20 NFE
  local s=$1 steps=$2; shift 2
  base "skip_${s}_base" '${sampler.steps}' "n_samples=$N" "sampler.steps=$steps" "$@"
  run "skip_${s}" "n_samples=$N" "sampler.steps=$steps" "skip.rho_bottom=$RHO" \
    "metrics.paired_with=$RUNS/skip_${s}_base/\${sampler.steps}" "$@"
}

group_skip_dpmpp() { skip_sampler dpmpp 5,10,20 sampler=dpmpp; }
group_skip_ddim()  { skip_sampler ddim 5,10,20 sampler=ddim; }
group_skip_heun()  { skip_sampler heun 3,5,10 sampler=heun; }      # NFE 2 steps - 1: 5, 9, 19
group_skip_unipc() { skip_sampler unipc 5,10,20 sampler=diffusers sampler.scheduler=UniPCMultistepScheduler; }
# rho*(M) ~ 1 - C / M^alpha: DPM-Solver++ at more M (5, 10, 20 come from skip_dpmpp)
group_rho_m()      { skip_sampler dpmpp_m 8,15,30,50 sampler=dpmpp; }
group_skip_sde()   { skip_sampler ddpm 10,20,50 sampler=ddpm; }
# finer near the optimum where the main grid is 0.1 apart: the sweep skip_<sampler>_fine is read with skip_<sampler>
skip_fine() {  # skip_fine <sampler key> <steps> <rho list> <overrides...>
  local s=$1 steps=$2 rho=$3; shift 3
  base "skip_${s}_fine_base" '${sampler.steps}' "n_samples=$N" "sampler.steps=$steps" "$@"
  run "skip_${s}_fine" "n_samples=$N" "sampler.steps=$steps" "skip.rho_bottom=$rho" \
    "metrics.paired_with=$RUNS/skip_${s}_fine_base/\${sampler.steps}" "$@"
}
group_skip_fine() {
  skip_fine unipc 5 0.55,0.65 sampler=diffusers sampler.scheduler=UniPCMultistepScheduler   # best 0.6 of 0.5 / 0.6 / 0.7
  skip_fine heun 5 0.4,0.45,0.55 sampler=heun                                                  # 9 NFE: best 0.5, the grid's edge
}

group_skip_norms() {  # prop_i = ||d_i|| / ||u_i|| at every skip and step, plain and rho_bottom = 0.8
  # (each job's skip_norms.csv is archived: report.py skipnorms reads every (skip, evaluation) pair)
  run skip_norms task=skip_norms sampler=dpmpp,ddim,ddpm sampler.steps=10 skip.rho_bottom=0.8
  run skip_norms_heun task=skip_norms sampler=heun sampler.steps=5 skip.rho_bottom=0.8
  run skip_norms_unipc task=skip_norms sampler=diffusers sampler.scheduler=UniPCMultistepScheduler sampler.steps=10 \
    skip.rho_bottom=0.8
}

group_denoise_loss() {  # the mechanism: pixel vs feature denoising loss against rho and t (1000 test images)
  run denoise_loss task=denoise_loss task.n_images=1000 skip.rho_bottom=0.5,0.7,0.8,0.9,1.1
}

group_deepcache() {  # DDIM 100 steps, N = 2 / 3 / 5 / 10, uniform and non-uniform, paired with no cache
  base deepcache_base base "n_samples=$N" sampler=ddim sampler.steps=100
  run deepcache "n_samples=$N" sampler=ddim sampler.steps=100 cache=deepcache cache.interval=2,3,5,10 \
    cache.schedule=uniform,nonuniform "metrics.paired_with=$RUNS/deepcache_base/base"
}

group_deepcache_schedule() {  # non-uniform vs uniform full steps at N = 5 / 10, paired with each other: the
  # uniform jobs save their features, the non-uniform ones record fid_diff against the uniform one at their N
  base deepcache_uniform '${cache.interval}' "n_samples=$N" sampler=ddim sampler.steps=100 cache=deepcache \
    cache.interval=5,10 cache.schedule=uniform
  run deepcache_nonuniform "n_samples=$N" sampler=ddim sampler.steps=100 cache=deepcache cache.interval=5,10 \
    cache.schedule=nonuniform "metrics.paired_with=$RUNS/deepcache_uniform/\${cache.interval}"
}

gamma() {  # gamma [overrides...]: Analytic-DPM's Gamma for this model, written into its folder once (an
  # existing file is kept): every 20th timestep from 1000 points (the variance rule on even steps, the largest
  # M, found first) and, unless GAMMA_ALL=0, every timestep from 512 (the optimal trajectory needs them all;
  # sampler.timesteps=analytic_dp takes it). The overrides select the model's kind and guidance (a guided eps
  # has its own Gamma).
  local sets="1000:20" m_ts m ts
  [[ "${GAMMA_ALL:-1}" == 0 ]] || sets="$sets 512:all"
  for m_ts in $sets; do
    m=${m_ts%%:*}; ts=${m_ts#*:}
    if [[ -n "${DRY:-}" ]]; then printf 'run.py task=gamma task.M=%s task.timesteps=%s' "$m" "$ts"; (( $# )) && printf ' %q' "$@"; printf '\n'; continue; fi
    mkdir -p "$RUNS"  # a lock, so that two PARTs never estimate it at the same time
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} flock "$RUNS/gamma.lock" "$PY" run.py task=gamma logger=none \
      "backbone.pretrained=$MODEL" "task.M=$m" "task.timesteps=$ts" "$@"
  done
}

group_analytic() {  # fixed vs analytic variance, DDPM and DDIM at K = 10..100 steps, x0 clipped or not
  gamma   # ++: a multirun first composes its config with the default sampler (dpmpp, no clip_x0), sweeps aside
  for clip in ${CLIP:-false true}; do
    base "analytic_base_clip$clip" '${sampler.name}_${sampler.steps}' "n_samples=$N" sampler=ddpm,ddim \
      sampler.steps=10,25,50,100 "++sampler.clip_x0=$clip"
    run "analytic_clip$clip" "n_samples=$N" sampler=ddpm,ddim sampler.steps=10,25,50,100 "++sampler.clip_x0=$clip" \
      variance=analytic "metrics.paired_with=$RUNS/analytic_base_clip$clip/\${sampler.name}_\${sampler.steps}"
  done
}

group_analytic_dp() {  # the optimal trajectory (the dynamic programme over Gamma at every timestep) against even
  # steps, both analytic and unclipped, paired: the even-step runs are the base
  gamma
  base analytic_dp_base '${sampler.name}_${sampler.steps}' "n_samples=$N" sampler=ddpm,ddim sampler.steps=10,25,50 \
    variance=analytic
  run analytic_dp "n_samples=$N" sampler=ddpm,ddim sampler.steps=10,25,50 variance=analytic \
    sampler.timesteps=analytic_dp "metrics.paired_with=$RUNS/analytic_dp_base/\${sampler.name}_\${sampler.steps}"
}

group_analytic_nll() {  # the bound in bits/dim on 250 test images, fixed (beta, beta_tilde) vs analytic, and
  gamma                 # the 1000-step beta bound the paper's "steps to match" counts against
  run analytic_nll n_samples=10 metrics=nll metrics.n_data=250 sampler=ddpm sampler.steps=10,25,50,100 sampler.var_type=beta,beta_tilde
  run analytic_nll_a n_samples=10 metrics=nll metrics.n_data=250 sampler=ddpm sampler.steps=10,25,50,100 variance=analytic
  run analytic_nll_dp n_samples=10 metrics=nll metrics.n_data=250 sampler=ddpm sampler.steps=10,25,50,100 variance=analytic \
    sampler.timesteps=analytic_dp
  run analytic_nll_full n_samples=10 metrics=nll metrics.n_data=250 sampler=ddpm sampler.steps=1000 sampler.var_type=beta
}

interaction() {  # interaction <json> <factor columns> -- <sweeps>: report.py interaction into the data folder
  local out=$1; shift
  local factors=()
  while [[ "$1" != "--" ]]; do factors+=("$1"); shift; done
  shift
  if [[ -n "${DRY:-}" ]]; then echo "report.py interaction $* --factors ${factors[*]}"; return; fi
  "$PY" experiments/report.py interaction "${@/#/$RUNS/}" --factors "${factors[@]}" --out "$DATA/$out"
}

group_compose() {  # DDIM 20 steps: Skip-Tuning x DeepCache x Analytic-DPM, each on or off, paired with none;
  # every job keeps its features, so report.py interaction bootstraps the interaction jointly
  gamma
  base compose_base base "n_samples=$N" sampler=ddim sampler.steps=20
  local pair="metrics.paired_with=$RUNS/compose_base/base"
  run compose "n_samples=$N" sampler=ddim sampler.steps=20 save_features=true skip.rho_bottom=1.0,0.8 \
    variance=fixed,analytic "$pair"
  run compose_cache "n_samples=$N" sampler=ddim sampler.steps=20 save_features=true skip.rho_bottom=1.0,0.8 \
    variance=fixed,analytic cache=deepcache cache.interval=2 "$pair"
  interaction compose_interaction.json rho_bottom cache variance -- compose_base compose compose_cache
}

group_compose_guided() {  # the class-conditional model, DDIM 20 steps: Skip-Tuning x DeepCache x Analytic-DPM x
  # guidance (CFG at the default w = 1.5 against the conditional model alone), the full 2^4 factorial paired
  # with all off; every job keeps its features, so report.py interaction bootstraps the interaction jointly
  local cond=(backbone=unet_cond sampler=ddim sampler.steps=20) pair="metrics.paired_with=$RUNS/compose_guided_base/base"
  MODEL=$MODEL_COND GAMMA_ALL=0 gamma backbone=unet_cond guidance=none
  MODEL=$MODEL_COND GAMMA_ALL=0 gamma backbone=unet_cond guidance=cfg
  MODEL=$MODEL_COND base compose_guided_base base "n_samples=$N" "${cond[@]}"
  MODEL=$MODEL_COND run compose_guided "n_samples=$N" "${cond[@]}" save_features=true skip.rho_bottom=1.0,0.8 \
    variance=fixed,analytic guidance=none,cfg "$pair"
  MODEL=$MODEL_COND run compose_guided_cache "n_samples=$N" "${cond[@]}" save_features=true skip.rho_bottom=1.0,0.8 \
    variance=fixed,analytic guidance=none,cfg cache=deepcache cache.interval=2 "$pair"
  interaction compose_guided_interaction.json rho_bottom cache variance guidance -- compose_guided_base \
    compose_guided compose_guided_cache
}

group_guidance() {  # the class-conditional model: guidance everywhere, then only in t in [100, 700], paired per w
  MODEL=$MODEL_COND base guidance_base 'w${guidance.scale}' experiment=guidance_sweep
  MODEL=$MODEL_COND run guidance_interval experiment=guidance_sweep 'guidance.interval=[100,700]' \
    "metrics.paired_with=$RUNS/guidance_base/w\${guidance.scale}"
}

group_headline() {  # 5000 samples: the issue's targets (first) and the frontier's anchors
  run headline_ddpm "n_samples=$N_HEAD" sampler=ddpm sampler.steps=100
  run headline "n_samples=$N_HEAD" sampler=dpmpp sampler.steps=100,50,20,10,5
  run headline_inception "n_samples=$N_HEAD" metrics=inception sampler=dpmpp sampler.steps=10,20,50
}

group_headline_unipc() {  # 5000 samples at 10 NFE, paired with DPM-Solver++(2M) on the same noise: does
  # Skip-Tuning's gain on UniPC (the 500-sample rows) take it past the frontier's best sampler?
  base headline_unipc_base '${sampler.name}' "n_samples=$N_HEAD" sampler=dpmpp sampler.steps=10
  run headline_unipc "n_samples=$N_HEAD" sampler=diffusers sampler.scheduler=UniPCMultistepScheduler sampler.steps=10 \
    skip.rho_bottom=1,0.9,0.8 "metrics.paired_with=$RUNS/headline_unipc_base/dpmpp"
}

ALL=(skip_dpmpp skip_ddim skip_heun skip_unipc skip_fine rho_m skip_sde skip_norms denoise_loss deepcache deepcache_schedule analytic
        analytic_dp analytic_nll compose compose_guided guidance headline headline_unipc)
if [[ "${1:-}" == "--list" ]]; then printf '%s\n' "${ALL[@]}"; exit 0; fi
part=${PART:-0/1}; k=${part%/*}; of=${part#*/}
i=0
for g in "${ALL[@]}"; do
  if [[ -z "${ONLY:-}" || "$g" =~ ${ONLY} ]] && (( i % of == k )); then "group_$g"; fi
  i=$((i + 1))
done
