#!/usr/bin/env bash
# run_iterative.sh: the whole loop. Optional SFT, then for k = 1..K: sample -> label -> train,
# then evaluate every iteration (iteration 0 is the starting model) and summarise.
#
#   bash run_iterative.sh                        # embedded default: tiny model, synthetic task, iLR-DPO
#   LOSS=dpo bash run_iterative.sh               # the same with vanilla iterative DPO
#   bash run_iterative.sh configs/storm7b.env    # a recipe file of KEY=VALUE lines
#
# Settings come from environment variables, else from the recipe file given as the only argument
# (plain KEY=VALUE lines, '#' comments; read as data, never executed), else from these defaults:
#   NAME           run name; everything of the run is under RUNS_DIR/NAME       (default: $LOSS)
#   RUNS_DIR       where runs live                                               (runs)
#   NPROC          processes per stage (torchrun --nproc_per_node)               (1)
#   K              number of iterations                                          (3)
#   LOSS           any name in losses.LOSSES                                     (ilrdpo)
#   LOSS_ARGS      extra dpo.py flags, split on spaces, e.g. "--beta 0.2"        ("--alpha 0.4" for ilrdpo,
#                  the length margin tuned for the embedded task's ~10-token responses; else empty)
#   REF            reference per iteration: "previous" policy or the "initial"   (previous)
#   BASE_MODEL     model to start from (SFT input when SFT_DATA is set)          (data/embedded/init_model)
#   SFT_DATA       SFT data; empty to skip SFT and start from BASE_MODEL         (data/embedded/sft.jsonl)
#   SFT_DIR        where the SFT model goes; shared by runs with the same SFT    (RUNS_DIR/sft)
#   SFT_CONFIG     YAML settings for sft.py                                       (configs/sft.yaml)
#   DPO_CONFIG     YAML settings for dpo.py                                       (configs/dpo.yaml)
#   PROMPTS        training prompts for sampling (JSONL with "prompt")           (data/embedded/prompts.jsonl)
#   EVAL_PROMPTS   held-out prompts with a reference "chosen"                    (data/embedded/eval.jsonl)
#   N              responses sampled per prompt                                  (4)
#   TEMPERATURE    sampling temperature                                          (1.0)
#   TOP_P          nucleus sampling                                               (1.0)
#   MAX_NEW_TOKENS generation limit for sampling and evaluation                  (32)
#   REWARD         label.py reward: "module:function", or a reward model dir/id  (embedded:proxy_reward)
#   GOLD           evaluate.py gold scorer: "module:function", or a model dir/id (embedded:gold_score)
#   EMBEDDED_DIR   where the embedded default's data is generated if missing     (data/embedded)
#   SEED           base seed; iteration k samples with SEED + k                  (0)
#   EXTRA_FLAGS    flags added to every python stage, e.g. "--trust_remote_code" (empty)
#   SAMPLE_ARGS, LABEL_ARGS, EVAL_ARGS
#                  extra flags of one stage, split on spaces, e.g. EVAL_ARGS="--batch_size 8" (empty)
#   DRY_RUN        1: print each stage's command instead of running it           (empty)
#
# Re-running the same command skips finished stages (each writes its output atomically) and resumes
# an interrupted training stage from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

KNOWN_KEYS=" DRY_RUN NAME RUNS_DIR NPROC K LOSS LOSS_ARGS REF BASE_MODEL SFT_DATA SFT_DIR SFT_CONFIG DPO_CONFIG PROMPTS EVAL_PROMPTS N TEMPERATURE TOP_P MAX_NEW_TOKENS REWARD GOLD EMBEDDED_DIR SEED EXTRA_FLAGS SAMPLE_ARGS LABEL_ARGS EVAL_ARGS "

if [ "$#" -gt 1 ]; then
  echo "usage: $0 [recipe-file]" >&2; exit 2
