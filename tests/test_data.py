"""qtune.data: windowing, loss masks, packing, held-out split, errors, and the shipped dataset.

The tokenizer is a tiny byte-level BPE trained here (no network, no model files) with a ChatML
template like SmolLM2's, so these tests run anywhere in well under a second each.
"""

import json
import math
import re

import pytest
import torch

from qtune.engine.attention import segment_positions
from qtune.data import IGNORE_INDEX, TokenBlocks, Example, default_data_path, load_splits, pack_examples
from qtune.errors import QtuneError
from conftest import SENTENCES, make_tokenizer

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def real_tokens(blocks: TokenBlocks) -> list[int]:
    """All non-padding ids, row after row."""
    return blocks.input_ids[blocks.attention_mask == 1].tolist()


def labelled_text(blocks: TokenBlocks, tokenizer, row: int = 0) -> str:
    labels = blocks.labels[row]
    return tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())


# --- plain text -------------------------------------------------------------------------------


def test_text_windows_cover_every_token(tmp_path, tokenizer):
    docs = [" ".join(SENTENCES) * 4, "a short second document"]
    (tmp_path / "a.txt").write_text(docs[0])
    write_jsonl(tmp_path / "b.jsonl", [{"text": docs[1]}])
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]

    train, eval_, stats = load_splits(tmp_path, None, tokenizer, 32, eval_fraction=0)
    assert stats.documents == 2 and stats.windows == math.ceil(len(stream) / 32) and len(eval_) == 0
    assert real_tokens(train) == stream  # consecutive windows, nothing truncated, the last one padded
    # every token is learned but a window's first, which nothing before it in its row predicts
    assert stats.train_tokens == len(stream) and train.label_tokens() == len(stream) - stats.windows
    mask = train.attention_mask == 1
    first = mask & (segment_positions(train.segment_ids) == 0)
    assert int(first.sum()) == stats.windows and (train.labels[first] == IGNORE_INDEX).all()
    assert torch.equal(train.labels[mask & ~first], train.input_ids[mask & ~first])
    assert (train.labels[~mask] == IGNORE_INDEX).all() and (train.input_ids[~mask] == tokenizer.pad_token_id).all()

    train, eval_, stats = load_splits(tmp_path, None, tokenizer, 32, eval_fraction=0.2)
    assert stats.train_tokens + stats.eval_tokens == len(stream) and len(eval_) >= 1


# --- loss masks -------------------------------------------------------------------------------


def test_instruction_prompt_is_masked(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add the numbers", "input": "2 and 2", "output": "Four."}])
    train, _, stats = load_splits(path, None, tokenizer, 128, eval_fraction=0)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Add the numbers\n\n2 and 2"}],
                                           tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    n = int(train.attention_mask[0].sum())
    assert stats.examples == 1
    assert (train.labels[0, :n_prompt] == IGNORE_INDEX).all()
    assert torch.equal(train.labels[0, n_prompt:n], train.input_ids[0, n_prompt:n])
    assert labelled_text(train, tokenizer) == "Four.<|im_end|>"

    plain = make_tokenizer(chat_template=None)  # no chat template: the ### Instruction template
    train, _, _ = load_splits(path, None, plain, 128, eval_fraction=0)
    assert plain.decode(real_tokens(train)).startswith("### Instruction:\nAdd the numbers\n\n2 and 2\n\n### Response:\n")
    assert labelled_text(train, plain) == "Four.<|im_end|>"


def test_chat_only_assistant_turns_are_learned(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Arr, four."}, {"role": "user", "content": "And the capital of France?"},
                {"role": "assistant", "content": "Arr, Paris."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    train, _, _ = load_splits(path, None, tokenizer, 256, eval_fraction=0)
    full = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert real_tokens(train) == full  # the pieces tokenize to the same ids as the whole conversation
    assert labelled_text(train, tokenizer) == "Arr, four.<|im_end|>Arr, Paris.<|im_end|>"
    spans = re.findall(r"1+", "".join("1" if l != IGNORE_INDEX else "0" for l in train.labels[0].tolist()))
    assert len(spans) == 2  # two separate learned spans, scaffolding between them masked


def test_chat_without_template_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "arr"}]}])
    with pytest.raises(QtuneError, match="chat template"):
        load_splits(path, None, make_tokenizer(chat_template=None), 64)


# --- packing and truncation ---------------------------------------------------------------------


