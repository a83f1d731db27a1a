"""The command line: config precedence, resume refusals, and errors without tracebacks."""

import pytest
import yaml
from click.testing import CliRunner

from conftest import SENTENCES
from qtune.cli import main
from qtune.config import TrainConfig


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_args(model, data, out):
    return ["--model", model, "--data", data, "--output", out, "--seq-len", 32, "--batch-size", 2, "--rank", 4,
            "--max-steps", 2, "--save-every", 2, "--eval-every", 0, "--compute-dtype", "float32"]


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n".join(SENTENCES * 40))
    return p


def test_config_file_is_overridden_by_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"rank": 8, "lr": 1e-3, "seq-len": 64}))
    cfg = TrainConfig.from_sources(cfg_file, rank=32, lr=None)
    assert (cfg.rank, cfg.lr, cfg.seq_len, cfg.alpha) == (32, 1e-3, 64, 16.0)


def test_train_resume_and_refusals(tiny_llama, corpus, tmp_path):
    out = tmp_path / "run"
    res = run("train", *tiny_args(tiny_llama, corpus, out))
    assert res.exit_code == 0, res.output
    assert "held-out loss" in res.output
    # the folder exists now: a second run is refused, not overwritten
    res = run("train", *tiny_args(tiny_llama, corpus, out))
    assert res.exit_code == 2 and "--overwrite" in res.output and "Traceback" not in res.output
    # resume with a different method/rank is refused, naming the difference
    res = run("train", "--output", out, "--resume", "--rank", 8)
    assert res.exit_code == 2 and "rank" in res.output and "differ" in res.output
    # resume extending max-steps continues from the checkpoint
    res = run("train", "--output", out, "--resume", "--max-steps", 3)
    assert res.exit_code == 0, res.output
    assert (out / "checkpoints" / "step-000003").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "Model path not found"),
    (["--method", "magic"], "unknown method"),
    (["--bits", "3"], "unsupported --bits"),
    (["--optim", "sgd"], "unknown --optim"),
    (["--rank", "0"], "--rank must be positive"),
    (["--seq-len", "0"], "--seq-len must be positive"),
    (["--packing", "greedy"], "--packing"),
    (["--rank", "100"], "larger than layer"),
    (["--data", "/no/such/data.jsonl"], "not found"),
])
def test_bad_input_gets_a_clear_error(tiny_llama, corpus, tmp_path, args, message):
    base = {"--model": tiny_llama, "--data": corpus, "--output": tmp_path / "o", "--seq-len": 32, "--max-steps": 1}
    flags = dict(base)
    for k, v in zip(args[::2], args[1::2]):
        flags[k] = v
    res = run("train", *[x for kv in flags.items() for x in kv])
    assert res.exit_code == 2, res.output
    assert message.lower() in res.output.lower() and "Traceback" not in res.output


def test_unsupported_architecture_is_named(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    res = run("train", "--model", folder, "--output", tmp_path / "o")
    assert res.exit_code == 2 and "'gpt2''s projections are transformers' Conv1D" in res.output, res.output
    assert "nn.Linear" in res.output and "Llama" in res.output


def test_generate_and_export_need_a_run(tmp_path):
    res = run("export", "--run", tmp_path / "nope", "--output", tmp_path / "x")
    assert res.exit_code == 2 and "not a qtune run folder" in res.output
    res = run("generate", "--prompt", "hi")
    assert res.exit_code == 2 and "exactly one of" in res.output


def test_a_tokenizer_from_another_model_is_named(tmp_path, corpus):
    from conftest import write_tiny_model
    from transformers import AutoConfig

    folder = write_tiny_model(tmp_path / "m")
    config = AutoConfig.from_pretrained(folder)
    config.vocab_size = 50  # smaller than the tokenizer's ids
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    res = run("train", *tiny_args(folder, corpus, tmp_path / "run"))
    assert res.exit_code == 2 and "does not belong to this model" in res.output, res.output


def test_python_dash_m_qtune_is_the_command_line():
    """`python -m qtune` (what `torchrun -m qtune` runs) is the same click group as the `qtune` script."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "qtune", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Usage: qtune train" in res.stdout and "--packing" in res.stdout
