"""Greedy generation from a run (adapter on its quantized base) or a plain model folder."""

from __future__ import annotations

from pathlib import Path

import torch


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt as the model expects it: its chat template if it has one, else raw text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def generate_with(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    ids = chat_prompt_ids(tokenizer, prompt)
    model.eval()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, use_cache=True)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate_text(prompt: str, run_dir: str | None = None, model: str | None = None, max_new_tokens: int = 64) -> str:
    if run_dir is not None:
        from qtune.export import load_run

        _, m, tok, _, _ = load_run(Path(run_dir), progress=False)
    else:
        from qtune.loader import DTYPES, load_config, load_tokenizer, resolve_model_dir
        from qtune.precision import resolve_compute_dtype
        from transformers import AutoModelForCausalLM

        folder = resolve_model_dir(model)
        load_config(folder)
        tok = load_tokenizer(folder)
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[resolve_compute_dtype("auto", "cpu")])
    return generate_with(m, tok, prompt, max_new_tokens)


@torch.no_grad()
def prefix_rate(model, tokenizer, prompts: list[str], prefix: str, max_new_tokens: int = 8) -> float:
    """Fraction of prompts whose greedy answer starts with `prefix` (case-insensitive).

    Measures whether a style was learned, e.g. the shipped dataset's "Arr, matey!" answers."""
    hits = sum(generate_with(model, tokenizer, p, max_new_tokens).lower().startswith(prefix.lower()) for p in prompts)
    return hits / max(len(prompts), 1)
