"""`qtune eval`: the held-out loss and perplexity of a run (its quantized base + adapter) or of any model
folder (e.g. a merged export, loaded by plain transformers), scored the same way.

Both are scored on the same blocks: the whole data file cut into --seq-len windows (instruction and
chat rows packed as in training, each attending to itself only under the default --packing per-example,
only their answer tokens scored), in the same compute dtype, by the
same loss (qtune.engine: the model's own head transforms included). So a merged export and the run it
came from can be compared number for number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qtune.errors import QtuneError

DEFAULT_SEQ_LEN = 256


@dataclass
class Score:
    loss: float        # mean next-token cross-entropy over the scored tokens (nats)
    tokens: int        # scored tokens
    rows: int          # blocks of seq_len
    seq_len: int
    compute_dtype: str
    source: str        # "run RUN" or "model DIR"
    packing: str = "per-example"

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    def to_json(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "rows": self.rows,
                "seq_len": self.seq_len, "compute_dtype": self.compute_dtype, "source": self.source,
                "packing": self.packing}

    def __str__(self) -> str:
        return (f"{self.source}: loss {self.loss:.4f}, perplexity {self.perplexity:.3f} over {self.tokens:,} tokens "
                f"({self.rows} rows of {self.seq_len}, {self.compute_dtype})")


def load_scored_model(run_dir: str | None, model: str | None, compute_dtype: str | None, progress: bool = True):
    """(model, tokenizer, seq_len the run used or None, compute dtype name, source label)."""
    from qtune.loader import DTYPES
    from qtune.precision import resolve_compute_dtype

    if (run_dir is None) == (model is None):
        raise QtuneError("Pass exactly one of --run RUN_DIR or --model PATH.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if run_dir is not None:
        from qtune.config import TrainConfig, load_run_yaml
        from qtune.export import load_run

        if not (Path(run_dir) / "run.yaml").is_file():
            raise QtuneError(f"{run_dir} is not a qtune run folder (no run.yaml). Pass --run the --output of `qtune train`.")
        run_cfg = TrainConfig.from_dict(load_run_yaml(Path(run_dir)))
        dtype = resolve_compute_dtype(compute_dtype or run_cfg.compute_dtype, device, warn=False)
        cfg, m, tok, _, ckpt = load_run(Path(run_dir), progress=progress, compute_dtype=dtype)
        return m, tok, cfg.seq_len, dtype, f"run {run_dir} ({ckpt.name})"
    from transformers import AutoModelForCausalLM

    from qtune.loader import load_config, load_tokenizer, resolve_model_dir, shard_files

    folder = resolve_model_dir(model)
    load_config(folder)
    shard_files(folder)  # safetensors only: pickles are refused with the reason
    dtype = resolve_compute_dtype(compute_dtype or "auto", device, warn=False)
    tok = load_tokenizer(folder)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], use_safetensors=True)
    return m, tok, None, dtype, f"model {folder}"


@torch.no_grad()
def score(model, blocks, batch_size: int = 4, progress: bool = True) -> tuple[float, int]:
    """(mean per-token loss, tokens scored) of the blocks through the model's engine (qtune.engine)."""
    from qtune.engine import causal_lm_loss

    was = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(total=len(blocks), desc="scoring", unit="row", disable=not progress)
    try:
        for i in range(0, len(blocks), batch_size):
            s = slice(i, i + batch_size)
            loss, n = causal_lm_loss(model, blocks.input_ids[s], blocks.segment_ids[s], blocks.labels[s])
            total, count = total + loss.item(), count + n
            bar.update(blocks.input_ids[s].shape[0])
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    finally:
        bar.close()
        model.train(was)
    return total / max(count, 1), count


def evaluate_file(data: str, run_dir: str | None = None, model: str | None = None, seq_len: int | None = None,
                  compute_dtype: str | None = None, batch_size: int = 4, progress: bool = True,
                  packing: str = "per-example") -> Score:
    from qtune.data import load_blocks

    if not Path(data).exists():
        raise QtuneError(f"Data not found: {data}. Pass --data a .jsonl/.txt file or a folder of them.")
    m, tok, run_seq_len, dtype, source = load_scored_model(run_dir, model, compute_dtype, progress)
    seq_len = seq_len or run_seq_len or DEFAULT_SEQ_LEN
    blocks, _ = load_blocks(data, tok, seq_len, packing)
    loss, tokens = score(m, blocks, batch_size, progress)
    return Score(loss, tokens, len(blocks), seq_len, dtype, source, packing)
