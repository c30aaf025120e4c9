#!/usr/bin/env bash
# run_iterative.sh: the whole loop. SFT (optional), then for k = 1..K: sample -> label -> train, then
# evaluate every iteration (iteration 0 is the starting model) and print the summary table.
#
#   bash run_iterative.sh                        # embedded default: tiny model, synthetic task, iLR-DPO
#   LOSS=dpo bash run_iterative.sh               # the same with vanilla iterative DPO
#   LOSS=sigmoid+sft PAIR_RULE=best_second bash run_iterative.sh   # a mixture; label.py's --pair_rule
#   bash run_iterative.sh configs/storm7b.env    # a recipe: KEY=VALUE lines, '#' comments, read as data
#   DRY_RUN=1 bash run_iterative.sh              # print each stage's command instead of running it
#
# A setting comes from the environment, else from the recipe file (configs/embedded.env, the embedded
# default's toy settings, when none is given), else from its default below. LOSS_ARGS_<loss> holds
# flags for one loss only (used when LOSS_ARGS is unset). Relative paths are the caller's: they are
# taken from the directory the command runs in (an input not found there is passed on as given: a file
# of this repository, or a hub id), although every stage runs in this script's directory.
# Re-running the same command skips finished stages (each writes its output atomically) and resumes
# an interrupted training stage from its last checkpoint. Each iteration records the settings it
# ran with (RUNS_DIR/NAME/iterK/loop_settings.env); a rerun with other ones is refused.
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")"

KNOWN_KEYS=" DRY_RUN NAME RUNS_DIR NPROC K LOSS LOSS_ARGS REF BASE_MODEL SFT_DATA SFT_DIR SFT_CONFIG DPO_CONFIG PROMPTS EVAL_PROMPTS N TEMPERATURE TOP_P MAX_NEW_TOKENS REWARD GOLD PAIR_RULE EMBEDDED_DIR SEED EXTRA_FLAGS SAMPLE_ARGS LABEL_ARGS EVAL_ARGS WANDB_PROJECT "
from_recipe=" "  # the keys the recipe file set

fail() { echo "error: $*" >&2; exit 2; }

