"""Safety and bad inputs: nothing from a user's file is unpickled or executed (config and run.yaml
tags, remote code, chat templates), and the bad inputs not covered by test_cli / test_data /
test_loader / test_export each get a named error. Fixtures from tests/reliability.py."""


from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from qtune.checkpoint import MANIFEST
from qtune.config import TrainConfig
from qtune.train import train

from reliability import (REPO, SUBPROCESS_TIMEOUT, _entries, _one_thread, assert_only_complete_checkpoints,  # noqa: F401
                         cli_args, copy_run, corpus, losses, max_abs_diff, metric_rows, qtune_argv, run_cli,
                         subprocess_env, tiny_cfg, trained_run, warm_cache)  # fixtures among them


# --- 6. security --------------------------------------------------------------------------------

def _python_tag_yaml(marker: Path) -> str:
    return f'rank: 4\nlr: !!python/object/apply:os.system ["echo pwned > {marker}"]\n'


def test_config_file_with_a_python_tag_is_rejected_and_not_executed(tiny_llama, corpus, tmp_path):
    marker = tmp_path / "PWNED"
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text(_python_tag_yaml(marker))
    res = run_cli("train", "--config", cfg_file, "--model", tiny_llama, "--data", corpus, "--output", tmp_path / "o")
    assert not marker.exists()
    assert res.exit_code == 2, res.output
    assert str(cfg_file) in res.output and "not valid YAML" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_a_tampered_run_yaml_is_not_executed(trained_run, tmp_path):
    marker = tmp_path / "PWNED"
    run = copy_run(trained_run, tmp_path / "run")
    (run / "run.yaml").write_text(_python_tag_yaml(marker))
    for args in (["train", "--output", run, "--resume"], ["export", "--run", run, "--output", tmp_path / "x"],
                 ["generate", "--run", run, "--prompt", "hi"]):
        res = run_cli(*args)
        assert not marker.exists()
        assert res.exit_code != 0 and "Traceback" not in res.output, res.output