def test_first_fit_packing_never_splits_an_example():
    lengths = [10, 20, 30, 5, 40, 64, 3]
    examples = [Example([k + 1] * n, [k + 1] * n) for k, n in enumerate(lengths)]
    blocks = pack_examples(examples, 64, pad_id=0)
    rows = [[t for t in row if t != 0] for row in blocks.input_ids.tolist()]
    # first fit, in order: 10+20+30 (room 4: the 3 fits there later), 5+40, 64
    assert rows == [[1] * 10 + [2] * 20 + [3] * 30 + [7] * 3, [4] * 5 + [5] * 40, [6] * 64]
    assert blocks.attention_mask.sum(1).tolist() == [63, 45, 64]


def test_packed_rows_carry_each_examples_segment_and_positions():
    lengths = [10, 20, 30, 5, 40, 64, 3]
    examples = [Example([k + 1] * n, [k + 1] * n) for k, n in enumerate(lengths)]
    blocks = pack_examples(examples, 64, pad_id=0)
    want = [[1] * 10 + [2] * 20 + [3] * 30 + [4] * 3 + [0], [1] * 5 + [2] * 40 + [0] * 19, [1] * 64]
    assert blocks.segment_ids.tolist() == want
    positions = segment_positions(blocks.segment_ids).tolist()
    assert positions[0] == list(range(10)) + list(range(20)) + list(range(30)) + list(range(3)) + [0]
    assert positions[1] == list(range(5)) + list(range(40)) + list(range(19))  # padding: a segment of its own
    assert positions[2] == list(range(64))
    # nothing predicts an example's first token (as when it runs alone); the rest of each keeps its labels
    starts = segment_positions(blocks.segment_ids) == 0
    assert (blocks.labels[starts] == IGNORE_INDEX).all()
    assert torch.equal(blocks.labels[~starts & (blocks.segment_ids > 0)], blocks.input_ids[~starts & (blocks.segment_ids > 0)])

    contaminated = pack_examples(examples, 64, pad_id=0, packing="contaminated")  # the same rows, one segment each
    assert torch.equal(contaminated.input_ids, blocks.input_ids)
    assert torch.equal(contaminated.segment_ids, contaminated.attention_mask)
    assert torch.equal(contaminated.labels[:, 1:], torch.where(contaminated.attention_mask.bool(), contaminated.input_ids,
                                                                IGNORE_INDEX)[:, 1:])

    alone = pack_examples(examples, 64, pad_id=0, packing="none")  # one example per row, in order
    assert [int(r.sum()) for r in alone.attention_mask] == lengths
    assert torch.equal(alone.segment_ids, alone.attention_mask)
    with pytest.raises(QtuneError, match="--packing"):
        pack_examples(examples, 64, pad_id=0, packing="greedy")


@pytest.mark.parametrize("packing", ["per-example", "none", "contaminated"])
def test_long_examples_are_truncated_and_counted_under_every_packing(tmp_path, tokenizer, packing):
    rows = [{"instruction": f"Say {k}", "output": "ok"} for k in range(6)]
    rows.append({"instruction": "Tell a long story", "output": "the quick brown fox " * 40})
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    train, _, stats = load_splits(path, None, tokenizer, 64, eval_fraction=0, packing=packing)
    assert stats.truncated == 1 and stats.examples == 7
    assert int(train.attention_mask.sum(1).max()) == 64  # the long one fills a row of its own
    segments_per_row = [len(set(r.tolist()) - {0}) for r in train.segment_ids]
    if packing == "per-example":
        assert max(segments_per_row) > 1 and len(train) < 7
    else:
        assert segments_per_row == [1] * len(train) and (len(train) == 7) == (packing == "none")


def test_short_rows_are_packed_and_long_rows_truncated(tmp_path, tokenizer):
    rows = [{"instruction": f"Say {k}", "output": "ok"} for k in range(20)]
    rows.append({"instruction": "Tell a long story", "output": "the quick brown fox " * 40})
    rows.append({"instruction": "the lazy dog " * 40, "output": "never learned"})  # prompt alone fills seq_len
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    train, _, stats = load_splits(path, None, tokenizer, 64, eval_fraction=0)
    assert stats.truncated == 2 and stats.dropped_unlearnable == 1 and stats.examples == 21
    assert stats.train_rows == len(train) < 21  # several examples share a row
    eos_per_row = (train.labels == tokenizer.eos_token_id).sum(1)
    assert eos_per_row.max() > 1 and eos_per_row.sum() == 20  # the truncated story lost its EOS


