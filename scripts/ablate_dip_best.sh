#!/usr/bin/env bash
# What each part of method=dip_best contributes: every ablation below x 3 seeds x a few images
# (128x128, sigma 25/255, the same noise draw for every ablation), one sweep per ablation under
# $OUT/<name>/, then one dipddpm-compare table (mean ± std over images and seeds, Δ against plain DIP)
# in $OUT/table.md, over every ablation with results there. Resumable: running it again skips
# finished jobs. docs/BASELINES.md, "dip_best".
#
#   scripts/ablate_dip_best.sh                       # the defaults below
#   IMAGES=a.png,b.png SEEDS=0,1 OUT=/tmp/abl scripts/ablate_dip_best.sh
#   ONLY="dip dip_best" scripts/ablate_dip_best.sh   # a subset of the ablations
#   EXTRA="launcher=joblib" scripts/ablate_dip_best.sh   # more overrides for every sweep (two jobs at once)
#
# An ablation whose overrides the installed code does not accept (a knob not there yet) is
# reported and left out; the others still run.
set -euo pipefail

DATA=${DATA:-../shared/data}
IMAGES=${IMAGES:-$DATA/cset/F16.png,$DATA/cset/House.png,$DATA/set5/butterfly.png}
SEEDS=${SEEDS:-0,1,2}
OUT=${OUT:-outputs/ablation}
SIGMA=0.09803921568627451   # 25/255

# name | overrides (each ablation changes one part of dip_best, or is a reference point). The ladder
# dip -> stop_only -> dip_best adds one part at a time: the discrepancy stop choosing the returned
# image, then the mean of 2 replicas; no_stop is dip_best without the stop (2 replicas averaged at
# the last step) and wmv the earlier recipe (ES-WMV choosing each replica's image).
ABLATIONS=(
  "dip|method=dip"
  "stop_only|method=dip_best method.replicas=1"
  "dip_best|method=dip_best"
  "no_stop|method=dip_best early_stop=none"
  "wmv|method=dip_best early_stop=wmv"
  "no_ema|method=dip_best method.ema=0"
  "noisy_input|method=dip_best method.input=noisy"
  "curriculum|method=dip_best noise_plan=levels noise_plan.stage_source=observation +noise_plan.observation_factors=[2,1.5,1] epoch_plan=list epoch_plan.steps=[300,300,400]"
)

mkdir -p "$OUT"
first_image=${IMAGES%%,*}
for entry in "${ABLATIONS[@]}"; do
  name=${entry%%|*}
  read -r -a overrides <<< "${entry#*|}"
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
    continue
  fi
  read -r -a extra <<< "${EXTRA:-}"
  common=("data.path=$IMAGES" "data.size=128" "data.fit=crop" "data.sigma=$SIGMA" "data.noise_seed=0" "${extra[@]}"
          "experiment_name=ablation/$name" "hydra.sweep.dir=$OUT/$name")
  if ! problem=$(dipddpm-train "${overrides[@]}" "data.path=$first_image" data.size=128 data.fit=crop "data.sigma=$SIGMA" \
                  dry_run=true "output_root=$OUT/.dry" 2>&1 >/dev/null); then
    echo "ablate_dip_best: $name left out: ${problem##*$'\n'}" >&2
    continue
  fi
  echo "ablate_dip_best: $name: ${overrides[*]}"
  dipddpm-train -m "${overrides[@]}" "${common[@]}" "seed=$SEEDS" || true   # failed jobs are marked in the table
done
rm -rf "$OUT/.dry"

# the table holds every ablation with results under $OUT, also those of earlier (ONLY=...) runs
done_dirs=()
for entry in "${ABLATIONS[@]}"; do
  [[ -d "$OUT/${entry%%|*}" ]] && done_dirs+=("$OUT/${entry%%|*}")
done
baseline=()
[[ -d "$OUT/dip" ]] && baseline=(--baseline experiment=ablation/dip)
dipddpm-compare "${done_dirs[@]}" --out "$OUT" --rows experiment --values psnr_final,psnr_stop,ssim_final,wall_seconds \
  "${baseline[@]}"