fi
if [ "$#" -eq 1 ]; then
  recipe=$1
  [ -f "$recipe" ] || { echo "error: $recipe: recipe file not found" >&2; exit 2; }
  lineno=0
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line=${line%%#*}
    line=${line#"${line%%[![:space:]]*}"}
    line=${line%"${line##*[![:space:]]}"}
    [ -z "$line" ] && continue
    case "$line" in
      *=*) key=${line%%=*}; value=${line#*=} ;;
      *) echo "error: $recipe:$lineno: expected KEY=VALUE, got: $line" >&2; exit 2 ;;
    esac
    case "$KNOWN_KEYS" in
      *" $key "*) ;;
      *) echo "error: $recipe:$lineno: unknown key $key" >&2; exit 2 ;;
    esac
    # Strip one pair of surrounding quotes; the value is data and is never evaluated.
    case "$value" in \"*\") value=${value:1:${#value}-2} ;; \'*\') value=${value:1:${#value}-2} ;; esac
    if [ -z "${!key+x}" ]; then  # the environment wins over the file
      printf -v "$key" '%s' "$value"
    fi
  done < "$recipe"
fi

LOSS=${LOSS:-ilrdpo}
NAME=${NAME:-$LOSS}
RUNS_DIR=${RUNS_DIR:-runs}
NPROC=${NPROC:-1}
K=${K:-3}
if [ -z "${LOSS_ARGS+x}" ] && [ "$LOSS" = ilrdpo ]; then LOSS_ARGS="--alpha 0.4"; fi
LOSS_ARGS=${LOSS_ARGS:-}
REF=${REF:-previous}
EMBEDDED_DIR=${EMBEDDED_DIR:-data/embedded}
BASE_MODEL=${BASE_MODEL:-$EMBEDDED_DIR/init_model}
SFT_DATA=${SFT_DATA-$EMBEDDED_DIR/sft.jsonl}
SFT_DIR=${SFT_DIR:-$RUNS_DIR/sft}
SFT_CONFIG=${SFT_CONFIG:-configs/sft.yaml}
DPO_CONFIG=${DPO_CONFIG:-configs/dpo.yaml}
PROMPTS=${PROMPTS:-$EMBEDDED_DIR/prompts.jsonl}
EVAL_PROMPTS=${EVAL_PROMPTS:-$EMBEDDED_DIR/eval.jsonl}
N=${N:-4}
TEMPERATURE=${TEMPERATURE:-1.0}
TOP_P=${TOP_P:-1.0}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-32}
REWARD=${REWARD:-embedded:proxy_reward}
GOLD=${GOLD:-embedded:gold_score}
SEED=${SEED:-0}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
DRY_RUN=${DRY_RUN:-}
SAMPLE_ARGS=${SAMPLE_ARGS:-}
LABEL_ARGS=${LABEL_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}

case "$REF" in previous|initial) ;; *) echo "error: REF must be 'previous' or 'initial', got '$REF'" >&2; exit 2 ;; esac
case "$K$NPROC$N$SEED" in *[!0-9]*) echo "error: K, NPROC, N and SEED must be non-negative integers" >&2; exit 2 ;; esac

read -r -a loss_args <<< "$LOSS_ARGS"
read -r -a extra_flags <<< "$EXTRA_FLAGS"
read -r -a sample_args <<< "$SAMPLE_ARGS"
read -r -a label_args <<< "$LABEL_ARGS"
read -r -a eval_args <<< "$EVAL_ARGS"
run_dir=$RUNS_DIR/$NAME
log() { if [ -n "$DRY_RUN" ]; then printf '# %s\n' "$*" >&2; else printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; fi; }
md() { [ -n "$DRY_RUN" ] || mkdir -p "$@"; }
md "$run_dir"