def test_a_malformed_run_yaml_gets_a_clear_error(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "run.yaml").write_text("rank: [4\n")
    for args in (["train", "--output", run, "--resume"], ["export", "--run", run, "--output", tmp_path / "x"]):
        res = run_cli(*args)
        assert res.exit_code == 2 and "run.yaml" in res.output, res.output


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    else f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else "")
            yield node, name


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def test_no_module_unpickles_executes_or_trusts_remote_code_by_default():
    """Read qtune/ and quant/ as source: no pickle, no torch.load without weights_only=True, no unsafe YAML,
    no eval/exec, and trust_remote_code only ever passed through from the (off by default) setting."""
    files = sorted((REPO / "qtune").rglob("*.py")) + sorted((REPO / "quant").rglob("*.py"))
    assert len(files) > 10
    problems = []
    for path in files:
        src = path.read_text()
        tree = ast.parse(src, filename=str(path))
        where = path.relative_to(REPO)
        for node, name in _calls(tree):
            at = f"{where}:{node.lineno}"
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                problems.append(f"{at}: torch.load without weights_only=True")
            if name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") or name in (
                    "Unpickler", "pickle.loads"):
                problems.append(f"{at}: {name} unpickles")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                problems.append(f"{at}: {name} (use yaml.safe_load)")
            if name in ("eval", "exec", "compile", "__import__"):
                problems.append(f"{at}: {name}()")
            if _kw(node, "trust_remote_code") is True:
                problems.append(f"{at}: trust_remote_code=True")
            if _kw(node, "allow_pickle") is True:
                problems.append(f"{at}: allow_pickle=True")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(m and m.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve") for m in mods):
                    problems.append(f"{where}:{node.lineno}: imports a pickle module")
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    problems.append(f"{where}:{node.lineno}: trust_remote_code default is not False")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                    node.args.kw_defaults
                for arg, default in zip(args, defaults):  # default None here: a required argument
                    if arg.arg == "trust_remote_code" and default is not None and not (
                            isinstance(default, ast.Constant) and default.value in (False, None)):
                        problems.append(f"{where}:{node.lineno}: {node.name}(trust_remote_code=...) default is not off")
        if re.search(r"\bpickle\.loads?\(|weights_only\s*=\s*False", src):
            problems.append(f"{where}: text mentions an unpickling call")
    assert not problems, "\n".join(problems)
    assert TrainConfig().trust_remote_code is False


def _remote_code_model(folder: Path, source: Path, model_type: str, marker: Path) -> Path:
    """A copy of the tiny model whose config.json (and tokenizer_config.json) point at code in the folder
    that would create `marker` when imported."""
    shutil.copytree(source, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "remote_code.Config", "AutoModelForCausalLM": "remote_code.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["remote_code.Tokenizer", "remote_code.Tokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "remote_code.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        f"class Config(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class Model(LlamaForCausalLM):\n    config_class = Config\n"
        "class Tokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return folder


def test_remote_code_in_a_model_folder_runs_only_with_trust_remote_code(tiny_llama, corpus, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # where trusted code is copied
    marker = tmp_path / "REMOTE_CODE_RAN"

    # a supported model_type with an auto_map: transformers' own Llama code is used, the folder's is not
    llama = _remote_code_model(tmp_path / "llama-with-code", Path(tiny_llama), "llama", marker)
    res = run_cli("train", *cli_args(llama, corpus, tmp_path / "o1", max_steps=1, save_every=0))
    assert res.exit_code == 0, res.output
    assert not marker.exists()

    # a model_type only the folder's code knows: refused, naming the custom code
    custom = _remote_code_model(tmp_path / "custom", Path(tiny_llama), "customlm", marker)
    res = run_cli("train", *cli_args(custom, corpus, tmp_path / "o2"))
    assert res.exit_code == 2 and "custom code" in res.output and "Traceback" not in res.output, res.output
    assert not marker.exists()

    # the flag is what allows it: the folder's code runs, and its model trains on the generic path
    res = run_cli("train", *cli_args(custom, corpus, tmp_path / "o3", max_steps=1, save_every=0), "--trust-remote-code")
    assert marker.exists(), res.output
    assert res.exit_code == 0, res.output
    execution = [json.loads(line) for line in (tmp_path / "o3" / "metrics.jsonl").read_text().splitlines()
                 if '"execution"' in line]
    assert execution and set(execution[0]["reasons"]) == {"generic (architecture customlm)"}, execution


def test_a_chat_template_cannot_execute_code(tmp_path):
    """tokenizer_config.json's chat template is Jinja in transformers' sandbox: no attribute escape runs."""
    from conftest import make_tokenizer
    from qtune.data import load_splits

    marker = tmp_path / "TEMPLATE_RAN"
    evil = ("{{ ''.__class__.__mro__[1].__subclasses__() }}{{ cycler.__init__.__globals__.os.system('touch "
            f"{marker}') }}{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}")
    tok = make_tokenizer(chat_template=evil)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "arr"}]}) + "\n")
    with pytest.raises(Exception):  # jinja2 SecurityError / UndefinedError: refused, not executed
        load_splits(data, None, tok, 32, eval_fraction=0)
    assert not marker.exists()


# --- 7. bad inputs not covered by test_cli / test_data / test_loader / test_export ----------------

