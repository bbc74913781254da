"""tools/prepare_data.py: inputs, packing, bucketing, indexed output, SFT masks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_prolong.data.config import DataConfig, DomainConfig
from megatron_prolong.data.loader import MixtureLoader, build_row
from megatron_prolong.data.prepare import main as prepare_main
from megatron_prolong.data.sources import IndexedSource, MDSSource
from megatron_prolong.tokenizer import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S = 128
TOK = ByteTokenizer()


def texts(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "long", "context"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) + f" #{i}" for i in range(n)]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def run(*argv):
    return prepare_main([*map(str, argv), "--quiet"])


def read_mds(path):
    src = MDSSource("x", str(path))
    return [src.get(i) for i in range(len(src))]


def docs_from_sequences(samples):
    """Reassemble documents: a segment that starts a sequence continues the previous segment
    when the latter ended the previous sequence without EOS (re-opened with BOS, as ProLong's
    datatools does)."""
    docs = []
    for s in samples:
        for a, b in s.indices:
            seg = s.input_ids[a:b].astype(np.int64).tolist()
            if a == 0 and docs and docs[-1][-1] != TOK.eos_id:
                assert seg[0] == TOK.bos_id
                docs[-1] += seg[1:]
            else:
                docs.append(seg)
    return docs


def test_jsonl_to_packed_mds_keeps_documents(tmp_path):
    t = texts()
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": x} for x in t])
    stats = run(inp, "--output", tmp_path / "out", "--name", "web", "--tokenizer", "byte",
                "--seq-length", S, "--workers", 1)
    samples = read_mds(tmp_path / "out" / "web")
    expected = [[TOK.bos_id] + TOK.encode(x) + [TOK.eos_id] for x in t]
    total = sum(map(len, expected))
    assert len(samples) == stats["outputs"]["web"]["sequences"]
    # Every token is kept, plus one BOS per continued document, minus the dropped tail.
    # (a continuation of the last sequence's last document may sit in the dropped tail)
    continued = sum(1 for prev in samples if prev.input_ids[prev.indices[-1, 1] - 1] != TOK.eos_id)
    assert continued > 0
    assert len(samples) * S + stats["outputs"]["web"]["dropped_tokens"] == total + continued
    for s in samples:
        assert s.input_ids.dtype == np.uint32 and s.input_ids.shape == (S,)
        assert s.indices[0, 0] == 0 and s.indices[-1, 1] == S
        assert np.all(s.indices[1:, 0] == s.indices[:-1, 1])
    got = docs_from_sequences(samples)
    assert got[:-1] == expected[: len(got) - 1]  # all complete documents, in order, boundaries kept
    assert expected[len(got) - 1][: len(got[-1])] == got[-1]  # the last one cut by the dropped tail


def test_parquet_and_hf_disk_inputs_match_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    t = texts(25, seed=1)
    write_jsonl(tmp_path / "in.jsonl", [{"text": x} for x in t])
    pq.write_table(pa.table({"text": t}), tmp_path / "in.parquet")
    datasets.Dataset.from_dict({"text": t}).save_to_disk(str(tmp_path / "hf"))
    outs = []
    for k, inp in enumerate(["in.jsonl", "in.parquet", "hf"]):
        run(tmp_path / inp, "--output", tmp_path / f"o{k}", "--name", "d", "--tokenizer", "byte",
            "--seq-length", 64, "--workers", 1)
        outs.append(read_mds(tmp_path / f"o{k}" / "d"))
    assert len(outs[0]) > 5
    for other in outs[1:]:
        assert len(other) == len(outs[0])
        for a, b in zip(outs[0], other):
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.indices, b.indices)


def test_parallel_workers_give_the_same_output(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": x} for x in texts(60, seed=2)])
    for w in (1, 2):
        run(inp, "--output", tmp_path / f"w{w}", "--name", "d", "--tokenizer", "byte", "--seq-length", 64,
            "--workers", w)
    a, b = read_mds(tmp_path / "w1" / "d"), read_mds(tmp_path / "w2" / "d")
    assert len(a) == len(b) and all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b))


def test_length_bucketing(tmp_path):
    # Documents of (with BOS/EOS) 600, 300, 1100 and 50 tokens; thresholds 512 and 256 at S=128.
    lens = [598, 298, 1098, 48]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "x" * n} for n in lens])
    stats = run(inp, "--output", tmp_path / "o", "--name", "book", "--tokenizer", "byte", "--seq-length", S,
                "--bucket", "--thresholds", 512, 256, "--workers", 1)
    # >= 512: 600 -> 1 piece of 512, 1100 -> 2 pieces; each 512-piece is 4 sequences of 128.
    big = read_mds(tmp_path / "o" / "book-512")
    assert len(big) == 3 * 4 and all(s.indices.tolist() == [[0, S]] for s in big)
    assert big[0].input_ids[0] == TOK.bos_id and big[4].input_ids[0] == TOK.bos_id
    assert big[1].input_ids[0] == ord("x")
    # >= 256: the 300-token document -> one 256-token piece, 2 sequences.
    mid = read_mds(tmp_path / "o" / "book-256")
    assert len(mid) == 2
    # shorter: the 50-token document alone does not fill a sequence: dropped tail.
    assert stats["outputs"]["book"]["sequences"] == 0 and stats["outputs"]["book"]["dropped_tokens"] == 50
    # Remainders cascade to smaller buckets, re-opened with BOS (ProLong's datatools):
    # 600 -> 512 + (88+1 dropped); 1100 -> 512 + (588+1 -> 512 + (77+1 dropped)); 300 -> 256 + (44+1).
    assert stats["dropped_remainder_tokens"] == 89 + 78 + 45
    assert big[8].input_ids[0] == TOK.bos_id  # the cascaded second 512-piece of the 1100 document


def test_length_bucketing_pieces_packed_into_longer_sequences(tmp_path):
    # Stage 2's layout at small scale: pieces of T <= seq_length packed several per sequence.
    S2 = 256
    lens = [298, 98, 38]  # + BOS/EOS = 300, 100, 40
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "y" * n} for n in lens])
    stats = run(inp, "--output", tmp_path / "o", "--name", "code", "--tokenizer", "byte", "--seq-length", S2,
                "--bucket", "--thresholds", 128, 64, "--workers", 1)
    # 300 -> 128 + (172+1 -> 128 + (45+1 dropped)); 100 -> 64 + (36+1 dropped); 40 -> short bucket.
    (seq,) = read_mds(tmp_path / "o" / "code-128")
    assert seq.indices.tolist() == [[0, 128], [128, 256]]
    assert seq.input_ids[0] == TOK.bos_id and seq.input_ids[128] == TOK.bos_id
    assert (seq.input_ids[1:128] == ord("y")).all() and (seq.input_ids[129:] == ord("y")).all()
    assert stats["outputs"]["code-64"] == {"documents": 1, "sequences": 0, "dropped_tokens": 64, "truncated": 0}
    assert stats["outputs"]["code"]["dropped_tokens"] == 40
    assert stats["dropped_remainder_tokens"] == 46 + 37


def test_indexed_output_and_online_packing(tmp_path):
    t = texts(30, seed=3)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": x} for x in t])
    run(inp, "--output", tmp_path / "o", "--name", "web", "--tokenizer", "byte", "--format", "indexed",
        "--workers", 1)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(tmp_path / "o" / "web"))
    assert ds.index.dtype == np.uint16  # small vocabulary
    expected = [[TOK.bos_id] + TOK.encode(x) + [TOK.eos_id] for x in t]
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert len(ds.document_indices) == len(t) + 1
    src = IndexedSource("web", str(tmp_path / "o" / "web"), seq_length=S, seed=0)
    assert len(src) == sum(map(len, expected)) // S


def test_cli_entry_point(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": x} for x in texts(20)])
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "prepare_data.py"), inp, "--output",
                        str(tmp_path / "o"), "--name", "d", "--tokenizer", "byte", "--seq-length", "64",
                        "--workers", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["d"]["sequences"] == len(read_mds(tmp_path / "o" / "d")) > 0


def test_bad_record_is_named(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl line 2: no string field `text`"):
        run(inp, "--output", tmp_path / "o", "--name", "d", "--tokenizer", "byte", "--workers", 1)


# ---- SFT ----------------------------------------------------------------------------------

CONVS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a needle"},
     {"role": "assistant", "content": "a thin pin"}, {"role": "user", "content": "and a haystack"},
     {"role": "assistant", "content": "a pile of hay for the needle"}],
    [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello"}],
    [{"role": "user", "content": "count to five"}, {"role": "assistant", "content": "one two three four five"}],
    [{"role": "user", "content": "is the context long"}, {"role": "assistant", "content": "yes it is long"},
     {"role": "user", "content": "how long"}, {"role": "assistant", "content": "very long indeed"}],
] * 3
SPECIALS = ["[UNK]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@pytest.fixture
def tiny_hf_tokenizer(tmp_path):
    """A word-level tokenizer with a chat template, built locally (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CONVS for m in c for w in m["content"].split()})
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   additional_special_tokens=SPECIALS[3:])
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    path = tmp_path / "tok"
    fast.save_pretrained(str(path))
    return str(path), vocab


