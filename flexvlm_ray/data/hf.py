"""The nine seed datasets, loaded through Hugging Face ``datasets``: from the hub or a local copy.

Each dataset is one ``HFDatasetSpec``: the hub id a user would pass (a Parquet repository, so it
loads with ``datasets`` >= 4, which dropped loading scripts), its config, our split names mapped
to the hub's, the metric, the image column(s), and a ``records`` function that turns one row of
the hub schema into samples (TallyQA rows hold several questions about one image).

Where the rows come from (``path``):

* ``None``: ``datasets.load_dataset(hub_id, config, split=..., streaming=True)``; only the rows
  needed for ``num_samples`` are fetched. Tests never take this path.
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a directory (or single file) of Parquet or Arrow files, e.g. a downloaded snapshot of the hub
  repository: files named ``<split>-*.parquet`` / ``<split>.parquet`` or under a ``<split>/``
  folder are that split (hub or our split name); a folder whose files name no split at all is
  taken whole;
* an ``imagefolder`` (images plus ``metadata.jsonl`` / ``metadata.csv`` with the same columns).

Images are decoded here (never by ``datasets``) to RGB PIL images, from bytes, a path (relative
paths resolve against ``path``) or a PIL image. A row whose image cannot be decoded becomes a
Sample with ``image=None`` and ``error`` set; the other rows load normally. Samples come back in
file/row order, the first ``num_samples`` of them; the seed is unused (the order is the data's).
"""
from __future__ import annotations

import ast
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from PIL import Image

from flexvlm_ray.data.base import DatasetEntry, Sample, register_dataset
from flexvlm_ray.data.shapes import mc_prompt

DEFAULT_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class DatasetSchemaError(ValueError):
    """The data does not have the columns a dataset's schema needs."""


@dataclass(frozen=True)
class Record:
    """One sample's text fields, extracted from a row."""

    sample_id: str
    prompt: str
    references: list[str]
    choices: Optional[list[str]] = None
    meta: dict[str, Any] = field(default_factory=dict)


RowReader = Callable[..., list[Record]]


@dataclass(frozen=True)
class HFDatasetSpec:
    name: str
    hub_id: str
    config: Optional[str]
    task: str
    metric: str
    splits: dict[str, str]            # our split name -> the hub's split name
    image_columns: tuple[str, ...]    # the first present, non-null one is the sample's image
    records: RowReader                # records(row=..., row_index=..., split=...) -> [Record]


# ----------------------------------------------------------------------------- row readers


def column(row: dict[str, Any], *names: str) -> Any:
    """The value of the first of ``names`` that the row has; a schema error naming them if none."""
    for name in names:
        if name in row:
            return row[name]
    raise DatasetSchemaError(f"no column {' or '.join(repr(n) for n in names)}; columns: {sorted(row)}")