@pytest.mark.parametrize("args, message", [
    (["--grad-accum", "0"], "--grad-accum must be positive"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--max-steps", "0"], "--max-steps must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--quant-type", "nf5"], "unknown --quant-type 'nf5'"),
    (["--init", "svd"], "unknown --init 'svd'"),
    (["--compute-dtype", "int8"], "unknown --compute-dtype 'int8'"),
    (["--lr-scheduler", "step"], "unknown --lr-scheduler 'step'"),
    (["--rosa-density", "2"], "--rosa-density must be in (0, 1)"),
    (["--target-modules", ","], "--target-modules is empty"),
    (["--init", "loftq", "--bits", "16"], "--bits 16 has none"),
    (["--target-modules", "qproj"], "No linear layer matches --target-modules qproj"),
    (["--eval-data", "/no/such/eval.jsonl"], "Dataset file not found: /no/such/eval.jsonl"),
    (["--data", "EMPTY_DIR"], "holds no .txt, .jsonl or dataset files"),
])
def test_more_bad_train_flags_get_a_clear_error(warm_cache, corpus, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY_DIR" else a for a in args]
    base = cli_args(warm_cache, corpus, tmp_path / "o")
    flags = dict(zip(base[::2], base[1::2]))
    flags.update(zip(args[::2], args[1::2]))
    res = run_cli("train", *[x for kv in flags.items() for x in kv])
    assert res.exit_code == 2, res.output
    assert message.lower() in res.output.lower() and "Traceback" not in res.output


@pytest.mark.parametrize("content, message", [
    (None, "Config file not found"),
    ("- rank: 4\n", "must hold a mapping"),
    ("rank: 4\nranks: 8\n", "unknown configuration key(s): ranks"),
    ("rank: [4\n", "not valid YAML"),
])
def test_bad_config_file_gets_a_clear_error(tmp_path, content, message):
    cfg_file = tmp_path / "run.yaml"
    if content is not None:
        cfg_file.write_text(content)
    res = run_cli("train", "--config", cfg_file, "--output", tmp_path / "o")
    assert res.exit_code == 2 and message.lower() in res.output.lower() and "Traceback" not in res.output, res.output


def test_resume_needs_output(tmp_path):
    res = run_cli("train", "--resume")
    assert res.exit_code == 2 and "--resume needs --output" in res.output and "Traceback" not in res.output


def test_resume_on_a_folder_without_run_yaml(tmp_path):
    (tmp_path / "notarun").mkdir()
    res = run_cli("train", "--resume", "--output", tmp_path / "notarun")
    assert res.exit_code == 2 and "has no run.yaml" in res.output and "without --resume" in res.output
    assert "Traceback" not in res.output


def test_resume_with_a_corrupt_latest_checkpoint_is_refused(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    with open(run / "checkpoints" / "step-000004" / "adapter.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe\xfd")
    res = run_cli("train", "--output", run, "--resume")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "step-000004" in res.output and "does not match its manifest" in res.output


def test_export_of_a_run_without_checkpoint_and_peft_of_rosa(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run", checkpoints=False)
    res = run_cli("export", "--run", run, "--output", tmp_path / "x")
    assert res.exit_code == 2 and "no complete checkpoint" in res.output and "--save-every" in res.output
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    (run / "run.yaml").write_text(yaml.safe_dump({**cfg, "method": "qrosa"}))
    res = run_cli("export", "--run", run, "--output", tmp_path / "x", "--format", "peft")
    assert res.exit_code == 2 and "PEFT has no format for method 'qrosa'" in res.output
    assert "--format merged" in res.output
    assert not (tmp_path / "x").exists()


def test_generate_from_a_run_without_checkpoint(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run", checkpoints=False)
    res = run_cli("generate", "--run", run, "--prompt", "hi")
    assert res.exit_code == 2 and "no complete checkpoint" in res.output and "Traceback" not in res.output


def test_chat_rows_longer_than_seq_len_are_truncated_and_counted(tmp_path):
    from conftest import make_tokenizer
    from qtune.data import load_splits

    rows = [{"messages": [{"role": "user", "content": f"Say {k}"}, {"role": "assistant", "content": "Arr."}]}
            for k in range(6)]
    rows.append({"messages": [{"role": "user", "content": "Tell a story"},
                              {"role": "assistant", "content": "the quick brown fox " * 30}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rows, _, stats = load_splits(data, None, make_tokenizer(), 48, eval_fraction=0)
    assert stats.truncated == 1 and stats.examples == 7
    assert int(train_rows.attention_mask.sum(1).max()) <= 48


# --- more kill windows (bugs found) -------------------------------------------------------------

class _Killed(BaseException):
    """Stands for SIGKILL in-process: no cleanup code of qtune can catch it."""


def test_a_kill_while_pruning_leaves_no_incomplete_step_folder(warm_cache, corpus, tmp_path, monkeypatch):
    import qtune.checkpoint as qc

    real_rmtree = shutil.rmtree

    def killed_midway(path, *a, **k):  # deletes the manifest (and a file), then the process dies
        path = Path(path)
        if (path / MANIFEST).is_file() and (path / "adapter.safetensors").is_file():
            (path / MANIFEST).unlink()
            (path / "adapter.safetensors").unlink()
            raise _Killed
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(qc.shutil, "rmtree", killed_midway)
    with pytest.raises(_Killed):
        train(tiny_cfg(warm_cache, corpus, tmp_path / "run", keep_checkpoints=1), progress=False)
    monkeypatch.undo()
    assert_only_complete_checkpoints(tmp_path / "run")


def test_resume_after_a_torn_metrics_line(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1, "lr"')  # the process died inside this write
    res = run_cli("train", "--output", run, "--resume", "--max-steps", 5)
    assert res.exit_code == 0, res.output
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]


def test_resuming_a_moved_run_folder_writes_into_that_folder(trained_run, tmp_path):
    original = copy_run(trained_run, tmp_path / "original")
    moved = shutil.copytree(original, tmp_path / "moved")  # run.yaml still names the original path
    res = run_cli("train", "--output", moved, "--resume", "--max-steps", 5)
    assert res.exit_code == 0, res.output
    assert not (original / "checkpoints" / "step-000005").exists(), "the resume wrote into the original folder"
    assert (moved / "checkpoints" / "step-000005").is_dir()
