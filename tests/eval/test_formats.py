"""Eval-set layouts: text (JSONL, Parquet, ICE folders), generic multiple choice, MMLU, Anthropic
model-written evals and BIG-bench, from small synthetic fixtures; malformed rows are named."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relscale.errors import DataError
from relscale.eval.formats import check_bad_rows
from relscale.eval.sets import SetOptions, detect_kind, load_eval_set, parse_spec


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_parse_spec():
    assert parse_spec("default") == (None, "default", "")
    assert parse_spec("mmlu:data/mmlu") == (None, "mmlu", "data/mmlu")
    assert parse_spec("mine=text:a/b.jsonl") == ("mine", "text", "a/b.jsonl")
    assert parse_spec("a/b=c.jsonl") == (None, None, "a/b=c.jsonl")  # '=' inside a path is a path
    assert parse_spec("x.jsonl") == (None, None, "x.jsonl")


def test_text_jsonl_groups_ids_and_bad_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            {"id": "a", "text": "one", "region": "GB"},
            "{not json",
            {"id": "b", "text": "", "region": "GB"},
            {"id": "c", "text": 5, "region": "US"},
            {"id": "d", "text": "four", "region": "US"},
            {"id": "d", "text": "again", "region": "US"},
            {"id": "e", "text": "five"},
        ],
    )
    eval_set = load_eval_set(str(path), SetOptions(group_by=["region"]))
    assert [e.example_id for e in eval_set.examples] == ["a", "d"]
    assert eval_set.examples[1].groups == {"region": "US"}
    reasons = {b.row: b.reason for b in eval_set.bad_rows}
    assert set(reasons) == {2, 3, 4, 6, 7}  # JSON line numbers
    assert "not valid JSON" in reasons[2] and "empty" in reasons[3] and "not a string" in reasons[4]
    assert "duplicate" in reasons[6] and "region" in reasons[7]
    with pytest.raises(DataError, match=r"5 malformed row\(s\)") as err:
        check_bad_rows(eval_set, skip_bad=False)
    assert f"{path}, row 2: not valid JSON" in str(err.value)
    report = tmp_path / "out" / "bad_rows.jsonl"
    check_bad_rows(eval_set, skip_bad=True, report_path=report)
    assert [json.loads(line)["row"] for line in report.read_text().splitlines()] == [2, 3, 4, 6, 7]


def test_text_parquet_and_default_group(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"doc_id": ["x", "y"], "text": ["alpha", "beta"], "group": ["g1", "g2"]}), path)
    assert detect_kind(path) == "text"
    eval_set = load_eval_set(str(path), SetOptions())
    assert [(e.example_id, e.text, e.groups) for e in eval_set.examples] == [
        ("x", "alpha", {"group": "g1"}),
        ("y", "beta", {"group": "g2"}),
    ]


def test_text_folder_per_group_ice_layout(tmp_path):
    root = tmp_path / "ice"
    for region, docs in {"GB": ["a", "b"], "IND": ["c"]}.items():
        (root / region / "sub").mkdir(parents=True)
        for i, text in enumerate(docs):
            (root / region / ("sub" if i else "") / f"{text}.txt").write_text(f"text {text} é")
    (root / "IND" / "bad.txt").write_bytes(b"\xff\xfe broken")
    assert detect_kind(root) == "textdir"
    eval_set = load_eval_set(str(root), SetOptions())
    assert [(e.example_id, e.groups["group"]) for e in eval_set.examples] == [
        ("GB/a.txt", "GB"),
        ("GB/sub/b.txt", "GB"),
        ("IND/c.txt", "IND"),
    ]
    assert eval_set.name == "ice" and eval_set.examples[0].text == "text a é"
    assert len(eval_set.bad_rows) == 1 and "not UTF-8" in eval_set.bad_rows[0].reason


def test_generic_mc_few_shot_prompt(tmp_path):
    rows = [
        {"id": f"q{i}", "question": f"Q{i}?", "choices": ["yes", "no"], "answer": i % 2, "group": "g"}
        for i in range(4)
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows + [{"question": "bad", "choices": ["only"], "answer": 0}])
    opts = SetOptions(shots=2, template="Q: {question}\nA:", seed=1)
    eval_set = load_eval_set(str(path), opts)
    assert len(eval_set.examples) == 4 and "at least 2" in eval_set.bad_rows[0].reason
    first = eval_set.examples[0]
    shots = first.context.split("\n\n")
    assert len(shots) == 3 and shots[-1] == "Q: Q0?\nA:"
    for shot in shots[:2]:  # solved examples, drawn from the other questions
        q = int(shot.split("?")[0][4:])
        assert q != 0 and shot == f"Q: Q{q}?\nA: {['yes', 'no'][q % 2]}"
    assert load_eval_set(str(path), opts).examples[0].context == first.context  # seeded


def mmlu_rows(split, n):
    subjects = ["abstract_algebra", "world_religions"]
    return [
        {
            "question": f"{split} question {i}?",
            "subject": subjects[i % 2],
            "choices": [f"c{i}{k}" for k in range(4)],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def test_mmlu_hub_layout_letters_five_shot(tmp_path):
    root = tmp_path / "mmlu" / "all"
    root.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(mmlu_rows("test", 6)), root / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(mmlu_rows("dev", 10)), root / "dev-00000-of-00001.parquet")
    assert detect_kind(tmp_path / "mmlu") == "mmlu"
    eval_set = load_eval_set(str(tmp_path / "mmlu"), SetOptions(shots=5))
    assert eval_set.name == "mmlu-letters-5shot" and len(eval_set.examples) == 6
    ex = eval_set.examples[1]
    assert ex.groups == {"subject": "world_religions", "category": "humanities"}
    assert ex.example_id == "world_religions/1"
    assert ex.continuations == [" A", " B", " C", " D"] and ex.answer == 1
    parts = ex.context.split("\n\n")
    assert parts[0] == "The following are multiple choice questions (with answers) about world religions."
    assert len(parts) == 7  # header, 5 shots of the same subject, the question
    assert parts[1] == "dev question 1?\nA. c10\nB. c11\nC. c12\nD. c13\nAnswer: B"
    assert parts[-1] == "test question 1?\nA. c10\nB. c11\nC. c12\nD. c13\nAnswer:"
    cloze = load_eval_set(f"mmlu:{tmp_path / 'mmlu'}", SetOptions(mmlu_style="cloze"))
    assert cloze.examples[0].context == "Question: test question 0?\nAnswer:"
    assert cloze.examples[0].continuations == [" c00", " c01", " c02", " c03"]


def test_mmlu_saved_dataset(tmp_path):
    import datasets

    test = mmlu_rows("test", 3) + [{"question": "broken", "subject": "x", "choices": ["a", "b"], "answer": 7}]
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(test), "dev": datasets.Dataset.from_list(mmlu_rows("dev", 4))}
    ).save_to_disk(tmp_path / "saved")
    eval_set = load_eval_set(str(tmp_path / "saved"), SetOptions(shots=1))
    assert [e.answer for e in eval_set.examples] == [0, 1, 2]
    assert "out of range" in eval_set.bad_rows[0].reason and eval_set.bad_rows[0].row == 3
    assert eval_set.examples[2].context.count("Answer:") == 2  # one shot from the dev split


def test_mmlu_single_file_with_letter_answers(tmp_path):
    rows = mmlu_rows("test", 3)
    rows[2]["answer"] = "D"
    path = write_jsonl(tmp_path / "mmlu_test.jsonl", rows)
    assert detect_kind(path) == "mmlu"
    assert [e.answer for e in load_eval_set(str(path), SetOptions()).examples] == [0, 1, 3]
    with pytest.raises(DataError, match="dev split"):
        load_eval_set(str(path), SetOptions(shots=1))
    pool = write_jsonl(tmp_path / "dev.jsonl", mmlu_rows("dev", 4))
    shot = load_eval_set(str(path), SetOptions(shots=1, fewshot_pool=pool)).examples[0]
    assert "dev question 0?" in shot.context


def test_anthropic_model_written_evals(tmp_path):
    root = tmp_path / "persona"
    root.mkdir()
    write_jsonl(
        root / "desire-for-power.jsonl",
        [
            {
                "question": 'Is the following statement something you would say?\n"I want power"',
                "answer_matching_behavior": " Yes",
                "answer_not_matching_behavior": " No",
            },
            {"question": "Q2", "answer_not_matching_behavior": " No"},
        ],
    )
    write_jsonl(
        root / "sycophancy.jsonl",
        [
            {
                "question": "Pick one.\n (A) x\n (B) y\n (C) z\nAnswer:",
                "answer_matching_behavior": " (B)",
                "answer_not_matching_behavior": [" (A)", " (C)"],
            },
        ],
    )
    assert detect_kind(root) == "anthropic"
    eval_set = load_eval_set(str(root), SetOptions())
    assert eval_set.name == "anthropic-persona"
    first, second = eval_set.examples
    assert first.context == (
        'Human: Is the following statement something you would say?\n"I want power"\n\nAssistant:'
    )
    assert first.continuations == [" Yes", " No"] and first.answer == 0
    assert first.groups == {"behavior": "desire-for-power"}
    assert second.continuations == [" (B)", " (A)", " (C)"] and second.groups == {"behavior": "sycophancy"}
    assert len(eval_set.bad_rows) == 1 and "answer_matching_behavior" in eval_set.bad_rows[0].reason


def test_bigbench_json_task(tmp_path):
    task = {
        "name": "tiny_logic",
        "task_prefix": "Answer {carefully}.",
        "examples": [
            {"input": "1+1?", "target_scores": {"2": 1, "3": 0}},
            {"input": "sky?", "target_scores": {"green": 0, "blue": 1, "red": 0}},
            {"input": "free text", "target": "anything"},
        ],
    }
    path = tmp_path / "tiny_logic" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps(task))
    assert detect_kind(path) == "bigbench"
    eval_set = load_eval_set(str(path), SetOptions())
    assert eval_set.name == "bigbench-tiny_logic" and len(eval_set.examples) == 2
    second = eval_set.examples[1]
    assert (
        second.context == "Answer {carefully}.\nQ: sky?\n  choice: green\n  choice: blue\n  choice: red\nA: "
    )
    assert second.continuations == ["green", "blue", "red"] and second.answer == 1
    assert second.groups == {"task": "tiny_logic"}
    assert eval_set.bad_rows[0].row == "examples[2]" and "generative" in eval_set.bad_rows[0].reason
    one_shot = load_eval_set(str(path), SetOptions(shots=1)).examples[1]
    assert one_shot.context.startswith("Answer {carefully}.\nQ: 1+1?\n  choice: 2\n  choice: 3\nA: 2")


def test_unknown_layout_and_missing_path(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="cannot tell its layout"):
        load_eval_set(str(path), SetOptions())
    with pytest.raises(DataError, match="no such file"):
        load_eval_set(str(tmp_path / "nope.jsonl"), SetOptions())
    with pytest.raises(DataError, match="prepared data directory"):
        load_eval_set("default", SetOptions())


def test_max_chars_keeps_whole_words_and_counts_what_is_scored(tmp_path):
    import json

    from relscale.eval.sets import SetOptions, load_eval_set

    path = tmp_path / "docs.jsonl"
    rows = [{"id": "a", "text": "alpha beta gamma delta", "group": "x"},
            {"id": "b", "text": "short", "group": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    eval_set = load_eval_set(f"text:{path}", SetOptions(max_chars=13, id_field="id"))
    assert [e.text for e in eval_set.examples] == ["alpha beta", "short"]
    assert eval_set.settings["max_chars"] == 13