def _string_list(value: Any) -> list[str]:
    """Answers as a list of strings: from a list of strings, of {'answer': ...} dicts, or one value."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)]
    return [str(v["answer"]) if isinstance(v, dict) else str(v) for v in value if v is not None]


def _row_id(row: dict[str, Any], *names: str, fallback: str) -> str:
    for name in names:
        if row.get(name) is not None:
            return str(row[name])
    return fallback


def _vqa_v2(*, row: dict, row_index: int, split: str) -> list[Record]:
    return [Record(sample_id=_row_id(row, "question_id", fallback=f"{split}-{row_index}"),
                   prompt=column(row, "question"), references=_string_list(column(row, "answers")),
                   meta={k: row[k] for k in ("question_type", "answer_type", "image_id") if k in row})]


def _plain_vqa(*, row: dict, row_index: int, split: str) -> list[Record]:
    """OK-VQA, TextVQA, DocVQA rows: question + answers (list of strings)."""
    return [Record(sample_id=_row_id(row, "question_id", "questionId", fallback=f"{split}-{row_index}"),
                   prompt=column(row, "question"), references=_string_list(column(row, "answers", "answer")),
                   meta={k: row[k] for k in ("question_type", "answer_type", "question_types", "image_id", "docId")
                         if k in row and row[k] is not None})]


def _coco_caption(*, row: dict, row_index: int, split: str) -> list[Record]:
    prompt = row.get("question") or DEFAULT_CAPTION_PROMPT
    return [Record(sample_id=_row_id(row, "question_id", "file_name", "id", fallback=f"{split}-{row_index}"),
                   prompt=prompt, references=_string_list(column(row, "answer", "captions", "caption")),
                   meta={k: row[k] for k in ("file_name", "id") if k in row})]


def _nested_qa(*, row: dict, row_index: int, split: str) -> list[Record]:
    """TallyQA / ST-VQA: a flat row (question + answer[s]) or a ``qa`` list of such dicts."""
    items = row["qa"] if "qa" in row else [row]
    records = []
    for q_index, qa in enumerate(items or []):
        answers = _string_list(column(qa, "answers", "answer"))
        sample_id = _row_id(qa, "question_id", fallback=f"{split}-{row_index}-{q_index}")
        meta = {k: qa[k] for k in ("is_simple", "issimple", "data_source") if k in qa}
        records.append(Record(sample_id=sample_id, prompt=column(qa, "question"), references=answers, meta=meta))
    return records


def _science_qa(*, row: dict, row_index: int, split: str) -> list[Record]:
    choices = [str(c) for c in column(row, "choices")]
    answer = int(column(row, "answer"))
    return [Record(sample_id=f"{split}-{row_index}",
                   prompt=mc_prompt(question=column(row, "question"), choices=choices, context=row.get("hint") or ""),
                   references=[chr(ord("A") + answer)], choices=choices,
                   meta={k: row[k] for k in ("subject", "topic", "category", "grade", "skill") if k in row})]


def parse_options(value: Any) -> list[str]:
    """MMMU's ``options``: a Python-literal string of a list (``"['1', '2']"``), or a list."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = json.loads(value)
    return [str(v) for v in value]


def _mmmu(*, row: dict, row_index: int, split: str) -> list[Record]:
    options = parse_options(column(row, "options"))
    question = column(row, "question")
    num_images = sum(1 for i in range(1, 8) if row.get(f"image_{i}") is not None)
    return [Record(sample_id=_row_id(row, "id", fallback=f"{split}-{row_index}"),
                   prompt=mc_prompt(question=question, choices=options) if options else question,
                   references=_string_list(column(row, "answer")), choices=options or None,
                   meta={"question_type": row.get("question_type"), "num_images": num_images,
                         **{k: row[k] for k in ("subfield", "topic_difficulty", "img_type") if k in row}})]


SPECS: tuple[HFDatasetSpec, ...] = (
    HFDatasetSpec(name="coco_2014_vqa", hub_id="lmms-lab/VQAv2", config=None, task="vqa", metric="vqa_accuracy",
                  splits={"validation": "validation"}, image_columns=("image",), records=_vqa_v2),
    HFDatasetSpec(name="coco_caption", hub_id="lmms-lab/COCO-Caption", config=None, task="caption",
                  metric="cider_d", splits={"validation": "val"}, image_columns=("image",), records=_coco_caption),
    HFDatasetSpec(name="tally_qa", hub_id="vikhyatk/tallyqa-test", config=None, task="count",
                  metric="count_accuracy", splits={"test": "test"}, image_columns=("image",), records=_nested_qa),
    HFDatasetSpec(name="doc_qa", hub_id="lmms-lab/DocVQA", config="DocVQA", task="doc", metric="anls",
                  splits={"validation": "validation"}, image_columns=("image",), records=_plain_vqa),
    HFDatasetSpec(name="okvqa", hub_id="lmms-lab/OK-VQA", config=None, task="vqa", metric="vqa_accuracy",
                  splits={"validation": "val2014"}, image_columns=("image",), records=_plain_vqa),
    HFDatasetSpec(name="text_vqa", hub_id="lmms-lab/textvqa", config=None, task="vqa", metric="vqa_accuracy",
                  splits={"validation": "validation", "train": "train"}, image_columns=("image",),
                  records=_plain_vqa),
    HFDatasetSpec(name="science_qa_img", hub_id="lmms-lab/ScienceQA", config="ScienceQA-IMG",
                  task="multiple_choice", metric="mc_accuracy",
                  splits={"validation": "validation", "test": "test"}, image_columns=("image",),
                  records=_science_qa),
    HFDatasetSpec(name="st_qa", hub_id="vikhyatk/st-vqa", config=None, task="vqa", metric="anls",
                  splits={"train": "train"}, image_columns=("image",), records=_nested_qa),
    HFDatasetSpec(name="mmmu", hub_id="lmms-lab/MMMU", config=None, task="multiple_choice", metric="mc_accuracy",
                  splits={"validation": "validation", "dev": "dev"},
                  image_columns=tuple(f"image_{i}" for i in range(1, 8)), records=_mmmu),
)


