"""Training data: read rows, tokenize them with loss masks, cut and pack them into fixed-length rows.

The pipeline, top to bottom:
  1. read records from a .jsonl / .txt file, a folder of them, or a local Hugging Face dataset folder;
  2. tokenize each record: plain text joins one token stream (EOS between documents) that is cut into
     seq_len windows; instruction and chat records become one example each, whose prompt tokens get
     label -100 so that only the response / assistant tokens are learned;
  3. hold out an eval set (whole windows or whole examples, chosen by a seeded RNG) before packing;
  4. pack the examples greedily (first fit, in order) into rows of seq_len, padded at the end. Each
     row records which example each token belongs to (its segment ids), so that the model attends
     within an example only and restarts its positions there (qtune.engine.attention): packed
     examples never see each other, and an example's loss is the one it has alone (--packing).
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass

import torch

from qtune.config import PACKING
from qtune.errors import QtuneError

IGNORE_INDEX = -100  # the label torch's cross_entropy (and transformers' loss) skips
PLAIN_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"  # for tokenizers without a chat template
_HF_DATA_SUFFIXES = {".parquet", ".arrow", ".json", ".csv"}
_MAX_OPEN_ROWS = 64  # first fit looks at most at this many unfilled rows: O(n) packing of large sets


@dataclass
class TokenBlocks:
    """Fixed-length rows ready for the model; row r holds one or more whole examples, then padding.

    segment_ids say which tokens attend to which: a token sees the earlier tokens of its own segment
    only. A 0/1 attention mask is the special case of one segment per row."""

    input_ids: torch.Tensor  # (rows, seq_len) int64, right-padded with the pad id
    labels: torch.Tensor  # (rows, seq_len) int64, IGNORE_INDEX where no loss (prompt tokens, padding)
    segment_ids: torch.Tensor  # (rows, seq_len) int64, k = 1, 2, … for the row's k-th example, 0 for padding

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(rows, seq_len) int64, 1 for real tokens, 0 for padding (what a plain transformers model takes)."""
        return (self.segment_ids > 0).long()

    def real_tokens(self) -> int:
        """Number of non-padding positions."""
        return int((self.segment_ids > 0).sum())

    def label_tokens(self) -> int:
        """Number of positions that carry a label (the tokens the loss is averaged over)."""
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class DataStats:
    """What loading found, for the log and the console. Counts cover --data and --eval-data together."""

    rows_read: int = 0  # records read: JSONL lines / dataset rows with data, plus whole .txt files
    documents: int = 0  # plain-text documents (.txt files and {"text"} rows) in the token stream
    examples: int = 0  # instruction and chat examples kept after tokenization
    truncated: int = 0  # instruction/chat examples longer than seq_len, cut to their first seq_len tokens
    dropped_unlearnable: int = 0  # examples with no token left to learn (no assistant turn, prompt >= seq_len)
    skipped_bad_rows: int = 0  # malformed or unrecognised rows skipped because of --skip-bad-rows
    windows: int = 0  # seq_len windows cut from the plain-text token stream (the last one may be partial)
    train_rows: int = 0  # packed training rows of seq_len
    eval_rows: int = 0  # packed eval rows of seq_len
    train_tokens: int = 0  # real (non-padding) tokens in the training rows
    eval_tokens: int = 0  # real (non-padding) tokens in the eval rows
    train_label_tokens: int = 0  # training tokens that carry a label (what the loss is averaged over)
    eval_label_tokens: int = 0  # eval tokens that carry a label


@dataclass
class Example:
    """One tokenized unit that packing never splits: a text window or an instruction/chat example."""

    input_ids: list[int]
    labels: list[int]


def default_data_path() -> pathlib.Path:
    """The dataset shipped inside qtune: short chat answers in pirate speak (see tools/make_default_dataset.py)."""
    return pathlib.Path(__file__).parent / "data" / "pirate_chat.jsonl"


