"""run_iterative.sh end to end on the embedded default, shrunk: a one-iteration smoke run, a kill in
iteration 2 followed by a rerun, the recipe files, and the script's handling of paths and input.

Every run here uses paths with spaces, so quoting is tested by all of them.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from brevity import config, files

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_iterative.sh"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Embedded data with few prompts, small SFT and DPO configs, and an SFT model shared by the runs."""
    base = tmp_path_factory.mktemp("loop") / "with space"
    data = base / "data"
    subprocess.run(["python3", str(ROOT / "embedded.py"), "--out_dir", str(data), "--seed", "0"], check=True,
                   capture_output=True)
    for name, keep in (("prompts.jsonl", 24), ("eval.jsonl", 12)):
        lines = (data / name).read_text(encoding="utf-8").splitlines()[:keep]
        (base / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (base / "sft.yaml").write_text("max_steps: 30\nbatch_size: 32\nlr: 2.0e-3\nmax_length: 128\n"
                                   "activation_checkpointing: false\n")
    (base / "dpo.yaml").write_text("epochs: 1\nbatch_size: 8\nlr: 1.0e-4\nmax_length: 128\nsave_every: 1\n"
                                   "activation_checkpointing: false\n")
    env = {**os.environ, "TQDM_DISABLE": "1", "EMBEDDED_DIR": str(data), "PROMPTS": str(base / "prompts.jsonl"),
           "EVAL_PROMPTS": str(base / "eval.jsonl"), "SFT_CONFIG": str(base / "sft.yaml"),
           "DPO_CONFIG": str(base / "dpo.yaml"), "SFT_DIR": str(base / "sft model"), "MAX_NEW_TOKENS": "16",
           "N": "3", "OMP_NUM_THREADS": "1"}
    return base, env


def run(env: dict, *args: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**env, **extra}, capture_output=True, text=True,
                          timeout=600)


def stage_lines(stdout: str) -> list[str]:
    """The script's own log lines ("[hh:mm:ss] iter 1: sample ..."): one per stage it ran."""
    return [line.split("] ", 1)[1] for line in stdout.splitlines() if line.startswith("[") and "] " in line]


@pytest.mark.slow
def test_one_iteration_smoke_run_then_a_rerun_does_nothing(setup):
    base, env = setup
    runs = base / "runs dir"
    done = run(env, RUNS_DIR=str(runs), K="1", LOSS="ilrdpo", NAME="smoke")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(":")[0] for line in stage_lines(done.stdout)] == [
        "SFT", "iter 1", "iter 1", "iter 1", "evaluate iteration 0", "evaluate iteration 1"]
    run_dir = runs / "smoke"
    table = files.read_jsonl(run_dir / "summary.jsonl")
    assert [row["iteration"] for row in table] == [0, 1]
    assert table[0]["kl_vs_sft"] == pytest.approx(0.0, abs=1e-4) and table[0]["win_rate_vs_sft"] == 0.5
    assert table[1]["sampled/pairs_written"] > 0 and table[1]["length"] > 0
    assert "| 1 |" in (run_dir / "summary.md").read_text()
    settings = json.loads((run_dir / "iter1" / "model" / "settings.json").read_text())
    assert settings["loss"] == "ilrdpo" and settings["alpha"] == 0.4  # the run's default length margin
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(run_dir / "iter1" / "model")  # a Hugging Face directory

    again = run(env, RUNS_DIR=str(runs), K="1", LOSS="ilrdpo", NAME="smoke")
    assert again.returncode == 0 and stage_lines(again.stdout) == []


