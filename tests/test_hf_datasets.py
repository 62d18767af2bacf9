"""The nine Hugging Face datasets, loaded from tiny local fixtures in each hub schema.

Each fixture is written by ``datasets`` itself (``Dataset.to_parquet`` keeps the Image feature
metadata, as hub Parquet files do), at the path layout of the hub repository, with three rows;
the second row's image bytes are corrupt.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from flexvlm_ray.data import DATASETS
from flexvlm_ray.data.hf import SPEC_BY_NAME, DatasetSchemaError, parse_options
from flexvlm_ray.metrics import METRICS

IMAGE = datasets.Image()
STR = datasets.Value("string")
STRS = datasets.List(datasets.Value("string"))
INT = datasets.Value("int64")


def png(width: int = 24, height: int = 16, color=(200, 30, 30)) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


CORRUPT = {"bytes": b"\x89PNG\r\n\x1a\n this is not an image", "path": None}
IMAGES = [png(), CORRUPT, png(16, 24, (0, 0, 255))]


def _answers(*texts: str) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


# name -> (relative file, features, columns, expected references of row 0, prediction scoring 1.0)
FIXTURES = {
    "coco_2014_vqa": ("data/validation-00000-of-00001.parquet", {
        "question_type": STR, "multiple_choice_answer": STR,
        "answers": datasets.List({"answer": STR, "answer_confidence": STR, "answer_id": INT}),
        "image_id": INT, "answer_type": STR, "question_id": INT, "question": STR, "image": IMAGE}, {
        "question_type": ["how many", "what color", "is the"], "multiple_choice_answer": ["2", "red", "yes"],
        "answers": [_answers(*["2"] * 9, "two"), _answers(*["red"] * 10), _answers(*["yes"] * 10)],
        "image_id": [1, 2, 3], "answer_type": ["number", "other", "yes/no"], "question_id": [10, 20, 30],
        "question": ["How many cats?", "What color?", "Is the sky blue?"], "image": IMAGES},
        ["2"] * 9 + ["two"], "Two"),
    "coco_caption": ("data/val-00000-of-00001.parquet", {
        "question_id": STR, "image": IMAGE, "question": STR, "answer": STRS, "id": INT,
        "license": datasets.Value("int8"), "file_name": STR, "coco_url": STR, "height": datasets.Value("int32"),
        "width": datasets.Value("int32"), "date_captured": STR}, {
        "question_id": ["a.jpg", "b.jpg", "c.jpg"], "image": IMAGES,
        "question": [None, None, None],
        "answer": [["a red square on white", "red box"], ["a dog"], ["a blue sky"]], "id": [1, 2, 3],
        "license": [1, 1, 1], "file_name": ["a.jpg", "b.jpg", "c.jpg"], "coco_url": ["u", "u", "u"],
        "height": [16, 16, 24], "width": [24, 24, 16], "date_captured": ["d", "d", "d"]},
        ["a red square on white", "red box"], None),
    "tally_qa": ("data/test-00000-of-00001.parquet", {
        "image": IMAGE, "qa": datasets.List({"question": STR, "answer": datasets.Value("int32"),
                                             "is_simple": datasets.Value("bool")})}, {
        "image": IMAGES,
        "qa": [[{"question": "How many cats?", "answer": 3, "is_simple": True},
                {"question": "How many black cats?", "answer": 1, "is_simple": False}],
               [{"question": "How many dogs?", "answer": 0, "is_simple": True}],
               [{"question": "How many birds?", "answer": 5, "is_simple": True}]]},
        ["3"], "three"),
    "doc_qa": ("DocVQA/validation-00000-of-00001.parquet", {
        "questionId": STR, "question": STR, "question_types": STRS, "image": IMAGE, "docId": INT,
        "ucsf_document_id": STR, "ucsf_document_page_no": STR, "answers": STRS, "data_split": STR}, {
        "questionId": ["q1", "q2", "q3"], "question": ["What is the date?", "Who signed?", "Total?"],
        "question_types": [["form"], ["handwritten"], ["table/list"]], "image": IMAGES, "docId": [7, 8, 9],
        "ucsf_document_id": ["x", "y", "z"], "ucsf_document_page_no": ["1", "2", "3"],
        "answers": [["1/8/93", "January 8, 1993"], ["J. Smith"], ["$1,200"]],
        "data_split": ["val", "val", "val"]},
        ["1/8/93", "January 8, 1993"], "1/8/93"),
    "okvqa": ("data/val2014-00000-of-00001.parquet", {
        "question_id": STR, "image": IMAGE, "question": STR, "answers": STRS, "question_type": STR,
        "answer_type": STR}, {
        "question_id": ["1", "2", "3"], "image": IMAGES,
        "question": ["What sport?", "What animal?", "What fruit?"],
        "answers": [["tennis"] * 10, ["dog"] * 10, ["apple"] * 10], "question_type": ["one", "two", "one"],
        "answer_type": ["other"] * 3},
        ["tennis"] * 10, "Tennis."),
    "text_vqa": ("data/validation-00000-of-00001.parquet", {
        "image_id": STR, "question_id": datasets.Value("int32"), "question": STR, "question_tokens": STRS,
        "image": IMAGE, "image_width": datasets.Value("int32"), "image_height": datasets.Value("int32"),
        "flickr_original_url": STR, "flickr_300k_url": STR, "answers": STRS, "image_classes": STRS,
        "set_name": STR, "ocr_tokens": STRS}, {
        "image_id": ["a", "b", "c"], "question_id": [1, 2, 3],
        "question": ["What brand?", "What number?", "What word?"],
        "question_tokens": [["what", "brand"], ["what", "number"], ["what", "word"]], "image": IMAGES,
        "image_width": [24, 24, 16], "image_height": [16, 16, 24], "flickr_original_url": ["u"] * 3,
        "flickr_300k_url": ["u"] * 3, "answers": [["nokia"] * 10, ["7"] * 10, ["stop"] * 10],
        "image_classes": [["phone"], ["sign"], ["sign"]], "set_name": ["val"] * 3,
        "ocr_tokens": [["nokia"], ["7"], ["stop"]]},
        ["nokia"] * 10, "Nokia"),
    "science_qa_img": ("ScienceQA-IMG/validation-00000-of-00001.parquet", {
        "image": IMAGE, "question": STR, "choices": STRS, "answer": datasets.Value("int8"), "hint": STR,
        "task": STR, "grade": STR, "subject": STR, "topic": STR, "category": STR, "skill": STR,
        "lecture": STR, "solution": STR}, {
        "image": IMAGES, "question": ["Which is a mammal?", "Which is hot?", "Which is red?"],
        "choices": [["trout", "whale", "frog"], ["ice", "fire"], ["grass", "sky", "tomato"]],
        "answer": [1, 1, 2], "hint": ["Look at the picture.", "", ""], "task": ["closed choice"] * 3,
        "grade": ["grade3"] * 3, "subject": ["natural science"] * 3, "topic": ["biology"] * 3,
        "category": ["c"] * 3, "skill": ["s"] * 3, "lecture": ["l"] * 3, "solution": ["s"] * 3},
        ["B"], "B"),
    "st_qa": ("data/train-00000-of-00001.parquet", {
        "image": IMAGE, "qa": datasets.List({"question": STR, "answers": STRS})}, {
        "image": IMAGES,
        "qa": [[{"question": "What does the sign say?", "answers": ["stop", "stop sign"]}],
               [{"question": "What brand?", "answers": ["coca cola"]}],
               [{"question": "What number?", "answers": ["42"]}]]},
        ["stop", "stop sign"], "Stop"),
    "mmmu": ("data/validation-00000-of-00001.parquet", {
        "id": STR, "question": STR, "options": STR, "explanation": STR,
        **{f"image_{i}": IMAGE for i in range(1, 8)}, "img_type": STR, "answer": STR,
        "topic_difficulty": STR, "question_type": STR, "subfield": STR}, {
        "id": ["validation_Art_1", "validation_Art_2", "validation_Math_3"],
        "question": ["<image 1> Which style?", "<image 1> Which period?", "<image 1> What is x?"],
        "options": ["['Baroque', 'Cubism', 'Gothic']", "['A', 'B']", "[]"], "explanation": ["", "", ""],
        "image_1": IMAGES, "image_2": [None, None, png()],
        **{f"image_{i}": [None] * 3 for i in range(3, 8)}, "img_type": ["['Paintings']"] * 3,
        "answer": ["B", "A", "12"], "topic_difficulty": ["Easy"] * 3,
        "question_type": ["multiple-choice", "multiple-choice", "open"], "subfield": ["Art History"] * 3},
        ["B"], "(B) Cubism"),
}


def write_fixture(root: Path, name: str) -> Path:
    relative, features, columns, _, _ = FIXTURES[name]
    target = root / name
    (target / relative).parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(target / relative))
    return target


def _split(name: str) -> str:
    return next(iter(SPEC_BY_NAME[name].splits))


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    for name in FIXTURES:
        write_fixture(root, name)
    return root


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_loads_local_fixture_with_one_corrupt_image(name, fixture_root):
    samples = DATASETS.get(name).load(split=_split(name), num_samples=None, seed=0, path=str(fixture_root / name))
    expected_count = 4 if name == "tally_qa" else 3  # TallyQA's first row holds two questions
    assert len(samples) == expected_count
    first = samples[0]
    assert first.error is None and isinstance(first.image, Image.Image) and first.image.mode == "RGB"
    assert first.image.size == (24, 16)
    assert first.references == FIXTURES[name][3]
    assert first.task == DATASETS.get(name).task and first.prompt
    broken = [s for s in samples if s.error is not None]
    assert broken and all(s.image is None and "image decode failed" in s.error for s in broken)
    assert samples[-1].error is None and samples[-1].image.size == (16, 24)
    assert len({s.sample_id for s in samples}) == len(samples)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reference_answer_scores_full_marks(name, fixture_root):
    entry = DATASETS.get(name)
    samples = entry.load(split=_split(name), num_samples=None, seed=0, path=str(fixture_root / name))
    metric = METRICS.get(entry.metric)().fit(samples)
    if entry.metric == "cider_d":  # CIDEr-D has no fixed maximum: a reference beats a wrong caption
        assert metric.score("red box", samples[0]) > metric.score("a blue sky", samples[0])
    else:
        assert metric.score(FIXTURES[name][4], samples[0]) == pytest.approx(1.0)
    assert metric.score("zzz qqq", samples[0]) < 0.5


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_num_samples_takes_the_first_rows(name, fixture_root):
    samples = DATASETS.get(name).load(split=_split(name), num_samples=1, seed=0, path=str(fixture_root / name))
    assert len(samples) == 1 and samples[0].references == FIXTURES[name][3]
    assert DATASETS.get(name).load(split=_split(name), num_samples=0, seed=0, path=str(fixture_root / name)) == []


def test_field_mappings(fixture_root):
    load = {n: DATASETS.get(n).load(split=_split(n), num_samples=None, seed=0, path=str(fixture_root / n))
            for n in FIXTURES}
    vqa = load["coco_2014_vqa"][0]
    assert vqa.sample_id == "10" and vqa.meta["question_type"] == "how many"
    science = load["science_qa_img"][0]
    assert science.choices == ["trout", "whale", "frog"]
    assert science.prompt.startswith("Context: Look at the picture.\nWhich is a mammal?\nA. trout\nB. whale")
    mmmu = load["mmmu"]
    assert mmmu[0].choices == ["Baroque", "Cubism", "Gothic"] and mmmu[0].sample_id == "validation_Art_1"
    assert "B. Cubism" in mmmu[0].prompt and mmmu[0].meta["num_images"] == 1
    assert mmmu[2].choices is None and mmmu[2].references == ["12"] and mmmu[2].meta["num_images"] == 2
    tally = load["tally_qa"]
    assert [s.prompt for s in tally[:2]] == ["How many cats?", "How many black cats?"]
    assert tally[0].image is tally[1].image and tally[1].meta["is_simple"] is False
    assert load["coco_caption"][0].prompt == "Provide a one-sentence caption for the provided image."
    assert load["doc_qa"][0].sample_id == "q1" and load["doc_qa"][0].task == "doc"


def test_hub_ids_and_metrics_are_declared():
    expected = {"coco_2014_vqa": "lmms-lab/VQAv2", "coco_caption": "lmms-lab/COCO-Caption",
                "tally_qa": "vikhyatk/tallyqa-test", "doc_qa": "lmms-lab/DocVQA", "okvqa": "lmms-lab/OK-VQA",
                "text_vqa": "lmms-lab/textvqa", "science_qa_img": "lmms-lab/ScienceQA", "st_qa": "vikhyatk/st-vqa",
                "mmmu": "lmms-lab/MMMU"}
    assert {n: DATASETS.get(n).hub_id for n in expected} == expected
    metrics = {n: DATASETS.get(n).metric for n in expected}
    assert metrics == {"coco_2014_vqa": "vqa_accuracy", "okvqa": "vqa_accuracy", "text_vqa": "vqa_accuracy",
                       "coco_caption": "cider_d", "doc_qa": "anls", "st_qa": "anls",
                       "science_qa_img": "mc_accuracy", "mmmu": "mc_accuracy", "tally_qa": "count_accuracy"}


def test_flat_st_vqa_rows_load_too(tmp_path):
    data = datasets.Dataset.from_dict(
        {"image": IMAGES[:1], "question": ["What brand?"], "answers": [["sony"]]},
        features=datasets.Features({"image": IMAGE, "question": STR, "answers": STRS}))
    data.to_parquet(str(tmp_path / "train.parquet"))
    [sample] = DATASETS.get("st_qa").load(split="train", num_samples=None, seed=0, path=str(tmp_path))
    assert sample.prompt == "What brand?" and sample.references == ["sony"]


def test_single_parquet_file_path(fixture_root):
    file = fixture_root / "okvqa" / FIXTURES["okvqa"][0]
    assert len(DATASETS.get("okvqa").load(split="validation", num_samples=None, seed=0, path=str(file))) == 3


def test_saved_dataset_dict(tmp_path):
    _, features, columns, refs, _ = FIXTURES["text_vqa"]
    data = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    datasets.DatasetDict({"validation": data}).save_to_disk(str(tmp_path / "saved"))
    samples = DATASETS.get("text_vqa").load(split="validation", num_samples=None, seed=0, path=str(tmp_path / "saved"))
    assert len(samples) == 3 and samples[0].references == refs and samples[1].error is not None
    with pytest.raises(ValueError, match="split train not in"):
        DATASETS.get("text_vqa").load(split="train", num_samples=None, seed=0, path=str(tmp_path / "saved"))


def test_imagefolder(tmp_path):
    folder = tmp_path / "okvqa_images"
    folder.mkdir()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    rows = [{"file_name": "a.png", "question_id": "1", "question": "What?", "answers": ["cat"] * 10},
            {"file_name": "b.png", "question_id": "2", "question": "Who?", "answers": ["dog"] * 10}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = DATASETS.get("okvqa").load(split="validation", num_samples=None, seed=0, path=str(folder))
    assert [s.sample_id for s in samples] == ["1", "2"]
    assert samples[0].image.size == (20, 10) and samples[0].references == ["cat"] * 10
    assert samples[1].image is None and samples[1].error


def test_missing_path_names_dataset_and_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"Dataset 'doc_qa': local path '{missing}' does not exist"):
        DATASETS.get("doc_qa").load(split="validation", num_samples=None, seed=0, path=str(missing))


def test_empty_folder_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="Dataset 'okvqa': no Parquet/Arrow files"):
        DATASETS.get("okvqa").load(split="validation", num_samples=None, seed=0, path=str(tmp_path))


def test_folder_with_other_splits_only_fails_clearly(fixture_root):
    with pytest.raises(ValueError, match=r"no files of split train.*found splits: validation"):
        DATASETS.get("text_vqa").load(split="train", num_samples=None, seed=0, path=str(fixture_root / "text_vqa"))


def test_no_image_column_fails_clearly(tmp_path):
    datasets.Dataset.from_dict({"question": ["q"], "answers": [["a"]]}).to_parquet(str(tmp_path / "validation.parquet"))
    with pytest.raises(DatasetSchemaError, match="Dataset 'okvqa' at .*no image column"):
        DATASETS.get("okvqa").load(split="validation", num_samples=None, seed=0, path=str(tmp_path))


def test_missing_question_column_fails_clearly(tmp_path):
    data = datasets.Dataset.from_dict({"image": IMAGES[:1], "answers": [["a"]]},
                                      features=datasets.Features({"image": IMAGE, "answers": STRS}))
    data.to_parquet(str(tmp_path / "validation.parquet"))
    with pytest.raises(DatasetSchemaError, match="Dataset 'okvqa' at .*no column 'question'"):
        DATASETS.get("okvqa").load(split="validation", num_samples=None, seed=0, path=str(tmp_path))


def test_unknown_split_fails_clearly():
    with pytest.raises(ValueError, match="Dataset 'mmmu' has no split 'train'. Available: validation, dev"):
        DATASETS.get("mmmu").load(split="train", num_samples=None, seed=0, path="/unused")


@pytest.mark.parametrize("raw,options", [
    ("['1', '2']", ["1", "2"]), ('["a b", "c"]', ["a b", "c"]), ("[]", []), (["x"], ["x"]), (None, []),
])
def test_parse_mmmu_options(raw, options):
    assert parse_options(raw) == options
