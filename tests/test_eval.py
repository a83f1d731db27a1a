"""`qtune eval`: a run (quantized base + adapter) and a model folder (its merged export, plain transformers)
scored on the same blocks; the loss against the cross-entropy written here on transformers' own logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import SENTENCES
from qtune.cli import main
from qtune.config import TrainConfig
from qtune.data import load_blocks
from qtune.errors import QtuneError
from qtune.evaluate import evaluate_file
from qtune.export import export_merged, load_run
from qtune.train import train


@pytest.fixture(scope="module")
def run_and_data(tiny_model_factory, tmp_path_factory):
    """A tiny Llama trained a few steps (B ≠ 0), its held-out text, and a chat file (answer tokens only scored)."""
    tmp = tmp_path_factory.mktemp("eval-run")
    data = tmp / "corpus.txt"
    data.write_text("\n".join(SENTENCES * 40))
    held = tmp / "held.txt"
    held.write_text("\n".join(reversed(SENTENCES * 6)))
    chat = tmp / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": s[:20]},
                                                       {"role": "assistant", "content": s}]}) for s in SENTENCES))
    cfg = TrainConfig(model=str(tiny_model_factory("llama")), data=str(data), output=str(tmp / "run"), seq_len=32,
                      batch_size=2, rank=4, alpha=8, compute_dtype="float32", max_steps=4, eval_every=0, save_every=4,
                      lr=5e-3, warmup_steps=0)
    train(cfg, progress=False)
    return tmp / "run", held, chat


def reference_loss(model, blocks) -> tuple[float, int]:
    """Σ CE / count over the labelled next tokens, from transformers' own forward's full logits."""
    with torch.no_grad():
        logits = model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask).logits.float()
    targets = blocks.labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, ignore_index=-100, reduction="sum")
    return total.item() / int((targets != -100).sum()), int((targets != -100).sum())


@pytest.mark.parametrize("which", ["held", "chat"])
def test_eval_of_a_run_is_the_cross_entropy_of_its_model(run_and_data, which):
    run, held, chat = run_and_data
    data = held if which == "held" else chat
    result = evaluate_file(str(data), run_dir=str(run), progress=False)
    assert result.seq_len == 32 and result.compute_dtype == "float32"  # the run's
    _, model, tok, _, _ = load_run(run, progress=False, compute_dtype="float32")
    blocks, _ = load_blocks(str(data), tok, 32)
    # transformers on one example per row: what per-example packing must score (each example alone)
    want, tokens = reference_loss(model, load_blocks(str(data), tok, 32, packing="none")[0])
    assert result.tokens == tokens and result.rows == len(blocks)
    if which == "chat":  # only the answers are scored
        assert tokens < int(blocks.attention_mask.sum()) - len(blocks)
    assert result.loss == pytest.approx(want, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(want), rel=1e-5)


def test_eval_packing_scores_each_example_as_if_alone(run_and_data):
    """Per-example packing (the default) scores a packed chat file as transformers scores each example in
    a row of its own; contaminated packing (the old behaviour) as transformers scores the packed rows
    under a plain 2-D mask, which is another number."""
    run, _, chat = run_and_data
    _, model, tok, _, _ = load_run(run, progress=False, compute_dtype="float32")
    packed, _ = load_blocks(str(chat), tok, 128)
    alone, _ = load_blocks(str(chat), tok, 128, packing="none")
    assert max(len(set(r.tolist()) - {0}) for r in packed.segment_ids) >= 3 and len(alone) > len(packed)
    want, tokens = reference_loss(model, alone)
    for packing, rows in (("per-example", len(packed)), ("none", len(alone))):
        result = evaluate_file(str(chat), run_dir=str(run), seq_len=128, progress=False, packing=packing)
        assert (result.tokens, result.rows, result.packing) == (tokens, rows, packing)
        assert result.loss == pytest.approx(want, rel=1e-5)
    contaminated = evaluate_file(str(chat), run_dir=str(run), seq_len=128, progress=False, packing="contaminated")
    old, _ = load_blocks(str(chat), tok, 128, packing="contaminated")
    assert contaminated.loss == pytest.approx(reference_loss(model, old)[0], rel=1e-5)
    assert abs(contaminated.loss - want) > 1e-3 * want


def test_eval_of_the_merged_export_matches_the_run(run_and_data, tmp_path):
    run, held, _ = run_and_data
    merged = export_merged(run, tmp_path / "merged", progress=False)
    of_run = evaluate_file(str(held), run_dir=str(run), progress=False)
    of_export = evaluate_file(str(held), model=str(merged), seq_len=32, compute_dtype="float32", progress=False)
    assert of_export.tokens == of_run.tokens
    assert of_export.loss == pytest.approx(of_run.loss, rel=5e-3)  # the bound; fp16 rounding only
    untrained = evaluate_file(str(held), model=str(load_run(run, progress=False)[3]), seq_len=32,
                              compute_dtype="float32", progress=False)
    assert abs(untrained.loss - of_run.loss) > 1e-3  # the adapter changed the score: the comparison can fail


def test_eval_cli_json_and_errors(run_and_data, tmp_path):
    run, held, chat = run_and_data
    res = CliRunner().invoke(main, ["eval", "--run", str(run), "--data", str(held), "--seq-len", "16", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["seq_len"] == 16 and out["tokens"] > 0 and out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert out["packing"] == "per-example"
    res = CliRunner().invoke(main, ["eval", "--run", str(run), "--data", str(chat), "--packing", "none", "--json"])
    assert res.exit_code == 0 and json.loads(res.output.strip().splitlines()[-1])["packing"] == "none", res.output
    res = CliRunner().invoke(main, ["eval", "--run", str(run), "--data", str(held), "--packing", "greedy"])
    assert res.exit_code == 2 and "--packing" in res.output
    res = CliRunner().invoke(main, ["eval", "--data", str(held)])
    assert res.exit_code == 2 and "exactly one of --run" in res.output
    res = CliRunner().invoke(main, ["eval", "--run", str(run), "--data", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "Data not found" in res.output
    res = CliRunner().invoke(main, ["eval", "--run", str(tmp_path), "--data", str(held)])
    assert res.exit_code == 2 and "not a qtune run folder" in res.output
    with pytest.raises(QtuneError, match="positive integer"):
        evaluate_file(str(held), run_dir=str(run), seq_len=-1, progress=False)
