"""--wandb_project: training and evaluation metrics also go to Weights & Biases, tested in its offline
mode (local files, no network); off by default, and then wandb is never imported."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dpo  # noqa: E402
import evaluate  # noqa: E402
from conftest import write_jsonl  # noqa: E402


def offline_run_records(wandb_dir: Path, output_dir: Path) -> bytes:
    """The records of the offline run named after output_dir (its id is fixed by the directory): one
    .wandb file of protobuf records, in which keys and values (as JSON text) can be found as they are."""
    run_id = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]
    (path,) = (wandb_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    return path.read_bytes()


@pytest.mark.slow  # two wandb runs start a wandb service each: seconds apiece on an idle machine
def test_training_and_evaluation_metrics_go_to_wandb_offline(tiny_model_dir, tiny_prefs_jsonl, tmp_path,
                                                             monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    s = dpo.Settings(model=str(tiny_model_dir), data=str(tiny_prefs_jsonl), output_dir=str(tmp_path / "dpo"),
                     loss="dpo", batch_size=8, max_steps=2, lr=1e-3, warmup_steps=0, save_every=0,
                     wandb_project="brevity-test")
    dpo.main(s, dpo.loss_settings("dpo")())
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "list three fruits", "chosen": "apple pear plum"}] * 4)
    evaluate.main(evaluate.Settings(model=str(tmp_path / "dpo"), sft_model=str(tiny_model_dir), prompts=str(prompts),
                                    gold_fn=f"{Path(__file__).resolve()}:word_count", output_dir=str(tmp_path / "ev"),
                                    max_new_tokens=8, wandb_project="brevity-test"))
    import wandb

    wandb.teardown()  # the wandb service writes the run files; this waits for it to finish them
    runs = {name: offline_run_records(tmp_path, tmp_path / name) for name in ("dpo", "ev")}
    last = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "lr", "train_s"):
        assert key.encode() in runs["dpo"], key
    assert json.dumps(last["loss"]).encode() in runs["dpo"]
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for key in ("gold_score", "win_rate_vs_sft", "kl_vs_sft", "length"):
        assert key.encode() in runs["ev"], key
    assert json.dumps(ev["gold_score"]).encode() in runs["ev"]


def test_without_the_flag_wandb_is_never_imported(tiny_model_dir, tiny_prefs_jsonl, tmp_path):
    code = ("import sys, dpo; s = dpo.Settings(model=sys.argv[1], data=sys.argv[2], output_dir=sys.argv[3], "
            "loss='dpo', batch_size=8, max_steps=1, save_every=0); dpo.main(s, dpo.loss_settings('dpo')()); "
            "assert 'wandb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), str(tiny_prefs_jsonl), str(tmp_path / "out")],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def word_count(prompts, responses):
    return [float(len(r.split())) for r in responses]
