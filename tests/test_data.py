"""Prompt data: parquet + jsonl in the verl layout, bad rows counted and skipped, resumable sampler,
the synthetic task and its tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from fipo_megatron.data.dataset import PromptSampler, load_prompt_dataset
from fipo_megatron.data.synthetic import make_synthetic_rows, synthetic_score, synthetic_tokenizer
from fipo_megatron.data.tokenizer import CharTokenizer, encode_prompt, load_tokenizer

TOK = CharTokenizer(chars=list("abcdefghijklmnopqrstuvwxyz0123456789 ?=+"))


def _row(content, answer="4", source="math"):
    return {"prompt": [{"role": "user", "content": content}], "reward_model": {"ground_truth": answer}, "data_source": source}


ROWS = [
    _row("what is 2+2?"),                       # kept
    _row("   "),                                  # empty
    {"prompt": "a bare string prompt", "reward_model": {"ground_truth": "1"}},  # kept (string prompt)
    {"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}},     # malformed: no content
    {"prompt": [{"role": "user", "content": "no answer"}]},                      # malformed: no ground truth
    _row("x" * 50),                               # overlong (51 tokens with bos > 40)
    _row("ok", answer="7", source="aime"),        # kept
]


def _check(ds):
    assert ds.stats == {"num_rows": 7, "num_malformed": 2, "num_empty": 1, "num_overlong": 1, "num_prompts": 3}
    assert [r.ground_truth for r in ds.records] == ["4", "1", "7"]
    assert ds.records[0].prompt_ids == TOK.encode("what is 2+2?")
    assert ds.records[2].data_source == "aime" and ds.records[1].data_source == "unknown"
    assert [r.index for r in ds.records] == [0, 1, 2]


def test_jsonl_with_bad_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, "{not json")   # malformed line
    lines.insert(4, "[1, 2]")      # valid JSON, not an object
    path.write_text("\n".join(lines) + "\n\n")
    ds = load_prompt_dataset(files=[str(path)], tokenizer=TOK, max_prompt_length=40)
    assert ds.stats["num_malformed"] == 4 and ds.stats["num_rows"] == 9
    assert [r.ground_truth for r in ds.records] == ["4", "1", "7"]


def test_parquet_same_as_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = [ROWS[0], ROWS[1], ROWS[5], ROWS[6]]  # parquet needs one schema: the well-formed rows
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(good), path)
    ds = load_prompt_dataset(files=[str(path)], tokenizer=TOK, max_prompt_length=40)
    assert ds.stats == {"num_rows": 4, "num_malformed": 0, "num_empty": 1, "num_overlong": 1, "num_prompts": 2}
    assert ds.records[0].prompt_ids == TOK.encode("what is 2+2?") and ds.records[1].ground_truth == "7"
    _check(load_prompt_dataset(files=[], rows=ROWS, tokenizer=TOK, max_prompt_length=40))


def test_raw_template_and_errors(tmp_path):
    ds = load_prompt_dataset(files=[], rows=[_row("ab")], tokenizer=TOK, max_prompt_length=40,
                             chat_template=False, raw_template="q {content} =")
    assert ds.records[0].prompt_ids == TOK.encode("q ab =")
    with pytest.raises(ValueError, match="tokenizer"):
        load_prompt_dataset(files=[], rows=[_row("ab")], tokenizer=None, max_prompt_length=40)
    with pytest.raises(ValueError, match="no usable prompts"):
        load_prompt_dataset(files=[], rows=[_row(" ")], tokenizer=TOK, max_prompt_length=40)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_dataset(files=[str(tmp_path / "missing.jsonl")], tokenizer=TOK, max_prompt_length=40)
    with pytest.raises(ValueError, match="missing_tok"):
        load_tokenizer(str(tmp_path / "missing_tok"))


def test_hf_tokenizer_chat_template(tmp_path):
    """An HF tokenizer without a chat template: a clear error; with one, the template's text is encoded."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<eos>"] + list("abcdefghijklmnopqrstuvwxyz :<>|"))}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split("", behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    hf.save_pretrained(tmp_path / "tok")
    hf = load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="data.chat_template=false"):
        encode_prompt(hf, [{"role": "user", "content": "hi"}], chat_template=True, raw_template="{content}")
    hf.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    ids = encode_prompt(hf, [{"role": "user", "content": "hi"}], chat_template=True, raw_template="{content}")
    assert hf.decode(ids).replace(" ", "") == "<|user|>hi<|assistant|>"