# ----------------------------------------------------------------------------- images


def decode_image(value: Any, *, root: Optional[Path] = None) -> Image.Image:
    """An RGB PIL image from a PIL image, encoded bytes, a ``{'bytes', 'path'}`` dict or a path."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(value))) as image:
            return image.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        file = Path(value)
        if not file.is_absolute() and root is not None:
            file = root / file
        with Image.open(file) as image:
            return image.convert("RGB")
    raise ValueError(f"no image data (got {type(value).__name__})")


# ----------------------------------------------------------------------------- row sources


def _split_names(spec: HFDatasetSpec, split: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((split, spec.splits[split])))


def _files_of_split(*, files: list[Path], root: Path, names: tuple[str, ...], spec: HFDatasetSpec) -> list[Path]:
    def split_of(file: Path) -> Optional[str]:
        parts = file.relative_to(root).parts
        for name in sorted({*spec.splits, *spec.splits.values(), "train", "validation", "val", "test", "dev"}):
            if file.name.startswith(f"{name}-") or file.stem == name or name in parts[:-1]:
                return name
        return None

    labelled = {file: split_of(file) for file in files}
    chosen = [f for f in files if labelled[f] in names]
    if chosen:
        return chosen
    found = sorted({s for s in labelled.values() if s is not None})
    if found:
        raise ValueError(f"Dataset '{spec.name}': no files of split {' / '.join(names)} under '{root}' "
                         f"(found splits: {', '.join(found)})")
    return files


def _stream_files(*, builder: str, files: list[Path]) -> Iterable[dict]:
    import datasets

    stream = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    return stream.decode(False)


def _saved(*, spec: HFDatasetSpec, root: Path, names: tuple[str, ...]) -> Iterable[dict]:
    import datasets

    data = datasets.load_from_disk(str(root))
    if isinstance(data, datasets.DatasetDict):
        split = next((n for n in names if n in data), None)
        if split is None:
            raise ValueError(f"Dataset '{spec.name}': split {' / '.join(names)} not in '{root}' "
                             f"(available: {', '.join(data)})")
        data = data[split]
    for name, feature in data.features.items():
        if isinstance(feature, datasets.Image):
            data = data.cast_column(name, datasets.Image(decode=False))
    return data


def _imagefolder(*, spec: HFDatasetSpec, root: Path, names: tuple[str, ...]) -> Iterable[dict]:
    import datasets

    data = datasets.load_dataset("imagefolder", data_dir=str(root), streaming=True)
    split = next((n for n in names if n in data), "train" if list(data) == ["train"] else None)
    if split is None:
        raise ValueError(f"Dataset '{spec.name}': split {' / '.join(names)} not in imagefolder '{root}' "
                         f"(available: {', '.join(data)})")
    return data[split].decode(False)


def open_rows(*, spec: HFDatasetSpec, split: str, path: Optional[str]) -> tuple[Iterable[dict], Optional[Path]]:
    """The rows of one split, and the folder that relative image paths resolve against."""
    names = _split_names(spec, split)
    if path is None:
        import datasets

        stream = datasets.load_dataset(spec.hub_id, spec.config, split=spec.splits[split], streaming=True)
        return stream.decode(False), None
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"Dataset '{spec.name}': local path '{path}' does not exist")
    if root.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow"}.get(root.suffix)
        if builder is None:
            raise ValueError(f"Dataset '{spec.name}': '{path}' is not a Parquet or Arrow file")
        return _stream_files(builder=builder, files=[root]), root.parent
    if any((root / m).exists() for m in _SAVED_MARKERS):
        return _saved(spec=spec, root=root, names=names), root
    if any((root / m).exists() for m in _METADATA_FILES):
        return _imagefolder(spec=spec, root=root, names=names), root
    for builder, pattern in (("parquet", "*.parquet"), ("arrow", "*.arrow")):
        files = sorted(root.rglob(pattern))
        if files:
            return _stream_files(builder=builder, files=_files_of_split(files=files, root=root, names=names,
                                                                        spec=spec)), root
    raise ValueError(f"Dataset '{spec.name}': no Parquet/Arrow files, saved dataset or imagefolder "
                     f"under '{path}'")


# ----------------------------------------------------------------------------- samples


def _image_of(*, spec: HFDatasetSpec, row: dict, where: str) -> Any:
    present = [c for c in spec.image_columns if c in row]
    if not present:
        raise DatasetSchemaError(f"Dataset '{spec.name}' at {where}: no image column (expected "
                                 f"{' or '.join(spec.image_columns)}); columns: {sorted(row)}")
    return next((row[c] for c in present if row[c] is not None), None)


def iter_samples(*, spec: HFDatasetSpec, rows: Iterable[dict], split: str, root: Optional[Path],
                 where: str) -> Iterator[Sample]:
    """Samples from rows in order; an undecodable image gives a sample with ``error`` set."""
    for row_index, row in enumerate(rows):
        raw_image = _image_of(spec=spec, row=row, where=where)
        try:
            records = spec.records(row=row, row_index=row_index, split=split)
        except DatasetSchemaError as e:
            raise DatasetSchemaError(f"Dataset '{spec.name}' at {where}: {e}") from None
        if not records:
            continue
        image, error = None, None
        try:
            image = decode_image(raw_image, root=root)
        except Exception as e:  # noqa: BLE001  (any decoder failure is a per-sample failure)
            error = f"image decode failed: {type(e).__name__}: {e}"
        for r in records:
            yield Sample(sample_id=r.sample_id, image=image, prompt=r.prompt, references=r.references,
                         choices=r.choices, task=spec.task, error=error, meta=r.meta)


def load_hf(*, spec: HFDatasetSpec, split: str, num_samples: Optional[int], path: Optional[str]) -> list[Sample]:
    """The first ``num_samples`` samples (all where None) of one split, in the data's order."""
    if split not in spec.splits:
        raise ValueError(f"Dataset '{spec.name}' has no split '{split}'. Available: {', '.join(spec.splits)}")
    if num_samples is not None and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if num_samples == 0:
        return []
    rows, root = open_rows(spec=spec, split=split, path=path)
    where = f"'{path}'" if path is not None else f"hub '{spec.hub_id}'"
    samples: list[Sample] = []
    for sample in iter_samples(spec=spec, rows=rows, split=split, root=root, where=where):
        samples.append(sample)
        if num_samples is not None and len(samples) >= num_samples:
            break
    return samples


def _loader(spec: HFDatasetSpec) -> Callable[..., list[Sample]]:
    def load(*, split: str, num_samples: Optional[int] = None, seed: int = 0,
             path: Optional[str] = None) -> list[Sample]:
        return load_hf(spec=spec, split=split, num_samples=num_samples, path=path)

    return load


SPEC_BY_NAME: dict[str, HFDatasetSpec] = {s.name: s for s in SPECS}

for _spec in SPECS:
    register_dataset(DatasetEntry(name=_spec.name, task=_spec.task, metric=_spec.metric,
                                  splits=tuple(_spec.splits), load=_loader(_spec), hub_id=_spec.hub_id))


def hub_ids() -> dict[str, str]:
    """Dataset name -> the hub id (and config) it loads when no path is given."""
    return {s.name: s.hub_id + (f" ({s.config})" if s.config else "") for s in SPECS}


__all__: Sequence[str] = ("SPECS", "SPEC_BY_NAME", "HFDatasetSpec", "Record", "DatasetSchemaError",
                          "decode_image", "load_hf", "open_rows", "parse_options", "hub_ids")
