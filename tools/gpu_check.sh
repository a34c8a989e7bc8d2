#!/usr/bin/env bash
# Every GPU check of BENCHMARKS.md "GPU" in one call of at most --budget seconds (8 minutes): environment,
# bench.py rows (eager and --compile, bf16, the study's batch sizes), the input pipeline, a short MAE ViT-B
# pre-training under torchrun stopped by SIGTERM and resumed, and two steps of every trainer under
# --sync-debug. Each part runs under its own time limit (cut to what is left of the budget); a failed part
# is a row of the table and the script goes on. Writes $OUT/gpu_check.md (one table to paste into
# BENCHMARKS.md) and $OUT/gpu_check.log (every part's output); data and runs live in $WORK.
#
#   bash tools/gpu_check.sh            # on a GPU machine: OUT (default runs/gpu_check), WORK (default a temp dir)
#   bash tools/gpu_check.sh --smoke    # the same parts on a CPU with tiny sizes (tests/test_gpu_check.py)
#   bash tools/gpu_check.sh --dry-run  # print every command of the full run, run nothing
# Exit status: 0 when no part failed. Sourced (tests), it defines its functions and runs nothing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODE=full DRY=0 BUDGET=480 DTYPE=bf16
while (($#)); do
  case $1 in
    --smoke) MODE=smoke BUDGET=600 DTYPE=fp32 ;;  # fp32: bf16 on a CPU is emulated, or slow at tiny sizes
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
GIVEN_WORK=${WORK:-}  # kept; without it a temporary folder, removed at the end
WORK=${WORK:-${TMPDIR:-/tmp}/gpu_check.$$}
DATA=$WORK/whu
DEADLINE=$((SECONDS + BUDGET)) MIN_LEFT=20  # a part with less than MIN_LEFT s left is not started
export HSI_SSL_CACHE=$WORK/cache PYTHONUNBUFFERED=1

if [[ $MODE == full ]]; then  # the study's sizes (README "GPU clusters"); bf16 on the GPU
  TILES="--tiles 32 --size 512"
  BENCH=(--size base)
  STEPS=(--steps 10 --warmup 3)
  LOADER=(--batch-size 128 --steps 2 --workers 4)
  MAE=(--size base --batch-size 128)
  DINO=(--size base --batch-size 128 --local-crops 8 --prototypes 65536)
  CONTRAST=()
  SEG=(--size base --batch-size 32)
  TRAIN=(--seconds 60 --resume-seconds 15 -- $PY -m torch.distributed.run --standalone --nproc_per_node 1
         pretrain_mae.py --size base --batch-size 128 --log-every 20)  # blr 1.5e-3: lr 7.5e-4
else  # tiny sizes, a step or two: what the commands do, not how fast
  TILES="--tiles 4 --size 96"
  BENCH=(--size micro --batch-size 2)
  STEPS=(--steps 1 --warmup 0)
  LOADER=(--batch-size 2 --steps 1 --workers 0)
  MAE=(--size micro --batch-size 2 --img-size 32)
  DINO=(--size micro --batch-size 2 --img-size 32 --local-crops 2 --prototypes 64)
  CONTRAST=(--width 16 --depth 2)
  SEG=(--size micro --batch-size 2 --img-size 32)
  TRAIN=(--seconds 0 --resume-seconds 0 --intervals 8 -- $PY -m torch.distributed.run --standalone --nproc_per_node 1
         pretrain_mae.py --size micro --batch-size 8 --img-size 32 --blr 0.02 --warmup-steps 5 --log-every 5)
fi

# ----------------------------------------------------------------------------- running a part

LANE_PID=$WORK/lane.pid
((DRY)) || mkdir -p "$OUT" "$WORK/logs"
((DRY)) || : >"$WORK/parts.tsv"

record() {  # NAME STATUS SECONDS LOG ROWS: a line of the table's input, then the table and log again
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$WORK/parts.tsv"
  $PY tools/gpu_check.py table "$WORK" "$OUT"
}

part() {  # NAME LIMIT ROWS CMD...: CMD under min(LIMIT, what is left of the budget); ROWS: bench rows it prints
  local name=$1 limit=$2 rows=$3
  shift 3
  if ((DRY)); then
    printf '%s [%s s]:' "$name" "$limit"
    for w in "$@"; do [[ $w =~ ^[][A-Za-z0-9_./:=,+-]+$ ]] && printf ' %s' "$w" || printf ' %q' "$w"; done
    echo
    return
  fi
  local log="$WORK/logs/${name//[^A-Za-z0-9_.-]/_}.log" left=$((DEADLINE - SECONDS)) t0=$SECONDS status cut=0
  if ((left < MIN_LEFT)); then
    record "$name" "not run: the $BUDGET s budget was spent" 0 "" "$rows"
    return
  fi
  ((limit > left)) && limit=$left cut=1
  echo "$(date +%T) $name (limit $limit s)"
  timeout -k 20 "$limit" "$@" >"$log" 2>&1 &
  echo $! >"$LANE_PID.$BASHPID"
  wait $!
  local rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="FAILED (timeout $limit s)"
      ((cut)) && status="stopped at the end of the $BUDGET s budget" ;;
    143) status="FAILED (SIGTERM)"
      [[ -e $WORK/stop ]] && status="stopped: the untimed parts were done" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  record "$name" "$status" $((SECONDS - t0)) "$log" "$rows"
}