def sft_loss_labels(folder, vocab_size, seq_length):
    """Label tokens that get loss, per sequence, through the loader's row builder (data.sft)."""
    src = MDSSource("sft", folder)
    out = []
    for i in range(len(src)):
        s = src.get(i)
        assert s.mask is not None and s.mask.shape == (seq_length,)
        tokens, labels, loss, cu = build_row(s, seq_length=seq_length, sft=True, pad_id=0)
        out.append(labels[loss > 0].tolist())
    return src, out


def test_sft_masks_cover_exactly_the_assistant_tokens(tmp_path, tiny_hf_tokenizer):
    tok_path, vocab = tiny_hf_tokenizer
    inp = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS])
    seq = 64
    run(inp, "--output", tmp_path / "o", "--name", "prolong-ultrachat-64K", "--tokenizer", tok_path, "--sft",
        "--seq-length", seq, "--workers", 2)
    folder = str(tmp_path / "o" / "prolong-ultrachat-64K")
    src, per_seq = sft_loss_labels(folder, len(vocab), seq)
    got = [t for seq_tokens in per_seq for t in seq_tokens]
    expected = [vocab[w] for c in CONVS for m in c if m["role"] == "assistant"
                for w in m["content"].split() + ["<|end|>"]]
    assert got == expected
    # Conversations are whole: each listed document starts with BOS and ends with <|end|>;
    # everything outside them is padding with mask 0.
    n_docs = 0
    for i in range(len(src)):
        s = src.get(i)
        covered = np.zeros(seq, bool)
        for a, b in s.indices:
            assert s.input_ids[a] == vocab["<s>"] and s.input_ids[b - 1] == vocab["<|end|>"]
            covered[a:b] = True
            n_docs += 1
        assert not s.mask[~covered].any()
    assert n_docs == len(CONVS)
    # And through the MixtureLoader with data.sft=true: loss tokens per batch are assistant tokens.
    cfg = DataConfig(root=str(tmp_path / "o"), seq_length=seq, synthetic=False, sft=True,
                     mixture=[DomainConfig(name="sft", path="prolong-ultrachat-64K", share=1.0)])
    ld = MixtureLoader(cfg, vocab_size=len(vocab), seed=0, dp_rank=0, dp_size=1, micro_batch_size=1,
                       num_micro_batches=len(src))
    assistant_ids = {vocab[w] for c in CONVS for m in c if m["role"] == "assistant" for w in m["content"].split()}
    assistant_ids.add(vocab["<|end|>"])
    n_loss = 0
    for mb in ld.next_step():
        lab = mb["labels"][mb["loss_mask"] > 0]
        assert set(lab.tolist()) <= assistant_ids
        n_loss += lab.numel()
    assert n_loss == len(expected)  # one epoch: every sequence once


def test_sft_with_byte_tokenizer(tmp_path):
    convs = CONVS[:4]
    inp = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    run(inp, "--output", tmp_path / "o", "--name", "chat", "--tokenizer", "byte", "--sft", "--seq-length", 256,
        "--workers", 1)
    _, per_seq = sft_loss_labels(str(tmp_path / "o" / "chat"), 258, 256)
    got = [t for s in per_seq for t in s]
    expected = [t for c in convs for m in c if m["role"] == "assistant" for t in TOK.encode(m["content"]) + [TOK.eos_id]]
    assert got == expected


def test_sft_bad_messages(tmp_path):
    inp = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"chat.jsonl line 1: `messages` is not a list of \{role, content\}"):
        run(inp, "--output", tmp_path / "o", "--name", "c", "--tokenizer", "byte", "--sft", "--workers", 1)


def test_non_object_json_line_is_named(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "ok"}\n["a", "b"]\n')
    with pytest.raises(ValueError, match=r"in.jsonl line 2: not a JSON object"):
        run(inp, "--output", tmp_path / "o", "--name", "d", "--tokenizer", "byte", "--workers", 1)