# One stage = one torchrun call (or plain python for one process), same flags either way.
launch() {
  local script=$1; shift
  if [ -n "$DRY_RUN" ]; then
    if [ "$NPROC" -gt 1 ]; then printf '%q ' torchrun --standalone --nproc_per_node "$NPROC"; else printf 'python3 '; fi
    printf '%q ' "$script" "$@" ${extra_flags[@]+"${extra_flags[@]}"}
    printf '\n'
    return
  fi
  if [ "$NPROC" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NPROC" "$script" "$@" ${extra_flags[@]+"${extra_flags[@]}"}
  else
    python3 "$script" "$@" ${extra_flags[@]+"${extra_flags[@]}"}
  fi
}

# A scorer is "module:function" (a Python reward) unless it names an existing path or has no colon.
if [[ "$REWARD" == *:* && ! -e "$REWARD" ]]; then reward_flags=(--reward_fn "$REWARD"); else reward_flags=(--reward_model "$REWARD"); fi
if [[ "$GOLD" == *:* && ! -e "$GOLD" ]]; then gold_flags=(--gold_fn "$GOLD"); else gold_flags=(--gold_model "$GOLD"); fi

# --- the embedded default's data, generated once from a seed --------------------------------------
if [ "$BASE_MODEL" = "$EMBEDDED_DIR/init_model" ] && [ ! -e "$EMBEDDED_DIR/eval.jsonl" ]; then
  log "embedded default: generating task data, tokenizer and tiny model in $EMBEDDED_DIR"
  if [ -n "$DRY_RUN" ]; then printf 'python3 embedded.py --out_dir %q --seed %q\n' "$EMBEDDED_DIR" "$SEED"
  else python3 embedded.py --out_dir "$EMBEDDED_DIR" --seed "$SEED"; fi
fi

# --- iteration 0: the starting policy -------------------------------------------------------------
if [ -n "$SFT_DATA" ]; then
  if [ ! -e "$SFT_DIR/model.safetensors" ]; then
    log "SFT: $BASE_MODEL on $SFT_DATA -> $SFT_DIR"
    launch sft.py --config "$SFT_CONFIG" --model "$BASE_MODEL" --data "$SFT_DATA" \
      --output_dir "$SFT_DIR" --seed "$SEED" --resume
  fi
  start_model=$SFT_DIR
else
  start_model=$BASE_MODEL
fi

# --- iterations ---------------------------------------------------------------------------------
policy=$start_model
for k in $(seq 1 "$K"); do
  it=$run_dir/iter$k
  md "$it"
  if [ ! -e "$it/samples.jsonl" ]; then
    log "iter $k: sample $N per prompt from $policy"
    launch sample.py --model "$policy" --prompts "$PROMPTS" --output "$it/samples.jsonl" \
      --num_responses "$N" --temperature "$TEMPERATURE" --top_p "$TOP_P" --max_new_tokens "$MAX_NEW_TOKENS" \
      --seed "$((SEED + k))" ${sample_args[@]+"${sample_args[@]}"}
  fi
  if [ ! -e "$it/pairs.jsonl" ]; then
    log "iter $k: label with $REWARD"
    launch label.py --samples "$it/samples.jsonl" --output_dir "$it" "${reward_flags[@]}" ${label_args[@]+"${label_args[@]}"}
  fi
  if [ "$REF" = initial ]; then ref=$start_model; else ref=$policy; fi
  if [ ! -e "$it/model/model.safetensors" ]; then
    log "iter $k: train --loss $LOSS from $policy"
    launch dpo.py --config "$DPO_CONFIG" --model "$policy" --ref_model "$ref" --data "$it/pairs.jsonl" \
      --output_dir "$it/model" --loss "$LOSS" --seed "$((SEED + k))" --resume ${loss_args[@]+"${loss_args[@]}"}
  fi
  policy=$it/model
done

# --- evaluation: iteration 0 (the starting model) and every iteration ----------------------------
sft_gen=$run_dir/iter0/eval/sft_generations.jsonl
for k in $(seq 0 "$K"); do
  if [ "$k" -eq 0 ]; then model=$start_model; else model=$run_dir/iter$k/model; fi
  out=$run_dir/iter$k/eval
  if [ ! -e "$out/eval.json" ]; then
    log "evaluate iteration $k"
    launch evaluate.py --model "$model" --sft_model "$start_model" --prompts "$EVAL_PROMPTS" \
      --output_dir "$out" --sft_generations "$sft_gen" --max_new_tokens "$MAX_NEW_TOKENS" \
      --seed "$SEED" "${gold_flags[@]}" ${eval_args[@]+"${eval_args[@]}"}
  fi
done

if [ -n "$DRY_RUN" ]; then printf 'python3 evaluate.py --summarize %q\n' "$run_dir"; exit 0; fi
python3 evaluate.py --summarize "$run_dir"
