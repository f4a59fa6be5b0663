"""End-to-end tests of ``examples/translation``: the script runs as a subprocess, offline, on its embedded task.

Each run is shortened with ``--max_steps`` and small sample counts (about 10 s each on 2 CPU cores). The runs use one
thread (``OMP_NUM_THREADS=1``): the model is tiny, and a second thread only adds stalls when other processes share the
cores. ``HF_HOME`` points to a temporary directory so that no cache outside the test is read or written.
"""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "translation"
RUN_TRANSLATION = EXAMPLE_DIR / "run_translation.py"
PLOT_TRAINING = EXAMPLE_DIR / "plot_training.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_PREDICT_SAMPLES = 23
# A short run: 30 steps of batch 32, evaluation and prediction on a few sentences, generation capped at 16 tokens.
SHORT_RUN = [
    "--max_steps", "30",
    "--warmup_steps", "5",
    "--per_device_train_batch_size", "32",
    "--max_train_samples", "640",
    "--max_eval_samples", "40",
    "--max_predict_samples", str(NUM_PREDICT_SAMPLES),
    "--generation_max_length", "16",
    "--logging_steps", "5",
    "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_home")


def run_script(script, args, hf_home, timeout=120):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_success(result):
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def apo_lr_run(tmp_path_factory, hf_home):
    """The offline default with --apo lr, writing its corpus and tokenizer to <output_dir>/offline_default."""
    output_dir = tmp_path_factory.mktemp("apo_lr")
    result = run_script(
        RUN_TRANSLATION, ["--output_dir", output_dir, "--apo", "lr", "--apo_meta_interval", "5", *SHORT_RUN], hf_home
    )
    check_success(result)
    return output_dir


