"""Chat label sets mark the assistant's tokens (format 2.4, assistant_mask):
which ids of a two-turn conversation are the assistant's, windows keep the
marks aligned, training with --assistant-only counts exactly the positions
that predict them, and what cannot be marked or trained that way is refused
in one line."""

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from labelgen import format as fmt
from labelgen.errors import OptionError
from labelgen.format import FormatError
from labelgen.generate import run
from labelgen.generate.config import GenerateConfig
from labelgen.generate.inputs import InputError
from labelgen.shards import ShardReader
from student_train.cli import app as student_app
from student_train.data import LabelStream, collate, columns_from_rows, open_label_sets, take_batches
from student_train.vocab import load_tokenizer_for


def generate(teacher, inputs, out, **kw):
    return run(GenerateConfig(**{**dict(teacher=str(teacher), inputs=(str(inputs),), out=str(out), max_seq_len=512,
                                        messages_field="messages", id_field="id", progress=False, device="cpu"), **kw}))


TWO_TURNS = {"id": "c0", "messages": [
    {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, said the machine."},
    {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6, of course."}]}


def write_chats(path, *chats):
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return path


def marked_runs(ids, marks, tok) -> list[str]:
    """The text of each run of consecutive marked ids."""
    edges = np.diff(np.concatenate([[0], marks.astype(int), [0]]))
    return [tok.decode(ids[a:b]) for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


def rows_by_example(labels) -> dict:
    out = {}
    for row in ShardReader(labels).rows():
        out.setdefault(row[fmt.EXAMPLE_ID], []).append(row)
    return out


def test_a_two_turn_chat_marks_the_assistant_turns_and_nothing_else(tiny_teacher, tmp_path):
    generate(tiny_teacher, write_chats(tmp_path / "c.jsonl", TWO_TURNS), tmp_path / "labels", mode="tokens")
    reader = ShardReader(tmp_path / "labels")
    assert reader.manifest["format_version"] == fmt.FORMAT_VERSION and reader.encoding.assistant_mask
    (row,) = list(reader.rows())
    tok = load_tokenizer_for(None, tmp_path / "labels")
    ids, marks = row[fmt.INPUT_IDS], row[fmt.ASSISTANT_MASK]
    assert marks.dtype == bool and len(marks) == len(ids)
    # The demo template renders "<|role|>\ncontent\n" per message: a turn is its content and the newline ending it.
    assert marked_runs(ids, marks, tok) == ["4, said the machine.\n", "6, of course.\n"]
    assert tok.decode(ids[~marks]) == "<|user|>\nWhat is 2+2?\n<|assistant|>\n<|user|>\nAnd 3+3?\n<|assistant|>\n"


def test_a_conversation_that_opens_with_the_assistant_marks_its_first_turn(tiny_teacher, tmp_path):
    """A chat whose first message is the assistant's (a greeting, a system-less opener): its turn is what follows
    the generation prompt, as for any later turn; it used to be refused as an empty conversation."""
    opener = {"id": "c1", "messages": [{"role": "assistant", "content": "Hello, how can I help?"},
                                       {"role": "user", "content": "Add 2 and 2."},
                                       {"role": "assistant", "content": "4."}]}
    generate(tiny_teacher, write_chats(tmp_path / "c.jsonl", opener), tmp_path / "labels", mode="tokens")
    (row,) = list(ShardReader(tmp_path / "labels").rows())
    tok = load_tokenizer_for(None, tmp_path / "labels")
    ids, marks = row[fmt.INPUT_IDS], row[fmt.ASSISTANT_MASK]
    assert marked_runs(ids, marks, tok) == ["Hello, how can I help?\n", "4.\n"]
    assert tok.decode(ids[~marks]) == "<|assistant|>\n<|user|>\nAdd 2 and 2.\n<|assistant|>\n"


def test_assistant_only_counts_exactly_the_positions_that_predict_an_assistant_token(tiny_teacher, tmp_path):
    generate(tiny_teacher, write_chats(tmp_path / "c.jsonl", TWO_TURNS), tmp_path / "labels", k=8)
    (row,) = list(ShardReader(tmp_path / "labels").rows())
    columns = columns_from_rows([row])
    marks = row[fmt.ASSISTANT_MASK]
    every = collate(columns, "topk")["mask"][0].numpy()
    only = collate(columns, "topk", assistant_only=True)["mask"][0].numpy()
    assert every.all() and len(only) == len(marks) - 1
    assert (only == marks[1:]).all()   # position t predicts token t + 1
    tok = load_tokenizer_for(None, tmp_path / "labels")
    targets = row[fmt.INPUT_IDS][1:]
    assert marked_runs(targets, only, tok) == ["4, said the machine.\n", "6, of course.\n"]


def test_windows_keep_every_token_s_mark(tiny_teacher, chats, tmp_path):
    generate(tiny_teacher, chats, tmp_path / "whole", mode="tokens")
    generate(tiny_teacher, chats, tmp_path / "windows", mode="tokens", max_seq_len=9)
    whole, windows = rows_by_example(tmp_path / "whole"), rows_by_example(tmp_path / "windows")
    assert whole.keys() == windows.keys() and all(len(w) > 2 for w in windows.values())
    for ex, (row,) in whole.items():
        parts = sorted(windows[ex], key=lambda r: r[fmt.WINDOW_OFFSET])
        ids, marks = np.zeros(len(row[fmt.INPUT_IDS]), np.int64), np.zeros(len(row[fmt.INPUT_IDS]), bool)
        for part in parts:
            at = slice(part[fmt.WINDOW_OFFSET], part[fmt.WINDOW_OFFSET] + len(part[fmt.INPUT_IDS]))
            ids[at], marks[at] = part[fmt.INPUT_IDS], part[fmt.ASSISTANT_MASK]
        assert (ids == row[fmt.INPUT_IDS]).all() and (marks == row[fmt.ASSISTANT_MASK]).all()
        assert 0 < marks.sum() < len(marks)


def test_topk_and_sampled_labels_of_a_chat_carry_the_same_marks(tiny_teacher, chat_labels, chats, tmp_path):
    generate(tiny_teacher, chats, tmp_path / "sampled", mode="sampled", draws=4, max_seq_len=64)
    topk, sampled = rows_by_example(chat_labels), rows_by_example(tmp_path / "sampled")
    assert ShardReader(chat_labels).encoding.assistant_mask and topk.keys() == sampled.keys()
    for ex in topk:
        a, b = (sorted(x[ex], key=lambda r: r[fmt.WINDOW_OFFSET]) for x in (topk, sampled))
        assert [list(r[fmt.ASSISTANT_MASK]) for r in a] == [list(r[fmt.ASSISTANT_MASK]) for r in b]


def test_a_stream_with_assistant_only_masks_every_batch_by_the_marks(chat_labels):
    readers = open_label_sets([str(chat_labels)])
    plain = list(take_batches(LabelStream(readers, 4, seed=1), 3))
    only = list(take_batches(LabelStream(readers, 4, seed=1, assistant_only=True), 3))
    for a, b in zip(plain, only):
        assert (a["input_ids"] == b["input_ids"]).all() and "assistant_mask" not in b
        assert (b["mask"] <= a["mask"]).all() and 0 < int(b["mask"].sum()) < int(a["mask"].sum())


def test_a_student_with_its_own_tokenizer_counts_the_tokens_that_begin_in_the_assistant_s_text(chat_labels, chats):
    """Across tokenizers (student_train.xtok) a student position counts when the token it predicts begins in a
    teacher token of the assistant's: checked byte by byte against the teacher row's marks."""
    from labelgen.tools.demo import train_tokenizer
    from student_train.xtok import CrossTokenizer
    texts = [m["content"] for line in open(chats) for m in json.loads(line)["messages"]]
    x = CrossTokenizer(load_tokenizer_for(None, chat_labels), train_tokenizer(texts[::-1], 300))   # another vocabulary
    readers = open_label_sets([str(chat_labels)])
    (every,), (only,) = (take_batches(LabelStream(readers, 8, shuffle=False, cross=x, assistant_only=on), 1)
                         for on in (False, True))
    rows = list(ShardReader(chat_labels).rows())[:8]   # unshuffled: the batch's rows, in order
    assert 0 < int(only["mask"].sum()) < int(every["mask"].sum()) and (only["kd_mask"] <= only["mask"]).all()
    for i, row in enumerate(rows):
        teacher = [x.teacher_bytes[int(t)] for t in row[fmt.INPUT_IDS]]
        byte_marks = np.concatenate([np.full(len(b), m) for b, m in zip(teacher, row[fmt.ASSISTANT_MASK])])
        lengths = np.asarray([len(x.student_bytes[int(s)]) for s in only["input_ids"][i]])
        n = int(only["attention_mask"][i].sum())
        assert b"".join(x.student_bytes[int(s)] for s in only["input_ids"][i, :n]) == b"".join(teacher)
        starts = np.cumsum(lengths[:n])[:-1]   # where each target (student token 1..n-1) begins
        expected = (lengths[1:n] > 0) & byte_marks[np.minimum(starts, len(byte_marks) - 1)]
        assert (only["mask"][i, :n - 1].numpy() == expected).all()
        assert (only["mask"][i, :n - 1] <= every["mask"][i, :n - 1]).all()


def test_inspect_counts_the_positions_assistant_only_trains_on(chat_labels, topk_labels):
    from labelgen.tools.inspection import format_inspect, inspect
    r = inspect(chat_labels)
    marked = sum(int(row[fmt.ASSISTANT_MASK][1:].sum()) for row in ShardReader(chat_labels).rows())
    assert r["assistant_positions"] == marked and 0 < marked < r["positions"]
    assert f"{marked:,} positions" in format_inspect(r)
    assert "assistant_positions" not in inspect(topk_labels)


def test_student_train_assistant_only_trains_on_the_marked_positions(chat_labels, topk_labels, student_config, tmp_path):
    common = ["train", "--labels", str(chat_labels), "--student-config", student_config, "--max-steps", "1",
              "--batch-size", "4", "--warmup-steps", "0", "--save-every", "0", "--no-progress", "--device", "cpu"]
    runner = CliRunner()
    for name, extra in (("every", []), ("only", ["--assistant-only"])):
        r = runner.invoke(student_app, common + ["--out", str(tmp_path / name)] + extra)
        assert r.exit_code == 0, r.output
    tokens = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["tokens"]
              for name in ("every", "only")}
    (first,) = take_batches(LabelStream(open_label_sets([str(chat_labels)]), 4, assistant_only=True), 1)
    assert tokens["only"] == int(first["mask"].sum()) < tokens["every"]
    r = runner.invoke(student_app, common[:2] + [str(topk_labels)] + common[3:] + ["--out", str(tmp_path / "text"),
                                                                                 "--assistant-only"])
    assert r.exit_code != 0 and "--assistant-only:" in r.output and "does not mark the assistant's tokens" in r.output


def test_sets_that_cannot_be_trained_on_the_assistant_s_tokens_are_refused_in_one_line(topk_labels, chat_labels,
                                                                                        scored_labels):
    with pytest.raises(FormatError, match=r"--assistant-only: .* does not mark the assistant's tokens \(made from text"):
        LabelStream(open_label_sets([str(topk_labels)]), 4, assistant_only=True)
    with pytest.raises(FormatError, match="assistant-only training needs labels that mark the assistant's tokens"):
        collate(columns_from_rows(list(ShardReader(topk_labels).rows())[:2]), "topk", assistant_only=True)
    # Completions are the assistant's turn already: assistant-only changes nothing there.
    readers = open_label_sets([str(scored_labels)])
    (a,), (b,) = (take_batches(LabelStream(readers, 4, seed=0, assistant_only=on), 1) for on in (False, True))
    assert (a["mask"] == b["mask"]).all()


def test_marks_need_a_conversation_and_a_template_that_keeps_earlier_turns(tiny_teacher, tmp_path):
    with pytest.raises(OptionError, match="--encoding: assistant_mask marks the assistant's turns of conversations"):
        GenerateConfig(teacher="t", inputs=("x",), out="o", encoding={"assistant_mask": True})
    # A template that shortens every assistant turn but the last (as some reasoning templates drop earlier thoughts).
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    rewrites = ("{% for m in messages %}<|{{ m['role'] }}|>\n"
                "{{ m['content'] if loop.last or m['role'] != 'assistant' else '(earlier answer)' }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (teacher / "chat_template.jinja").write_text(rewrites)
    chats = write_chats(tmp_path / "c.jsonl", TWO_TURNS, {**TWO_TURNS, "id": "c1", "messages": TWO_TURNS["messages"][:2]})
    with pytest.raises(InputError, match=r"c\.jsonl:1: the chat template renders the conversation through message 1 "
                                         r"otherwise than as the start of the whole"):
        generate(teacher, chats, tmp_path / "refused", mode="tokens")
    m = generate(teacher, chats, tmp_path / "skipped", mode="tokens", skip_bad=True)
    assert m["counts"]["skipped"] == 1 and m["counts"]["rows"] == 1   # the one-turn chat is whole either way
    m = generate(teacher, chats, tmp_path / "unmarked", mode="tokens", encoding={"assistant_mask": False})
    assert m["counts"]["rows"] == 2 and not ShardReader(tmp_path / "unmarked").encoding.assistant_mask


def test_a_mark_per_input_id_is_checked_when_written_and_read(tmp_path):
    enc = fmt.Encoding(assistant_mask=True)
    row = {fmt.EXAMPLE_ID: "a", fmt.INPUT_IDS: np.arange(5), fmt.ASSISTANT_MASK: np.array([0, 0, 1, 1, 1])}
    decoded = fmt.decode_batch(fmt.encode_rows("tokens", [row], 0, 16, enc), "tokens", 0, enc)
    assert decoded[fmt.ASSISTANT_MASK][0].tolist() == [False, False, True, True, True]
    with pytest.raises(FormatError, match="example 'a': assistant_mask has 4 entries for 5 input ids"):
        fmt.encode_rows("tokens", [{**row, fmt.ASSISTANT_MASK: np.ones(4, bool)}], 0, 16, enc)
    with pytest.raises(FormatError, match="example 'a': assistant_mask must hold booleans"):
        fmt.encode_rows("tokens", [{**row, fmt.ASSISTANT_MASK: np.full(5, 2)}], 0, 16, enc)
    with pytest.raises(FormatError, match="example 'a': assistant_mask is missing"):
        fmt.encode_rows("tokens", [{fmt.EXAMPLE_ID: "a", fmt.INPUT_IDS: np.arange(5)}], 0, 16, enc)
    assert fmt.ASSISTANT_MASK not in fmt.schema("tokens", 16, fmt.Encoding()).names   # sets of text have none
    assert [k for k in fmt.KINDS if fmt.ASSISTANT_MASK in fmt.schema(k, 16, enc).names] == list(fmt.WINDOW_KINDS)


def test_a_shard_whose_marks_do_not_match_its_ids_is_refused_before_decoding(tmp_path, monkeypatch):
    from labelgen.format import codec
    from labelgen.shards import ShardWriter
    import pyarrow as pa
    enc = fmt.Encoding(assistant_mask=True)
    honest = codec._assistant_mask
    monkeypatch.setattr(codec, "_assistant_mask", lambda sch, rows: {   # one mark short in the last row
        fmt.ASSISTANT_MASK: pa.array([list(r[fmt.ASSISTANT_MASK][:-1] if i == len(rows) - 1 else r[fmt.ASSISTANT_MASK])
                                      for i, r in enumerate(rows)], pa.list_(pa.bool_()))})
    with ShardWriter(tmp_path / "l", "tokens", 0, 16, encoding=enc) as w:
        for i in range(3):
            w.write({fmt.EXAMPLE_ID: f"e{i}", fmt.INPUT_IDS: np.arange(6), fmt.ASSISTANT_MASK: np.arange(6) > 2})
    monkeypatch.setattr(codec, "_assistant_mask", honest)
    with pytest.raises(FormatError, match=r"row group 0: assistant_mask holds 17 values for 18 input ids"):
        list(ShardReader(tmp_path / "l").rows())


@pytest.mark.parametrize("cli", [False, True], ids=["reader", "validate"])
def test_marks_one_short_in_a_row_and_one_long_in_the_next_are_refused_naming_shard_row_group_and_row(tmp_path,
                                                                                                      monkeypatch, cli):
    """Totals that agree (18 marks for 18 ids) but rows that do not: validate and the reader name the row."""
    from labelgen.format import codec
    from labelgen.shards import ShardWriter
    from labelgen.tools.inspection import validate
    import pyarrow as pa
    enc = fmt.Encoding(assistant_mask=True)
    honest = codec._assistant_mask
    shift = {0: -1, 1: 1}   # row 0 one mark short, row 1 one long
    monkeypatch.setattr(codec, "_assistant_mask", lambda sch, rows: {fmt.ASSISTANT_MASK: pa.array(
        [list(r[fmt.ASSISTANT_MASK]) + [True] if shift.get(i) == 1 else list(r[fmt.ASSISTANT_MASK][:-1])
         if shift.get(i) == -1 else list(r[fmt.ASSISTANT_MASK]) for i, r in enumerate(rows)], pa.list_(pa.bool_()))})
    with ShardWriter(tmp_path / "l", "tokens", 0, 16, encoding=enc) as w:
        for i in range(3):
            w.write({fmt.EXAMPLE_ID: f"e{i}", fmt.INPUT_IDS: np.arange(6), fmt.ASSISTANT_MASK: np.arange(6) > 2})
    monkeypatch.setattr(codec, "_assistant_mask", honest)
    words = "shard-000000.parquet: row group 0: row 0: assistant_mask has 5 marks for 6 input ids (one per input id)"
    if cli:
        problems = validate(str(tmp_path / "l"))["problems"]
        assert problems and words.split(": ", 1)[1] in problems[0]["problem"], problems
    else:
        with pytest.raises(FormatError, match=re.escape(words)):
            list(ShardReader(tmp_path / "l").rows())


def test_labels_where_no_position_counts_are_refused_after_one_pass_and_eval_reports_no_figure(tiny_teacher,
                                                                                              student_config, tmp_path):
    """Chats without an assistant turn, trained --assistant-only: a whole pass counts nothing, and the run stops in
    one line (it trained "to step N" on nothing, exit 0, before); held out, such labels give no figure, not 0.0."""
    lonely = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}: " + "why? " * (3 + i)}]}
              for i in range(3)]
    generate(tiny_teacher, write_chats(tmp_path / "c.jsonl", *lonely), tmp_path / "labels", mode="topk", k=4,
             max_seq_len=64)
    r = CliRunner().invoke(student_app, ["train", "--labels", str(tmp_path / "labels"), "--student-config",
                                         student_config, "--max-steps", "20", "--batch-size", "2", "--warmup-steps",
                                         "0", "--save-every", "0", "--no-progress", "--device", "cpu",
                                         "--assistant-only", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "count no position in a whole pass over them (--assistant-only" in r.output, r.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps, default=0) < 20   # stopped after the pass, not at the end of the run
    from student_train.runtime import Dist, evaluate
    from student_train.train import score
    from student_train.runtime import build_model
    model = build_model(None, student_config, load_tokenizer_for(None, tmp_path / "labels"), 0)
    stream = LabelStream(open_label_sets([str(tmp_path / "labels")]), 2, shuffle=False, max_epochs=1,
                         assistant_only=True)
    assert evaluate({"student": model}, score, take_batches(stream, 4), Dist(), "float32") == {"eval_positions": 0}