# --- held-out split -----------------------------------------------------------------------------


def test_held_out_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say", "output": f"answer {k}."} for k in range(40)])

    def answers(blocks):
        return sorted(int(k) for k in re.findall(r"answer (\d+)\.", tokenizer.decode(real_tokens(blocks))))

    train, eval_, _ = load_splits(path, None, tokenizer, 64, eval_fraction=0.1, seed=3)
    train2, eval2, _ = load_splits(path, None, tokenizer, 64, eval_fraction=0.1, seed=3)
    assert torch.equal(train.input_ids, train2.input_ids) and torch.equal(eval_.input_ids, eval2.input_ids)
    assert len(answers(eval_)) == 4 and not set(answers(eval_)) & set(answers(train))
    assert sorted(answers(eval_) + answers(train)) == list(range(40))
    _, eval3, _ = load_splits(path, None, tokenizer, 64, eval_fraction=0.1, seed=4)
    assert answers(eval3) != answers(eval_)

    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Say", "output": "answer 99."}])
    train, eval_, _ = load_splits(path, eval_path, tokenizer, 64)
    assert answers(eval_) == [99] and answers(train) == list(range(40))


# --- errors -------------------------------------------------------------------------------------


def test_bad_json_line_names_the_line_and_can_be_skipped(tmp_path, tokenizer):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "the fox"}\n{"text": oops\n{"text": "the dog"}\n')
    with pytest.raises(QtuneError, match=r"line 2.*--skip-bad-rows"):
        load_splits(path, None, tokenizer, 16)
    _, _, stats = load_splits(path, None, tokenizer, 16, skip_bad_rows=True, eval_fraction=0)
    assert stats.skipped_bad_rows == 1 and stats.rows_read == 2


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "not found"),
    ("empty.jsonl", "", "no usable rows"),
    ("blank.txt", "", "no usable rows"),
    ("schema.jsonl", '{"text": "the fox"}\n{"question": "what?"}\n', r"line 2 matches no dataset schema"),
    ("data.csv", "text\nthe fox\n", "Unsupported dataset file type '.csv'"),
])
def test_dataset_errors_name_the_problem(tmp_path, tokenizer, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(QtuneError, match=message):
        load_splits(tmp_path / name, None, tokenizer, 16)


def test_bad_seq_len_and_tiny_dataset(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say", "output": "ok"}])
    with pytest.raises(QtuneError, match="--seq-len"):
        load_splits(path, None, tokenizer, 0)
    with pytest.raises(QtuneError, match="too few"):
        load_splits(path, None, tokenizer, 64)
    with pytest.raises(QtuneError, match="Raise --seq-len"):  # the prompt alone fills 8 tokens
        load_splits(path, None, tokenizer, 8, eval_fraction=0)


# --- Hugging Face dataset folders --------------------------------------------------------------


def test_hf_dataset_folders_load(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": [f"Say {k}" for k in range(10)], "output": [f"answer {k}." for k in range(10)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    train, eval_, stats = load_splits(tmp_path / "saved", None, tokenizer, 64)
    assert stats.examples == 10 and len(eval_) == 1

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["the quick brown fox"] * 3})}).save_to_disk(
        str(tmp_path / "dict"))
    _, _, stats = load_splits(tmp_path / "dict", None, tokenizer, 64, eval_fraction=0)
    assert stats.documents == 3

    (tmp_path / "parquet").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    _, _, stats = load_splits(tmp_path / "parquet", None, tokenizer, 64, eval_fraction=0)
    assert stats.examples == 10


# --- the shipped dataset ------------------------------------------------------------------------


def test_default_dataset_teaches_the_pirate_style(tokenizer):
    rows = [json.loads(line) for line in default_data_path().read_text().splitlines()]
    assert 400 <= len(rows) <= 1000
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[-1] == "assistant" and all(
            m["content"].startswith("Arr") for m in row["messages"] if m["role"] == "assistant")
    prompts = [json.loads(line)["prompt"]
               for line in (default_data_path().parent / "pirate_chat_eval_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) >= 40 and not set(prompts) & {r["messages"][0]["content"] for r in rows}
    train, eval_, stats = load_splits(None, None, tokenizer, 256)
    assert stats.examples == len(rows) and len(eval_) >= 1 and stats.truncated == 0