def load_splits(data, eval_data, tokenizer, seq_len: int, *, eval_fraction: float = 0.05, seed: int = 0,
                skip_bad_rows: bool = False, packing: str = "per-example") -> tuple[TokenBlocks, TokenBlocks, DataStats]:
    """Load, tokenize, split and pack a dataset: returns (train, eval, stats).

    data: a path (see the module docstring) or None for default_data_path(). eval_data: a path loaded
    the same way and used whole as the eval set; without it a seeded ~eval_fraction of the windows /
    examples (at least one) is held out before packing, so no eval token is ever trained on.
    packing: one of PACKING (both splits are packed the same way).
    """
    _check_packing(packing)
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise QtuneError(f"The sequence length must be a positive integer, got {seq_len!r}. "
                         "Pass --seq-len 512 or similar.")
    if not 0 <= eval_fraction < 1:
        raise QtuneError(f"The eval fraction must be in [0, 1), got {eval_fraction!r}. Pass a value such as 0.05.")
    if tokenizer.eos_token_id is None:
        raise QtuneError("The tokenizer has no EOS token, which ends documents and answers. Set tokenizer.eos_token "
                         "(e.g. in tokenizer_config.json) or use another model.")
    data = default_data_path() if data is None else data
    stats = DataStats()
    train_examples = _load_examples(data, tokenizer, seq_len, stats, skip_bad_rows)
    if eval_data is not None:
        eval_examples = _load_examples(eval_data, tokenizer, seq_len, stats, skip_bad_rows)
    else:
        held_out = _held_out_indices(len(train_examples), eval_fraction, seed)
        if held_out and len(held_out) >= len(train_examples):
            raise QtuneError(f"The dataset {data} gives only {len(train_examples)} example(s), too few to hold out an "
                             "eval split. Add data or pass --eval-data.")
        eval_examples = [ex for i, ex in enumerate(train_examples) if i in held_out]
        train_examples = [ex for i, ex in enumerate(train_examples) if i not in held_out]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = pack_examples(train_examples, seq_len, pad_id, packing)
    eval_ = pack_examples(eval_examples, seq_len, pad_id, packing)
    stats.train_rows, stats.eval_rows = len(train), len(eval_)
    stats.train_tokens, stats.eval_tokens = train.real_tokens(), eval_.real_tokens()
    stats.train_label_tokens, stats.eval_label_tokens = train.label_tokens(), eval_.label_tokens()
    return train, eval_, stats


def load_blocks(path, tokenizer, seq_len: int, packing: str = "per-example") -> tuple[TokenBlocks, DataStats]:
    """A whole dataset file (or folder) as packed rows, nothing held out: what `qtune eval` scores."""
    _check_packing(packing)
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise QtuneError(f"The sequence length must be a positive integer, got {seq_len!r}. Pass --seq-len 256 or similar.")
    stats = DataStats()
    examples = _load_examples(path, tokenizer, seq_len, stats, skip_bad_rows=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    blocks = pack_examples(examples, seq_len, pad_id, packing)
    stats.eval_rows, stats.eval_tokens, stats.eval_label_tokens = len(blocks), blocks.real_tokens(), blocks.label_tokens()
    return blocks, stats


def pack_examples(examples: list[Example], seq_len: int, pad_id: int, packing: str = "per-example") -> TokenBlocks:
    """Greedy first-fit packing, in order: each example goes into the first open row with room for it
    (packing "none": each example its own row). Rows are right-padded; an example is never split across
    rows (none is longer than seq_len). Segment ids number the examples of a row from 1 (all 1 under
    "contaminated": one segment per row).
    """
    _check_packing(packing)
    rows: list[list[Example]] = []
    room: list[int] = []  # free positions per row
    open_rows: list[int] = []  # rows that still have room, oldest first
    for ex in examples:
        n = len(ex.input_ids)
        r = next((r for r in open_rows if room[r] >= n), None) if packing != "none" else None
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(seq_len)
            open_rows.append(r)
        rows[r].append(ex)
        room[r] -= n
        open_rows = [r for r in open_rows if room[r] > 0][-_MAX_OPEN_ROWS:]
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)  # (rows, seq_len)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        pos = 0
        for k, ex in enumerate(row, start=1):
            n = len(ex.input_ids)
            input_ids[r, pos:pos + n] = torch.tensor(ex.input_ids)
            labels[r, pos:pos + n] = torch.tensor(ex.labels)
            segment_ids[r, pos:pos + n] = 1 if packing == "contaminated" else k
            if packing != "contaminated":  # nothing predicts an example's first token, as when it runs alone
                labels[r, pos] = IGNORE_INDEX
            pos += n
    return TokenBlocks(input_ids, labels, segment_ids)


