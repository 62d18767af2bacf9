"""One self-contained HTML report over run folders (and combined-analysis folders).

Per folder: the run's identity, the per-configuration summary table, every figure of its
analysis (PNG embedded as base64 data URIs), the key numbers of every analysis JSON (long
per-sample lists are left out and counted), the frozen spec and env.json. The page loads no
external resource, so it opens offline. A run folder without an analysis gets one first.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any, Sequence

# Per-sample lists that the report counts instead of printing.
BULKY_KEYS = ("results", "all_samples")
MAX_JSON_CHARS = 20_000
MAX_TABLE_ROWS = 60

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.6em} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em} h3{margin-top:1.4em}
table{border-collapse:collapse;font-size:12px;margin:8px 0} th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3} pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:11px;max-height:480px}
figure{margin:12px 0} img{max-width:100%;height:auto;border:1px solid #eee} figcaption{font-size:12px;color:#555}
.meta{color:#555;font-size:13px} .scroll{overflow-x:auto} td{text-align:left}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def image_tag(path: Path, *, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def key_numbers(obj: Any) -> tuple[Any, dict[str, int]]:
    """The JSON without its per-sample lists, and how many entries each removed list had."""
    if not isinstance(obj, dict):
        return obj, {}
    removed = {k: len(obj[k]) for k in BULKY_KEYS if isinstance(obj.get(k), list)}
    return {k: v for k, v in obj.items() if k not in removed}, removed


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return "" if value is None else str(value)


def _records_table(records: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in records[:MAX_TABLE_ROWS] for k in r))
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in records[:MAX_TABLE_ROWS])
    more = f"<p class='meta'>{len(records) - MAX_TABLE_ROWS} more rows in the file</p>" if len(records) > MAX_TABLE_ROWS else ""
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>{more}"


def key_tables(obj: Any, *, title: str = "") -> list[str]:
    """HTML tables of a JSON value: its scalar leaves as one key/value table (dotted keys), and
    every list of objects as its own table."""
    leaves: list[tuple[str, Any]] = []
    tables: list[str] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append(f"<h4>{esc(key or title)}</h4>{_records_table(value)}")
        else:
            leaves.append((key or title, value))

    walk(obj, "")
    out = []
    if leaves:
        rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_cell(v))}</td></tr>" for k, v in leaves)
        out.append(f"<div class='scroll'><table>{rows}</table></div>")
    return out + tables


def _json_section(path: Path, base: Path) -> str:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"<p>{esc(path.name)}: unreadable ({esc(exc)})</p>"
    kept, removed = key_numbers(obj)
    note = "".join(f" {esc(k)}: {n} entries (in the file)." for k, n in removed.items())
    text = json.dumps(kept, indent=2)
    if len(text) > MAX_JSON_CHARS:
        text = text[:MAX_JSON_CHARS] + f"\n... ({len(text) - MAX_JSON_CHARS} more characters in the file)"
    return (f"<h4>{esc(path.relative_to(base))}</h4><p class='meta'>{note}</p>" + "".join(key_tables(kept))
            + f"<details><summary>JSON without per-sample lists</summary><pre>{esc(text)}</pre></details>")


def _summary_table(run_dir: Path) -> str:
    from flexvlm_ray.analysis.summary import summary_table
    from flexvlm_ray.store.reader import load_frame

    rows = load_frame(run_dir)
    table = summary_table(rows)
    failed = int((rows["status"] != "ok").sum()) if len(rows) else 0
    head = f"<p class='meta'>{len(rows)} rows, {failed} failed.</p>"
    if table.empty:
        return head + "<p>no successful rows</p>"
    return head + "<div class='scroll'>" + table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0,
                                                         na_rep="") + "</div>"


def folder_section(folder: Path, *, index: int) -> str:
    """The report section of one run folder (or a combined-analysis folder)."""
    manifest_path = folder / "manifest.json"
    parts = []
    if manifest_path.is_file():
        from flexvlm_ray.analysis.registry import AnalysisError, analyze_run

        manifest = json.loads(manifest_path.read_text())
        analysis_dir = folder / "analysis"
        problem = None
        if not any(analysis_dir.glob("**/*.png")):
            try:
                analyze_run(folder)
            except AnalysisError as exc:  # the page still shows the rows, spec and env
                problem = str(exc)
        title = f"{manifest.get('sweep')} / {manifest.get('run_id')}"
        parts.append(f"<h2 id='run{index}'>{esc(title)}</h2>")
        if problem:
            parts.append(f"<p class='meta'><b>{esc(problem)}</b></p>")
        parts.append(f"<p class='meta'>experiment <b>{esc(manifest.get('experiment'))}</b>, status "
                     f"{esc(manifest.get('status'))}, {len(manifest.get('unit_ids', []))} work units, "
                     f"folder <code>{esc(folder)}</code></p>")
        parts.append("<h3>Summary per configuration (median stage times in ms)</h3>")
        parts.append(_summary_table(folder))
    else:
        analysis_dir = folder
        parts.append(f"<h2 id='run{index}'>{esc(folder.name)} (combined analysis)</h2>")
        parts.append(f"<p class='meta'>folder <code>{esc(folder)}</code></p>")
    figures = sorted(analysis_dir.glob("**/*.png"))
    if figures:
        parts.append("<h3>Figures</h3>")
        parts += [f"<figure>{image_tag(p, alt=p.stem)}<figcaption>{esc(p.relative_to(analysis_dir))}"
                  f"</figcaption></figure>" for p in figures]
    jsons = sorted(analysis_dir.glob("**/*.json"))
    if jsons:
        parts.append("<h3>Key numbers</h3>")
        parts += [_json_section(p, analysis_dir) for p in jsons]
    for name, label in (("spec.yaml", "Frozen spec"), ("env.json", "Environment (env.json)")):
        path = folder / name
        if path.is_file():
            parts.append(f"<h3>{label}</h3><pre>{esc(path.read_text())}</pre>")
    return "\n".join(parts)


def build_report(folders: Sequence[str | Path], *, out: str | Path) -> Path:
    """Write the HTML report of ``folders`` to ``out``; returns its path."""
    folders = [Path(f) for f in folders]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        if not (folder / "manifest.json").is_file() and not any(folder.glob("*.json")) \
                and not any(folder.glob("*.png")):
            raise ValueError(f"{folder} is not a run folder (no manifest.json) nor a combined-analysis folder "
                             f"(no JSON or PNG written by `analyze --combine`)")
    toc = "".join(f"<li><a href='#run{i}'>{esc(f)}</a></li>" for i, f in enumerate(folders))
    sections = "\n".join(folder_section(f, index=i) for i, f in enumerate(folders))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>flexvlm-ray report</title><style>{CSS}</style></head><body>"
            f"<h1>flexvlm-ray report</h1><p class='meta'>written {esc(stamp)}</p><ul>{toc}</ul>"
            f"{sections}</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
