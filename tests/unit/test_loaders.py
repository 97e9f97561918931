import pytest

from retain.errors import RetainError
from retain.streams import load_file, load_hf
from retain.streams.builtin import numbers_stream, probe_task

FIELDS = dict(input_field="input", output_field="output", options_field="options", metric="exact_match")


def test_jsonl_and_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"input": "q1", "output": "a1"}\n\n{"input": "q2", "output": 3}\n')
    ex = load_file(p, **FIELDS)
    assert [(e.input, e.output) for e in ex] == [("q1", "a1"), ("q2", "3")]


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"input": "q", "output": "a"}\n{"input": "q", \n')
    with pytest.raises(RetainError, match=r"bad\.jsonl:2: invalid JSON"):
        load_file(p, **FIELDS)


def test_missing_field_names_field_and_what_exists(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"question": "q", "output": "a"}\n')
    with pytest.raises(RetainError, match=r"m\.jsonl:1: missing field 'input' \(fields present: output, question\)"):
        load_file(p, **FIELDS)


def test_mapped_fields_and_csv(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('q,a,opts\n"is it, really",yes,yes|no\nno way,1,"[""yes"", ""no""]"\n')
    ex = load_file(p, input_field="q", output_field="a", options_field="opts", metric="choice")
    assert ex[0].input == "is it, really" and ex[0].options == ("yes", "no") and ex[0].output == "yes"
    assert ex[1].output == "no"  # an index into the options


def test_choice_answer_letters_and_bad_answers(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"input": "q", "output": "B", "options": ["x", "y", "z"]}\n')
    assert load_file(p, **{**FIELDS, "metric": "choice"})[0].output == "y"
    p.write_text('{"input": "q", "output": "w", "options": ["x", "y"]}\n')
    with pytest.raises(RetainError, match=r"c\.jsonl:1: output 'w' is not one of the options"):
        load_file(p, **{**FIELDS, "metric": "choice"})
    p.write_text('{"input": "q", "output": "x"}\n')
    with pytest.raises(RetainError, match="needs an options list"):
        load_file(p, **{**FIELDS, "metric": "choice"})


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(RetainError, match="data file not found"):
        load_file(tmp_path / "none.jsonl", **FIELDS)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(RetainError, match="unsupported data file type '.txt'; valid"):
        load_file(tmp_path / "x.txt", **FIELDS)


def test_hf_dataset_from_local_folder(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"q": "a", "a": "b"}, {"q": "c", "a": "d"}]),
        "test": datasets.Dataset.from_list([{"q": "e", "a": "f"}]),
    })
    dd.save_to_disk(str(tmp_path / "ds"))
    ex = load_hf(str(tmp_path / "ds"), "train", input_field="q", output_field="a", options_field="o", metric="exact_match")
    assert [(e.input, e.output) for e in ex] == [("a", "b"), ("c", "d")]
    with pytest.raises(RetainError, match="has no split 'dev'"):
        load_hf(str(tmp_path / "ds"), "dev", **FIELDS)


def test_builtin_stream_is_deterministic_balanced_and_disjoint():
    a, b = numbers_stream(), numbers_stream()
    assert [t.name for t in a.tasks] == ["parity", "magnitude", "has-seven", "odd-lead"]
    for ta, tb in zip(a.tasks, b.tasks):
        assert ta.train == tb.train and ta.test == tb.test
        assert sum(e.output == "yes" for e in ta.test) == len(ta.test) // 2
        assert not {e.input for e in ta.train} & {e.input for e in ta.test}


def test_probe_ships_with_the_package():
    probe = probe_task()
    assert len(probe.test) >= 200
    assert all(e.output in e.options and len(e.options) == 4 for e in probe.test)


def test_a_line_separator_inside_a_json_string_stays_in_its_record(tmp_path):
    from retain.streams.loaders import load_file

    path = tmp_path / "t.jsonl"
    path.write_text('{"input": "one\u2028two", "output": "x"}\n{"input": "three", "output": "y"}\n', encoding="utf-8")
    examples = load_file(path, input_field="input", output_field="output", options_field="options",
                         metric="exact_match")
    assert [ex.input for ex in examples] == ["one\u2028two", "three"]