def _check_packing(packing: str) -> None:
    if packing not in PACKING:
        raise QtuneError(f"Unknown --packing {packing!r}. Use per-example (the default: packed examples never see "
                         "each other), none (one example per row) or contaminated (benchmarks only).")


def _held_out_indices(n: int, fraction: float, seed: int) -> set[int]:
    """A seeded choice of ~fraction of range(n), at least one index (Python's Mersenne Twister: machine independent)."""
    if fraction == 0 or n == 0:
        return set()
    return set(random.Random(seed).sample(range(n), max(1, round(n * fraction))))


# ---------------------------------------------------------------------------------------------------
# Reading records: each is (where, value) with value a dict (one row) or a str (a whole .txt file).


def _read_records(path, skip_bad_rows: bool, stats: DataStats) -> list[tuple[str, dict | str]]:
    path = pathlib.Path(path)
    if not path.exists():
        raise QtuneError(f"Dataset file not found: {path}. Pass --data with a .jsonl/.txt file, a folder of them, "
                         "or a local Hugging Face dataset folder.")
    if path.is_file():
        return _read_file(path, skip_bad_rows, stats)
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        return _read_hf_dataset(path, saved=True)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if files:
        return [rec for f in files for rec in _read_file(f, skip_bad_rows, stats)]
    if any(p.suffix in _HF_DATA_SUFFIXES for p in path.rglob("*")):
        return _read_hf_dataset(path, saved=False)
    raise QtuneError(f"The folder {path} holds no .txt, .jsonl or dataset files. Pass --data with a .jsonl/.txt file, "
                     "a folder of them, or a folder saved with datasets' save_to_disk.")


def _read_file(path: pathlib.Path, skip_bad_rows: bool, stats: DataStats) -> list[tuple[str, dict | str]]:
    if path.suffix == ".txt":
        return [(str(path), path.read_text(encoding="utf-8"))]
    if path.suffix != ".jsonl":
        raise QtuneError(f"Unsupported dataset file type '{path.suffix}' ({path}). Pass a .jsonl or .txt file, "
                         "a folder of them, or a local Hugging Face dataset folder.")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                _bad_row(f"{path} line {number} is not valid JSON ({e.msg})", skip_bad_rows, stats)
                continue
            records.append((f"{path} line {number}", row))
    return records


def _read_hf_dataset(path: pathlib.Path, saved: bool) -> list[tuple[str, dict]]:
    """Rows of a local dataset folder (no network: load_from_disk, or the packaged parquet/json/csv builders)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except Exception as e:  # datasets raises many types; the user needs the path and the cause
        raise QtuneError(f"Could not load the dataset folder {path}: {e}. Pass a folder written by "
                         "datasets' save_to_disk, or one with parquet/json/csv data files.") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise QtuneError(f"The dataset {path} has splits {list(ds)} but no 'train' split. Save the split to "
                             "train on as 'train' or pass its folder.")
        ds = ds["train"]
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(ds)]


def _bad_row(problem: str, skip_bad_rows: bool, stats: DataStats) -> None:
    if not skip_bad_rows:
        raise QtuneError(f"{problem}. Fix or remove the row, or pass --skip-bad-rows to skip such rows.")
    stats.skipped_bad_rows += 1


def _record_kind(value) -> str | None:
    """'text', 'instruction' or 'chat' by the record's keys; None when it matches no schema."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("text"), str):
        return "text"
    if isinstance(value.get("instruction"), str) and isinstance(value.get("output"), str):
        return "instruction"
    messages = value.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return "chat"
    return None


# ---------------------------------------------------------------------------------------------------
# Tokenizing: records -> examples (text windows first, then instruction/chat examples in file order).