def read_log_history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.mark.slow
def test_offline_default_writes_results_predictions_and_plot(apo_lr_run):
    results = json.loads((apo_lr_run / "all_results.json").read_text())
    for key in ("eval_loss", "eval_bleu", "eval_exact_match", "train_loss", "predict_bleu", "predict_exact_match"):
        assert key in results, f"{key} missing from all_results.json: {sorted(results)}"
    assert 0.0 <= results["eval_exact_match"] <= 1.0
    assert 0.0 <= results["eval_bleu"] <= 100.0

    predictions = (apo_lr_run / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == NUM_PREDICT_SAMPLES

    assert (apo_lr_run / "training_curves.png").read_bytes()[:8] == PNG_SIGNATURE

    # The corpus went to the default cache dir, in the same format as user files, with disjoint splits.
    cache_dir = apo_lr_run / "offline_default"
    splits = {}
    for split in ("train", "validation", "test"):
        lines = (cache_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        splits[split] = {json.loads(line)["translation"]["en"] for line in lines}
    assert len(splits["train"]) == 8000 and len(splits["validation"]) == len(splits["test"]) == 1000
    assert not splits["train"] & splits["validation"] and not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]


@pytest.mark.slow
def test_offline_default_learns_and_logs_the_lr_multiplier(apo_lr_run):
    log_history = read_log_history(apo_lr_run)
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == 6
    # From about ln(vocabulary size) = 4.9 nats per token; 30 short steps already cut it by more than a third.
    assert losses[-1] < 0.65 * losses[0]
    results = json.loads((apo_lr_run / "all_results.json").read_text())
    assert results["eval_loss"] < 3.5

    multipliers = [entry["apo/lr_multiplier"] for entry in log_history if "apo/lr_multiplier" in entry]
    assert len(multipliers) == 6
    assert all(m > 0 for m in multipliers)
    assert any(m != 1.0 for m in multipliers), "6 meta steps ran, the learned LR multiplier should have moved"


@pytest.mark.slow
@pytest.mark.parametrize(
    "apo_args",
    [
        ["--apo", "none"],
        ["--apo", "precond", "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.1"],
    ],
    ids=["none", "precond"],
)
def test_other_apo_modes_run_and_plot(apo_args, apo_lr_run, hf_home, tmp_path):
    output_dir = tmp_path / "run"
    cache_dir = apo_lr_run / "offline_default"  # reuse the corpus and tokenizer of the first run
    result = run_script(
        RUN_TRANSLATION, ["--output_dir", output_dir, "--offline_cache_dir", cache_dir, *apo_args, *SHORT_RUN], hf_home
    )
    check_success(result)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_loss"] < 4.0

    apo_keys = {key for entry in read_log_history(output_dir) for key in entry if key.startswith("apo/")}
    if apo_args[1] == "none":
        assert not apo_keys
    else:
        assert "apo/left_trace_mean" in apo_keys

    # The plotting script also runs on its own, on any finished output dir (with or without apo/ keys).
    plot_file = tmp_path / "standalone.png"
    result = run_script(PLOT_TRAINING, [output_dir, "--output", plot_file], hf_home)
    check_success(result)
    assert plot_file.read_bytes()[:8] == PNG_SIGNATURE


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


BAD_DATA_FILES = ["missing_target_key", "missing_file", "csv_without_language_column"]


def bad_data_file(case, tmp_path):
    """A data file that cannot be read as translation pairs, and the start of the error naming it."""
    if case == "missing_target_key":
        data_file = tmp_path / "data.jsonl"
        pairs = [
            {"en": "one", "de": "eins"},
            {"en": "two", "de": "zwei"},
            {"en": "three"},
            {"en": "four", "de": "vier"},
        ]
        write_jsonl(data_file, [{"translation": pair} for pair in pairs])
        return data_file, f'--train_file {data_file}: record 3 has no "de" key in "translation"'
    if case == "missing_file":
        data_file = tmp_path / "does_not_exist.jsonl"
        return data_file, f"--train_file {data_file}: no such file"
    data_file = tmp_path / "data.csv"
    data_file.write_text("english,german\none,eins\n", encoding="utf-8")
    return data_file, f'--train_file {data_file}: no "en" column (columns: english, german)'


@pytest.mark.parametrize("case", BAD_DATA_FILES)
def test_bad_data_files_raise_an_error_naming_the_flag_and_the_file(case, data_files, tmp_path):
    data_file, expected = bad_data_file(case, tmp_path)
    input_errors = import_example_module("input_errors")
    with pytest.raises(input_errors.InputError) as raised:
        data_files.load_data_file("--train_file " + str(data_file), str(data_file), ("en", "de"),
                                  str(tmp_path / "cache"))
    assert str(raised.value).startswith(expected)


@pytest.mark.slow
def test_bad_input_ends_with_one_error_line(apo_lr_run, hf_home, tmp_path):
    """The script end to end (one of the cases above: every InputError takes the same way out)."""
    data_file, expected = bad_data_file("missing_target_key", tmp_path)
    args = ["--model_name_or_path", apo_lr_run, "--source_lang", "en", "--target_lang", "de"]
    args += ["--train_file", data_file, "--do_train", "--output_dir", tmp_path / "out"]
    result = run_script(RUN_TRANSLATION, args, hf_home)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert result.stderr.splitlines()[-1] == error_lines[0]
    assert error_lines[0].startswith("error: " + expected)


@pytest.mark.slow
def test_max_source_length_beyond_the_model_positions_is_an_error(apo_lr_run, hf_home, tmp_path):
    """Upstream's guard: the offline model has 128 position embeddings, so 129 source tokens cannot be encoded.

    The data are short enough that a run without the guard would train and exit 0. Not given, --max_source_length
    is the model's 128 (test_training_on_dates_and_numbers trains such a model with it unset).
    """
    cache_dir = apo_lr_run / "offline_default"
    args = ["--output_dir", tmp_path / "out", "--offline_cache_dir", cache_dir, "--max_source_length", "129"]
    result = run_script(RUN_TRANSLATION, [*args, *SHORT_RUN], hf_home)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [result.stderr.splitlines()[-1]]
    assert error_lines[0] == (
        "error: `--max_source_length` is set to 129, but the model only has 128 position encodings. Consider either "
        "reducing `--max_source_length` to 128 or using a model with larger position embeddings"
    )
    assert not (tmp_path / "out" / "all_results.json").exists()


# Texts that a reader left to infer types takes for something else: pyarrow's JSON reader types a column of ISO dates
# as timestamps, pandas' CSV reader a column of numbers as ints or floats ("007" -> 7, "1.50" -> 1.5) and reads
# "None", "NA", "null" as empty cells. Each list is one type throughout, as the inference needs.
TEXT_THAT_LOOKS_TYPED = {
    "dates": [
        {"en": "the first of March 2024", "de": "2024-03-01"},
        {"en": "the second of March 2024", "de": "2024-03-02"},
        {"en": "noon on the first of March 2024", "de": "2024-03-01T12:00:00"},
        {"en": "New Year's Eve 1999", "de": "1999-12-31"},
    ],
    "numbers": [
        {"en": "forty-two", "de": "42"},
        {"en": "zero zero seven", "de": "007"},
        {"en": "one point five zero", "de": "1.50"},
        {"en": "one thousand", "de": "1e3"},
    ],
    "missing_value_words": [
        {"en": "None", "de": "keine"},
        {"en": "NA", "de": "NA"},
        {"en": "null", "de": "null"},
        {"en": "nan", "de": "nan"},
    ],
}


def write_pairs(path, pairs):
    """``pairs`` as JSON lines (.jsonl) or as a CSV file (.csv), every value written as a string."""
    if path.suffix == ".csv":
        path.write_text("en,de\n" + "".join(f"{pair['en']},{pair['de']}\n" for pair in pairs), encoding="utf-8")
    else:
        write_jsonl(path, [{"translation": pair} for pair in pairs])
    return path


def import_example_module(name):
    """A module beside ``run_translation.py``, imported in this process (they import each other by bare names)."""
    sys.path.insert(0, str(EXAMPLE_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLE_DIR))


@pytest.fixture(scope="module")
def data_files():
    """``data_files.py``: the script's loading and checking of data files."""
    return import_example_module("data_files")


@pytest.mark.parametrize("kind", list(TEXT_THAT_LOOKS_TYPED))
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_data_files_are_read_as_text(suffix, kind, data_files, tmp_path):
    pairs = TEXT_THAT_LOOKS_TYPED[kind]
    data_file = write_pairs(tmp_path / f"data{suffix}", pairs)
    dataset = data_files.load_data_file(
        f"--train_file {data_file}", str(data_file), ("en", "de"), str(tmp_path / "cache")
    )
    assert dataset["translation"][:] == pairs


@pytest.mark.slow
def test_training_on_dates_and_numbers(apo_lr_run, hf_home, tmp_path):
    train_file = write_pairs(tmp_path / "train.jsonl", TEXT_THAT_LOOKS_TYPED["dates"])
    validation_file = write_pairs(tmp_path / "validation.csv", TEXT_THAT_LOOKS_TYPED["numbers"])
    output_dir = tmp_path / "out"
    args = ["--model_name_or_path", apo_lr_run, "--source_lang", "en", "--target_lang", "de"]
    args += ["--train_file", train_file, "--validation_file", validation_file, "--do_train", "--do_eval"]
    args += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no"]
    args += ["--predict_with_generate", "--generation_max_length", "8", "--output_dir", output_dir]
    result = run_script(RUN_TRANSLATION, args, hf_home)
    check_success(result)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_samples"] == len(TEXT_THAT_LOOKS_TYPED["numbers"])
    assert math.isfinite(results["train_loss"]) and math.isfinite(results["eval_loss"])


@pytest.mark.slow
def test_plot_training_reports_a_missing_state_file(hf_home, tmp_path):
    result = run_script(PLOT_TRAINING, [tmp_path], hf_home)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {tmp_path}: cannot read trainer_state.json")