def test_sampler_deterministic_and_resumable():
    a = PromptSampler(num_prompts=10, seed=3)
    first = [a.next_indices(4) for _ in range(6)]  # crosses two epoch boundaries
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch
    b = PromptSampler(num_prompts=10, seed=3)
    b.next_indices(4), b.next_indices(4), b.next_indices(4)
    c = PromptSampler(num_prompts=10, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_indices(4) for _ in range(3)] == first[3:]
    assert PromptSampler(num_prompts=10, seed=4).next_indices(10) != flat[:10]
    assert PromptSampler(num_prompts=5, seed=4, shuffle=False).next_indices(7) == [0, 1, 2, 3, 4, 0, 1]


def test_synthetic_task():
    tok = synthetic_tokenizer(num_digits=5)
    assert tok.vocab_size == 10 and tok.eos_token_id == 2
    rows = make_synthetic_rows(task="copy_digit", num_rows=200, num_digits=5, prompt_digits=1, seed=0)
    assert rows == make_synthetic_rows(task="copy_digit", num_rows=200, num_digits=5, prompt_digits=1, seed=0)
    ds = load_prompt_dataset(files=[], rows=rows, tokenizer=tok, max_prompt_length=8)
    r = ds.records[0]
    assert r.prompt_ids[0] == tok.bos_token_id and tok.decode(r.prompt_ids) == r.messages[0]["content"]
    assert r.ground_truth == r.messages[0]["content"][0]
    assert {x.ground_truth for x in ds.records} == {"0", "1", "2", "3", "4"}
    add = make_synthetic_rows(task="add_mod", num_rows=50, num_digits=5, prompt_digits=2, seed=1)
    for row in add:
        x, y = row["prompt"][0]["content"].rstrip("=").split("+")
        assert row["reward_model"]["ground_truth"] == str((int(x) + int(y)) % 5)
    # the rule: first response character; decode stops at EOS
    ans = r.ground_truth
    good = tok.encode(ans + "=1", add_special_tokens=False)
    assert synthetic_score(response_text=tok.decode(good), ground_truth=ans) == {"score": 1.0, "acc": True, "pred": ans}
    bad = [tok.eos_token_id] + good
    assert synthetic_score(response_text=tok.decode(bad), ground_truth=ans)["score"] == 0.0
    # a uniformly random policy over the vocabulary hits the answer about 1/vocab of the time
    rng = random.Random(0)
    hits = [synthetic_score(response_text=tok.decode([rng.randrange(tok.vocab_size) for _ in range(4)]),
                            ground_truth=x.ground_truth)["score"] for x in ds.records]
    assert 0.05 < sum(hits) / len(hits) < 0.2


def test_first_bad_row_is_named_and_null_ground_truth_is_malformed(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    rows = [_row("what is 2+2?"), _row("what is 3+3?", answer=None), _row("   "), _row("x" * 50), _row("ok")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level("WARNING"):
        ds = load_prompt_dataset(files=[str(path)], tokenizer=TOK, max_prompt_length=40)
    assert ds.stats["num_malformed"] == 1 and ds.stats["num_prompts"] == 2
    text = caplog.text
    assert f"malformed: {path} row 2, field 'reward_model.ground_truth': null" in text
    assert f"empty: {path} row 3, field 'prompt'" in text
    assert f"overlong: {path} row 4, field 'prompt': 51 tokens" in text
    with pytest.raises(ValueError, match=r"row 1, field 'reward_model.ground_truth': missing"):
        load_prompt_dataset(files=[], rows=[{"prompt": "hi"}], tokenizer=TOK, max_prompt_length=40)