# A recipe: KEY=VALUE lines, KEY a known name; a line whose first character is '#' is a comment, and
# so is the rest of a line from a ' #'. A value may be quoted, "..." or '...', taken as it is to the
# closing quote ('#' included); nothing is evaluated. A key given twice is an error.
read_recipe() {
  local recipe=$1 lineno=0 line key value rest quote
  local -A first=()
  [ -f "$recipe" ] || fail "$recipe: recipe file not found"
  while IFS= read -r line || [ -n "$line" ]; do
    lineno=$((lineno + 1))
    line=${line#"${line%%[![:space:]]*}"}
    case "$line" in ''|'#'*) continue ;; *=*) ;; *) fail "$recipe:$lineno: expected KEY=VALUE, got: $line" ;; esac
    key=${line%%=*} value=${line#*=}
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || fail "$recipe:$lineno: '$key' is not a key (letters, digits and _)"
    case "$KNOWN_KEYS" in
      *" $key "*) ;;
      *) [[ "$key" =~ ^LOSS_ARGS_[a-z0-9_]+$ ]] || fail "$recipe:$lineno: unknown key $key" ;;
    esac
    [ -z "${first[$key]-}" ] || fail "$recipe:$lineno: $key given twice (first on line ${first[$key]})"
    first[$key]=$lineno
    case "$value" in
      \"*|\'*)
        quote=${value:0:1} rest=${value:1}
        [[ $rest == *"$quote"* ]] || fail "$recipe:$lineno: $key: no closing $quote"
        value=${rest%%"$quote"*} rest=${rest#*"$quote"}
        rest=${rest#"${rest%%[![:space:]]*}"}
        [[ -z $rest || $rest == '#'* ]] || fail "$recipe:$lineno: $key: text after the closing quote: $rest" ;;
      *)
        value=${value%%[[:space:]]#*}
        value=${value%"${value##*[![:space:]]}"} ;;
    esac
    if [ -z "${!key+x}" ]; then  # the environment wins over the file
      printf -v "$key" '%s' "$value"
      from_recipe+="$key "
    fi
  done < "$recipe"
}
[ "$#" -le 1 ] || { echo "usage: $0 [recipe-file]" >&2; exit 2; }
caller_path() { case $1 in ""|/*) printf '%s' "$1" ;; *) printf '%s' "$caller/$1" ;; esac; }  # an output
input_path() {  # the caller's file if there is one, else the value as given (this repository's file, a hub id)
  if [ -n "$1" ] && [ -e "$(caller_path "$1")" ]; then caller_path "$1"; else printf '%s' "$1"; fi
}
scorer_path() {  # a reward model path, or path/to/file.py:function, or module:function (left as it is)
  if [[ "$1" == *.py:* ]]; then printf '%s:%s' "$(input_path "${1%:*}")" "${1##*:}"; else input_path "$1"; fi
}
if [ "$#" -eq 1 ]; then read_recipe "$(caller_path "$1")"; else read_recipe configs/embedded.env; fi

: "${LOSS:=ilrdpo}"                        # any name in losses.LOSSES, or several joined by + (a mixture)
: "${NAME:=$LOSS}"                         # the run: everything of it goes to RUNS_DIR/NAME
: "${RUNS_DIR:=runs}"
: "${NPROC:=1}"                            # processes per stage (torchrun --nproc_per_node)
: "${K:=3}"                                # iterations
loss_args_of=LOSS_ARGS_$LOSS
: "${LOSS_ARGS=${!loss_args_of-}}"         # extra dpo.py flags, split on spaces, e.g. "--beta 0.2"
: "${REF:=previous}"                       # reference per iteration: the "previous" policy or the "initial" one
: "${EMBEDDED_DIR:=data/embedded}"         # where the embedded default's data is generated if missing
EMBEDDED_DIR=$(caller_path "$EMBEDDED_DIR")
embedded_model=$EMBEDDED_DIR/init_model
: "${BASE_MODEL:=$embedded_model}"         # model to start from (the SFT input when SFT_DATA is set)
BASE_MODEL=$(input_path "$BASE_MODEL")
if [ "$BASE_MODEL" = "$embedded_model" ]; then  # the embedded task's data, reward and gold
  : "${SFT_DATA=$EMBEDDED_DIR/sft.jsonl}" "${PROMPTS:=$EMBEDDED_DIR/prompts.jsonl}"
  : "${EVAL_PROMPTS:=$EMBEDDED_DIR/eval.jsonl}" "${REWARD:=embedded:proxy_reward}" "${GOLD:=embedded:gold_score}"
fi
missing=""
for key in PROMPTS EVAL_PROMPTS REWARD GOLD; do [ -n "${!key:-}" ] || missing+=" $key"; done
[ -z "$missing" ] || { echo "error: BASE_MODEL $BASE_MODEL is not the embedded default's model: set$missing" >&2; exit 2; }
: "${SFT_DATA:=}"                          # SFT data; empty: no SFT, start from BASE_MODEL
: "${SFT_DIR:=$RUNS_DIR/sft}"              # the SFT model, shared by runs with the same SFT
: "${SFT_CONFIG:=}" "${DPO_CONFIG:=}"      # YAML settings of sft.py and dpo.py; empty: the scripts' defaults
: "${PROMPTS:=}"                           # training prompts (JSONL with "prompt")
: "${EVAL_PROMPTS:=}"                      # held-out prompts with a reference "chosen"
: "${N:=4}"                                # responses sampled per prompt
: "${TEMPERATURE:=1.0}"
: "${TOP_P:=1.0}"
: "${MAX_NEW_TOKENS:=256}"                 # generation limit for sampling and evaluation (the stages' default)
: "${REWARD:=}"                            # label.py's reward: module:function, file.py:function, or a model
: "${GOLD:=}"                              # evaluate.py's gold scorer, likewise
: "${PAIR_RULE:=best_worst}"               # label.py's --pair_rule (its --length_penalty goes in LABEL_ARGS)
: "${SEED:=0}"                             # base seed; iteration k samples and trains with SEED + k
: "${EXTRA_FLAGS:=}"                       # flags for every python stage, e.g. "--trust_remote_code"
: "${SAMPLE_ARGS:=}" "${LABEL_ARGS:=}" "${EVAL_ARGS:=}"  # extra flags of one stage, split on spaces
: "${WANDB_PROJECT:=}"                     # also log training and evaluation to this W&B project; empty: off
: "${DRY_RUN:=}"

RUNS_DIR=$(caller_path "$RUNS_DIR") SFT_DIR=$(caller_path "$SFT_DIR")
SFT_DATA=$(input_path "$SFT_DATA") SFT_CONFIG=$(input_path "$SFT_CONFIG") DPO_CONFIG=$(input_path "$DPO_CONFIG")
PROMPTS=$(input_path "$PROMPTS") EVAL_PROMPTS=$(input_path "$EVAL_PROMPTS")
REWARD=$(scorer_path "$REWARD") GOLD=$(scorer_path "$GOLD")
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$caller"  # a module:function scorer may be the caller's module
if [ "$#" -eq 0 ] && [ "$BASE_MODEL" != "$embedded_model" ]; then  # a real model under the toy's settings
  echo "note: no recipe given, so configs/embedded.env's settings for the embedded toy task are in force:" \
    "$(for key in $from_recipe; do printf '%s=%s; ' "$key" "${!key}"; done)set them, or pass a recipe" >&2
fi

case "$REF" in previous|initial) ;; *) fail "REF must be 'previous' or 'initial', got '$REF'" ;; esac
for key in K NPROC N SEED; do  # bash arithmetic would read 010 as octal 8
  [[ ${!key} =~ ^(0|[1-9][0-9]{0,8})$ ]] || fail "$key=${!key}: need a whole number (digits, no leading 0)"
done
[ "$NPROC" -ge 1 ] || fail "NPROC=$NPROC: need at least one process"
[ "$N" -ge 2 ] || fail "N=$N: need at least two responses per prompt to make a pair"
read -r -a loss_args <<< "$LOSS_ARGS"
read -r -a extra_flags <<< "$EXTRA_FLAGS"
read -r -a sample_args <<< "$SAMPLE_ARGS"
read -r -a label_args <<< "$LABEL_ARGS"
read -r -a eval_args <<< "$EVAL_ARGS"
# A scorer is "module:function" (a Python reward) unless it names an existing path or has no colon.
if [[ "$REWARD" == *:* && ! -e "$REWARD" ]]; then reward_flags=(--reward_fn "$REWARD"); else reward_flags=(--reward_model "$REWARD"); fi
if [[ "$GOLD" == *:* && ! -e "$GOLD" ]]; then gold_flags=(--gold_fn "$GOLD"); else gold_flags=(--gold_model "$GOLD"); fi

# Every command goes through `run`: with DRY_RUN it is printed (shell-quoted) instead, and the log
# goes to stderr so that stdout holds only the commands.
if [ -n "$DRY_RUN" ]; then exec 3>&2; else exec 3>&1; fi
run() { if [ -n "$DRY_RUN" ]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&3; }
stage() {  # one stage = one torchrun call (plain python for one process), the same flags either way
  local script=$1; shift
  if [ "$NPROC" -gt 1 ]; then set -- torchrun --standalone --nproc_per_node "$NPROC" "$script" "$@"
  else set -- python3 "$script" "$@"; fi
  run "$@" ${extra_flags[@]+"${extra_flags[@]}"}
}
run_dir=$RUNS_DIR/$NAME

# What an iteration's results depend on (not NAME, RUNS_DIR, NPROC, K, DRY_RUN): recorded in each
# iteration's directory when it starts; a rerun with other values would mix them in one summary.
RECORDED_KEYS="LOSS LOSS_ARGS REF EMBEDDED_DIR BASE_MODEL SFT_DATA SFT_DIR SFT_CONFIG DPO_CONFIG PROMPTS EVAL_PROMPTS N
  TEMPERATURE TOP_P MAX_NEW_TOKENS REWARD GOLD SEED EXTRA_FLAGS SAMPLE_ARGS LABEL_ARGS EVAL_ARGS"
record=$(for key in $RECORDED_KEYS; do printf '%s=%q\n' "$key" "${!key}"; done)
check_recorded() {  # refuse to go on in an iteration directory that recorded other settings
  local file=$1/loop_settings.env line key now changed=""
  local -A before=()
  [ -f "$file" ] || return 0
  while IFS= read -r line; do before[${line%%=*}]=${line#*=}; done < "$file"
  for key in $RECORDED_KEYS; do
    now=$(printf '%q' "${!key}")
    [ "${before[$key]-}" = "$now" ] || changed+="; $key=${before[$key]-(unset)}, now $now"
  done
  [ -z "$changed" ] || fail "$file: made with other settings (${changed#; }); rerun with those, or use another NAME"
}
record_settings() {  # iteration directory
  check_recorded "$1"
  [ -z "$DRY_RUN" ] && [ ! -f "$1/loop_settings.env" ] || return 0
  mkdir -p "$1"
  printf '%s\n' "$record" > "$1/.loop_settings.env.$$.tmp"
  mv "$1/.loop_settings.env.$$.tmp" "$1/loop_settings.env"
}
for k in $(seq 0 "$K"); do check_recorded "$run_dir/iter$k"; done  # before any stage runs

# The embedded default's data, generated once from a seed.
if [ "$BASE_MODEL" = "$EMBEDDED_DIR/init_model" ] && [ ! -e "$EMBEDDED_DIR/eval.jsonl" ]; then
  log "embedded default: generating task data, tokenizer and tiny model in $EMBEDDED_DIR"
  run python3 embedded.py --out_dir "$EMBEDDED_DIR" --seed "$SEED"
fi

# Iteration 0: the starting policy.
start_model=$BASE_MODEL
if [ -n "$SFT_DATA" ]; then
  start_model=$SFT_DIR
  if [ ! -e "$SFT_DIR/model.safetensors" ]; then
    log "SFT: $BASE_MODEL on $SFT_DATA -> $SFT_DIR"
    stage sft.py ${SFT_CONFIG:+--config "$SFT_CONFIG"} --model "$BASE_MODEL" --data "$SFT_DATA" --output_dir "$SFT_DIR" \
      --seed "$SEED" --resume ${WANDB_PROJECT:+--wandb_project "$WANDB_PROJECT"}
  fi
fi

policy=$start_model
for k in $(seq 1 "$K"); do
  it=$run_dir/iter$k
  record_settings "$it"
  if [ ! -e "$it/samples.jsonl" ]; then
    log "iter $k: sample $N per prompt from $policy"
    stage sample.py --model "$policy" --prompts "$PROMPTS" --output "$it/samples.jsonl" --num_responses "$N" \
      --temperature "$TEMPERATURE" --top_p "$TOP_P" --max_new_tokens "$MAX_NEW_TOKENS" --seed "$((SEED + k))" \
      ${sample_args[@]+"${sample_args[@]}"}
  fi
  if [ ! -e "$it/pairs.jsonl" ]; then
    log "iter $k: label with $REWARD"
    stage label.py --samples "$it/samples.jsonl" --output_dir "$it" "${reward_flags[@]}" --pair_rule "$PAIR_RULE" \
      --seed "$((SEED + k))" ${label_args[@]+"${label_args[@]}"}
  fi
  if [ "$REF" = initial ]; then ref=$start_model; else ref=$policy; fi
  if [ ! -e "$it/model/model.safetensors" ]; then
    log "iter $k: train --loss $LOSS from $policy"
    stage dpo.py ${DPO_CONFIG:+--config "$DPO_CONFIG"} --model "$policy" --ref_model "$ref" --data "$it/pairs.jsonl" \
      --output_dir "$it/model" --loss "$LOSS" --seed "$((SEED + k))" --resume ${loss_args[@]+"${loss_args[@]}"} \
      ${WANDB_PROJECT:+--wandb_project "$WANDB_PROJECT"}
  fi
  policy=$it/model
done

# Evaluation of iteration 0 (the starting model) and of every iteration, against the same SFT samples.
for k in $(seq 0 "$K"); do
  if [ "$k" -eq 0 ]; then model=$start_model; record_settings "$run_dir/iter0"; else model=$run_dir/iter$k/model; fi
  if [ ! -e "$run_dir/iter$k/eval/eval.json" ]; then
    log "evaluate iteration $k"
    stage evaluate.py --model "$model" --sft_model "$start_model" --prompts "$EVAL_PROMPTS" \
      --output_dir "$run_dir/iter$k/eval" --sft_generations "$run_dir/iter0/eval/sft_generations.jsonl" \
      --max_new_tokens "$MAX_NEW_TOKENS" --seed "$SEED" "${gold_flags[@]}" ${eval_args[@]+"${eval_args[@]}"} \
      ${WANDB_PROJECT:+--wandb_project "$WANDB_PROJECT"}
  fi
done
run python3 evaluate.py --summarize "$run_dir"