def _load_examples(path, tokenizer, seq_len: int, stats: DataStats, skip_bad_rows: bool) -> list[Example]:
    records = _read_records(path, skip_bad_rows, stats)
    eos = tokenizer.eos_token_id
    stream: list[int] = []  # the concatenated plain-text tokens, EOS after each document
    examples: list[Example] = []
    for where, value in records:
        kind = _record_kind(value)
        if kind is None:
            found = f"keys {sorted(value)}" if isinstance(value, dict) else f"a {type(value).__name__}"
            _bad_row(f'{where} matches no dataset schema ({found}); expected {{"text"}}, '
                     '{"instruction", "input", "output"} or {"messages": [{"role", "content"}, ...]}',
                     skip_bad_rows, stats)
            continue
        stats.rows_read += 1
        if kind == "text":
            text = value if isinstance(value, str) else value["text"]
            if not text.strip():  # an empty document adds nothing, not even an EOS
                continue
            stream += _encode(tokenizer, text, special=True) + [eos]
            stats.documents += 1
            continue
        if kind == "instruction":
            ids, labels = _instruction_tokens(value, tokenizer)
        else:
            ids, labels = _chat_tokens(value["messages"], tokenizer, where)
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            stats.truncated += 1
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped_unlearnable += 1
            continue
        examples.append(Example(ids, labels))
        stats.examples += 1
    # Plain text: consecutive windows over the whole stream; every token is labelled (the model shifts).
    windows = [Example(stream[i:i + seq_len], stream[i:i + seq_len]) for i in range(0, len(stream), seq_len)]
    stats.windows += len(windows)
    if not windows and not examples and stats.dropped_unlearnable:
        raise QtuneError(f"No example of {path} has a token to learn within {seq_len} tokens (the prompts fill "
                         "the sequence, or chat rows have no assistant turn after a user turn). "
                         "Raise --seq-len or fix the rows.")
    if not windows and not examples:
        raise QtuneError(f"The dataset {path} has no usable rows or tokens. Pass --data with a non-empty dataset "
                         '({"text"}, {"instruction", "output"} or {"messages"} rows, or .txt files).')
    return windows + examples


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of text; special=True adds the tokenizer's own BOS etc. (not wanted inside rendered templates)."""
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def _instruction_tokens(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """Alpaca row -> (ids, labels): the prompt is masked, the response (output + EOS) is learned."""
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if tokenizer.chat_template:
        prompt_ids = _encode(tokenizer, tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True))
    else:
        prompt_ids = _encode(tokenizer, PLAIN_PROMPT_TEMPLATE.format(prompt=prompt), special=True)
    response_ids = _encode(tokenizer, row["output"]) + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def _chat_tokens(messages: list[dict], tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Chat row -> (ids, labels) with only the assistant turns learned.

    The template is rendered incrementally: for assistant message i, render(messages[:i]) with the
    generation prompt ends where its content starts, and render(messages[:i+1]) ends after its
    end-of-turn token; the text between them is learned, everything else is masked. Each piece is
    tokenized on its own, so the labels line up with the ids exactly whatever the template does.
    Labels stop at the turn's last EOS token (e.g. <|im_end|>), so a trailing newline is not learned.
    """
    if not tokenizer.chat_template:
        raise QtuneError(f"{where} is chat data ({{\"messages\": ...}}) but the tokenizer has no chat template. "
                         "Use a model whose tokenizer has one (an -Instruct/-Chat model) or convert the rows to "
                         '{"instruction", "output"} or {"text"}.')

    def render(msgs, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text already tokenized
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:  # an opening assistant turn has no prompt: context only
            continue
        prompt, full = render(messages[:i], generation_prompt=True), render(messages[:i + 1])
        common = _common_prefix_len(prompt, full)  # == len(prompt) for prefix-stable templates
        context_ids = _encode(tokenizer, full[len(done):common])  # scaffolding and earlier turns: masked
        answer_ids = _encode(tokenizer, full[max(common, len(done)):])
        last = max((k for k, t in enumerate(answer_ids) if t == tokenizer.eos_token_id), default=len(answer_ids) - 1)
        ids += context_ids + answer_ids
        learned = answer_ids[:last + 1] + [IGNORE_INDEX] * (len(answer_ids) - last - 1)
        labels += [IGNORE_INDEX] * len(context_ids) + learned
        done = full
    tail_ids = _encode(tokenizer, render(messages)[len(done):])  # turns after the last assistant turn
    return ids + tail_ids, labels + [IGNORE_INDEX] * len(tail_ids)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)