skip() {  # NAME ROWS REASON
  ((DRY)) || record "$1" "skipped: $3" 0 "" "$2"
}

LANES=()
background() {  # FUNCTION: its parts one after the other, beside the foreground parts
  if ((DRY)); then echo "# in the background, beside the next parts:"; "$1"; echo "# (end of $1)"; return; fi
  "$1" &
  LANES+=($!)
}

stop_background() {  # end the background parts now: the timed ones need the machine to themselves
  ((DRY)) && return
  touch "$WORK/stop"
  for lane in "${LANES[@]}"; do
    while kill -0 "$lane" 2>/dev/null; do
      kill -TERM "$(cat "$LANE_PID.$lane" 2>/dev/null)" 2>/dev/null
      sleep 1
    done
  done
}

# ----------------------------------------------------------------------------- the parts

bench() {  # KIND TRAINER LIMIT FLAGS...: one bench.py process per trainer, its rows ROWS[trainer]
  local kind=$1 trainer=$2 limit=$3 backbones=${ROWS[$2]//$2\//}
  shift 3
  part "bench $kind $trainer" "$limit" "${ROWS[$trainer]}" $PY bench.py --trainers "$trainer" \
    --backbones "${backbones// /,}" --dtype $DTYPE "${BENCH[@]}" "$@"
}

declare -A ROWS=([mae]="mae/vit mae/sst" [dino]="dino/vit dino/ssvit" [seg]="seg/vit seg/resnet50v1c")

# A cold torch.compile of a ViT-B takes a minute or more: two lanes fill the compile caches while the untimed
# parts run, and the timed --compile rows later find them warm.
warm_up_mae_seg() {
  for t in mae seg; do [[ -e $WORK/stop ]] || bench warm-up $t 240 --compile --steps 1 --warmup 1; done
}
warm_up_dino() { bench warm-up dino 240 --compile --steps 1 --warmup 1; }

loaders() {
  part "loader WHU-OHS-shaped" 120 "" $PY bench.py --loader --data "$DATA" "${LOADER[@]}"
  part "loader any-sensor, WHU-OHS-shaped + Indian Pines" 120 "" $PY bench.py --loader --any-sensor \
    --data "$DATA,data/indian_pines" "${LOADER[@]}"
}

eager_and_loaders() {
  for t in mae dino seg; do bench "$DTYPE eager" $t 120 "${STEPS[@]}"; done
  loaders
}

main() {
  [[ -z $GIVEN_WORK ]] && ((!DRY)) && trap 'rm -rf "$WORK"' EXIT
  ((DRY)) && echo "# $MODE run, budget $BUDGET s (each limit below is cut to what is left of it); OUT=$OUT WORK=$WORK"
  part environment 60 "" $PY tools/gpu_check.py env
  if [[ $MODE == full ]]; then background warm_up_mae_seg; background warm_up_dino; fi
  part "synthetic data" 120 "" $PY tools/gpu_check.py synthetic "$DATA" $TILES
  [[ $MODE == smoke ]] && background eager_and_loaders  # timings mean nothing on a CPU: beside the untimed parts
  part sync-debug 300 "pretrain_mae pretrain_dino pretrain_contrast finetune_seg" $PY tools/gpu_check.py steps \
    pretrain_mae.py --data "$DATA" "${MAE[@]}" --steps 2 --sync-debug --dtype $DTYPE \
      --out "$WORK/sync_mae" :: \
    pretrain_dino.py --data "$DATA" "${DINO[@]}" --steps 2 --sync-debug --dtype $DTYPE --out "$WORK/sync_dino" :: \
    pretrain_contrast.py --data "$DATA,data/indian_pines" "${CONTRAST[@]}" --steps 2 --sync-debug --dtype $DTYPE \
      --out "$WORK/sync_contrast" :: \
    finetune_seg.py --data "$DATA" --backbone vit --finetune "${SEG[@]}" --steps 2 --eval-every 2 --sync-debug \
      --dtype $DTYPE --out "$WORK/sync_seg"
  part "training: MAE, torchrun, SIGTERM, --resume" 240 "" $PY tools/gpu_check.py resume "${TRAIN[@]}" \
    --data "$DATA" --steps 100000 --dtype $DTYPE --out "$WORK/mae"
  if [[ $MODE == full ]]; then  # the timed parts, alone on the machine; the targets' rows first
    stop_background
    for t in mae dino seg; do bench "$DTYPE eager" $t 120 "${STEPS[@]}"; done
    for t in mae dino; do bench "$DTYPE compile" $t 150 "${STEPS[@]}" --compile; done
    loaders
    bench "$DTYPE compile" seg 150 "${STEPS[@]}" --compile
  else
    ((DRY)) || wait "${LANES[@]}"
    for t in mae dino seg; do skip "bench $DTYPE compile $t" "${ROWS[$t]}" "--smoke compiles nothing (minutes on a CPU)"; done
  fi
  ((DRY)) && return 0
  echo "$(date +%T) $SECONDS s of the $BUDGET s budget; table: $OUT/gpu_check.md, logs: $OUT/gpu_check.log"
  cat "$OUT/gpu_check.md"
  ! grep -q FAILED "$OUT/gpu_check.md"
}

[[ ${BASH_SOURCE[0]} == "$0" ]] && main