@pytest.mark.slow
def test_killed_in_iteration_2_the_rerun_finishes_without_redoing_iteration_1(setup):
    base, env = setup
    common_env = {"K": "2", "LOSS": "dpo"}
    whole = run(env, RUNS_DIR=str(base / "uninterrupted"), NAME="r", **common_env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    runs, run_dir = base / "killed", base / "killed" / "r"
    proc = subprocess.Popen(["bash", str(SCRIPT)], env={**env, "RUNS_DIR": str(runs), "NAME": "r", **common_env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not list((run_dir / "iter2" / "model").glob("checkpoint-*")):  # iteration 2 is training
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "iter2" / "model" / "model.safetensors").exists()
    iter1 = {p: p.stat().st_mtime_ns for p in (run_dir / "iter1").rglob("*") if p.is_file()}

    rerun = run(env, RUNS_DIR=str(runs), NAME="r", **common_env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ran = stage_lines(rerun.stdout)
    assert not any(line.startswith(("SFT", "iter 1:")) for line in ran) and ran[0].startswith("iter 2: train")
    assert {p: p.stat().st_mtime_ns for p in iter1} == iter1  # iteration 1 untouched
    for k in (1, 2):  # the same artifacts as the run never interrupted
        for name in ("samples.jsonl", "pairs.jsonl"):
            assert (run_dir / f"iter{k}" / name).read_bytes() == \
                (base / "uninterrupted" / "r" / f"iter{k}" / name).read_bytes()
    ours = load_file(run_dir / "iter2" / "model" / "model.safetensors")
    theirs = load_file(base / "uninterrupted" / "r" / "iter2" / "model" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert len(files.read_jsonl(run_dir / "summary.jsonl")) == 3


def parse_command(line: str) -> None:
    """Parse a printed stage command with that script's own settings parser (nothing runs)."""
    argv = shlex.split(line)
    if argv[0] == "torchrun":
        argv = argv[argv.index("--nproc_per_node") + 2:]
    else:
        assert argv[0] == "python3"
        argv = argv[1:]
    script, args = argv[0], argv[1:]
    module = importlib.import_module(Path(script).stem)
    if script == "dpo.py":
        config.parse_settings(module.settings_classes(args), args)
    else:
        config.parse_settings((module.Settings,), args)


def dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, cwd=ROOT)


def test_a_dry_run_prints_the_commands_and_writes_nothing(tmp_path):
    printed = dry_run(RUNS_DIR=str(tmp_path / "r s"), EMBEDDED_DIR=str(tmp_path / "data"))
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines()[0].startswith("python3 embedded.py")  # the data is missing
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("recipe", [None, "configs/storm7b.env"])
def test_every_command_of_a_recipe_parses_with_its_script(recipe, tmp_path):
    args = [recipe] if recipe else []
    printed = dry_run(*args, RUNS_DIR=str(tmp_path / "r s"))
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    scripts = [shlex.split(line)[1] if line.startswith("python3") else shlex.split(line)[5] for line in lines]
    assert scripts.count("dpo.py") == 3 and scripts.count("evaluate.py") == 5 and scripts.count("sample.py") == 3
    for line in lines:
        if "--summarize" not in line and "embedded.py" not in line:
            parse_command(line)
    if recipe:  # the paper's recipe: its hub ids, and the converted reward models
        text = printed.stdout
        for needed in ("--model openchat/openchat-3.5-0106", "--prompts data/storm7b/prompts.jsonl",
                       "--reward_model ckpt/starling-rm-34b-hf", "--loss ilrdpo", "--alpha 0.01",
                       "--gold_model ckpt/oasst-rm-2.1-pythia-1.4b-hf"):
            assert needed in text
        assert "sft.py" not in scripts  # openchat-3.5 is already instruction-tuned


def test_a_recipe_is_data_never_code(tmp_path):
    """Command substitutions in a recipe's values are never run: they reach the commands as literal text
    (NAME in the run directory, LOSS_ARGS split on spaces into dpo.py's flags)."""
    marker = tmp_path / "pwned"
    recipe = tmp_path / "my recipe.env"
    recipe.write_text(f"# a comment\nNAME=\"$(touch '{marker}')\"\nLOSS_ARGS=--beta `touch '{marker}'`\n"
                      f"K=1\n")
    printed = dry_run(str(recipe), RUNS_DIR=str(tmp_path / "runs"))
    assert printed.returncode == 0, printed.stderr
    assert not marker.exists()
    commands = [shlex.split(line) for line in printed.stdout.splitlines()]
    assert commands[-1][-2:] == ["--summarize", f"{tmp_path / 'runs'}/$(touch '{marker}')"]
    (dpo_command,) = [c for c in commands if c[1] == "dpo.py"]
    assert dpo_command[-3:] == ["--beta", "`touch", f"'{marker}'`"]


@pytest.mark.parametrize("content, message", [
    ("LOSS=dpo\nBOGUS=1\n", "my recipe.env:2: unknown key BOGUS"),
    ("LOSS=dpo\njust words\n", "my recipe.env:2: expected KEY=VALUE"),
])
def test_a_bad_recipe_line_is_a_one_line_error_naming_file_and_line(content, message, tmp_path):
    recipe = tmp_path / "my recipe.env"
    recipe.write_text(content)
    result = dry_run(str(recipe))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_the_environment_wins_over_the_recipe(tmp_path):
    printed = dry_run("configs/storm7b.env", K="1", LOSS="dpo")
    assert printed.returncode == 0 and "--loss dpo" in printed.stdout and "iter2" not in printed.stdout


def test_the_smollm2_recipe_runs_plain_dpo_in_its_own_directory_without_ilrdpos_margin():
    ilrdpo, plain = dry_run("configs/smollm2.env", K="1"), dry_run("configs/smollm2.env", K="1", LOSS="dpo")
    assert ilrdpo.returncode == 0 and plain.returncode == 0, plain.stderr
    assert "--alpha 0.15" in ilrdpo.stdout and "--alpha" not in plain.stdout
    assert "runs/smollm2/ilrdpo/iter1" in ilrdpo.stdout and "runs/smollm2/dpo/iter1" in plain.stdout


def test_relative_paths_are_the_callers_not_the_repositorys(tmp_path):
    """P1: the script runs every stage in its own directory, but a relative path means what it means
    where the command was typed: the caller's model and prompts are found, outputs land there."""
    (tmp_path / "my model").mkdir()
    (tmp_path / "my model" / "config.json").write_text("{}")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi", "chosen": "hello"}\n')
    env = {**os.environ, "DRY_RUN": "1", "K": "1", "BASE_MODEL": "my model", "PROMPTS": "p.jsonl",
           "EVAL_PROMPTS": "p.jsonl", "REWARD": "my_reward.py:score", "GOLD": "org/gold-model"}
    printed = subprocess.run(["bash", str(SCRIPT), str(ROOT / "configs" / "smollm2.env")], env=env,
                             capture_output=True, text=True, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    sample = shlex.split(next(line for line in printed.stdout.splitlines() if "sample.py" in line))
    assert sample[sample.index("--model") + 1] == str(tmp_path / "my model")
    assert sample[sample.index("--prompts") + 1] == str(tmp_path / "p.jsonl")
    assert sample[sample.index("--output") + 1].startswith(str(tmp_path / "runs"))
    assert f"--reward_fn {shlex.quote(str(tmp_path / 'my_reward.py'))}:score" not in printed.stdout  # not there
    assert "--reward_fn my_reward.py:score" in printed.stdout and "--gold_model org/gold-model" in printed.stdout
    assert "--config configs/smollm2_dpo.yaml" in printed.stdout  # not in the caller's directory: the repo's


def test_a_real_model_without_a_recipe_is_told_which_toy_settings_are_in_force(tmp_path):
    """P2: the embedded default's toy settings (configs/embedded.env) reach another model only with a note
    naming each one; a model without prompts, reward and gold is refused."""
    env = {**os.environ, "DRY_RUN": "1", "K": "1", "BASE_MODEL": "org/model", "RUNS_DIR": str(tmp_path)}
    refused = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "set PROMPTS EVAL_PROMPTS REWARD GOLD" in refused.stderr
    env.update(PROMPTS="p.jsonl", EVAL_PROMPTS="e.jsonl", REWARD="rm", GOLD="gold", MAX_NEW_TOKENS="512")
    printed = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    note = [line for line in printed.stderr.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "LOSS_ARGS_ilrdpo=--alpha 0.4" in note[0] and "configs/dpo.yaml" in note[0]
    assert "MAX_NEW_TOKENS" not in note[0]  # set by the caller
    assert "sft.py" not in printed.stdout  # no SFT on the toy's data for another model


def test_a_recipe_leaves_out_the_toy_settings(tmp_path):
    """P2: what a recipe does not set takes the stages' own defaults, not the embedded toy's."""
    recipe = tmp_path / "r.env"
    recipe.write_text("K=1\nBASE_MODEL=org/model\nPROMPTS=p.jsonl\nEVAL_PROMPTS=e.jsonl\nREWARD=rm\nGOLD=gold\n")
    printed = subprocess.run(["bash", str(SCRIPT), str(recipe)], env={**os.environ, "DRY_RUN": "1",
                                                                     "RUNS_DIR": str(tmp_path)},
                             capture_output=True, text=True, cwd=ROOT)
    assert printed.returncode == 0 and "note:" not in printed.stderr, printed.stderr
    dpo = next(line for line in printed.stdout.splitlines() if "dpo.py" in line)
    assert "--config" not in dpo and "--alpha" not in dpo
    assert "--max_new_tokens 256" in printed.stdout and "sft.py" not in printed.stdout


def test_every_setting_of_the_script_is_a_recipe_key_and_back():
    """The defaults block (`: "${KEY:=...}"`) and KNOWN_KEYS name the same settings."""
    import re
    text = SCRIPT.read_text()
    known = set(re.search(r'KNOWN_KEYS=" (.*) "', text).group(1).split())
    defaulted = set(re.findall(r'"\$\{([A-Z_]+):?=', text)) | {"LOSS_ARGS"}
    assert known == defaulted


def test_pair_rule_reaches_label_py(tmp_path):
    recipe = tmp_path / "rule.env"
    recipe.write_text("PAIR_RULE=length_penalised\nLABEL_ARGS=--length_penalty 0.05\nK=1\n")
    printed = subprocess.run(["bash", str(SCRIPT), str(recipe)], env={**os.environ, "DRY_RUN": "1",
                                                                     "RUNS_DIR": str(tmp_path / "runs")},
                             capture_output=True, text=True, cwd=ROOT)
    assert printed.returncode == 0, printed.stderr
    (line,) = [x for x in printed.stdout.splitlines() if "label.py" in x]
    assert "--pair_rule length_penalised --seed 1 --length_penalty 0.05" in line
    parse_command(line)


@pytest.mark.slow
@pytest.mark.parametrize("loss, loss_args, pair_rule, label_args", [
    ("exo_pair", "", "best_worst", ""),
    ("sigmoid+bco_pair+sft", "--loss_weights 0.8,0.2,1.0", "best_second", ""),
    ("dpo", "--ld_alpha 0.5", "all_pairs", ""),
    ("ipo", "--sampo", "length_penalised", "--length_penalty 0.05"),
    ("dpo", "--sync_ref_model --ref_model_sync_steps 2", "best_random", ""),
], ids=["exo_pair", "mpo-mixture", "ld-dpo", "ipo-sampo", "tr-dpo"])
def test_a_loss_and_a_pair_rule_run_in_the_loop(setup, loss, loss_args, pair_rule, label_args):
    """One iteration with LOSS, LOSS_ARGS and PAIR_RULE: every stage runs, the pairs follow the rule, the
    model trains with the loss and its options."""
    base, env = setup
    name = f"{loss}-{pair_rule}"
    done = run(env, RUNS_DIR=str(base / "loop runs"), K="1", LOSS=loss, LOSS_ARGS=loss_args, PAIR_RULE=pair_rule,
               LABEL_ARGS=label_args, NAME=name)
    assert done.returncode == 0, done.stderr[-3000:]
    it = base / "loop runs" / name / "iter1"
    assert json.loads((it / "label_stats.json").read_text())["pair_rule"] == pair_rule
    settings = json.loads((it / "model" / "settings.json").read_text())
    assert settings["loss"] == loss
    rows = [json.loads(x) for x in (it / "model" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert files.read_jsonl(base / "loop runs" / name / "summary.jsonl")[1]["length"] > 0
