"""`personae report RUN_DIR`: one self-contained HTML page (inline CSS, base64 PNG plots) for a run folder.

A run folder is what `personae demo` writes (demo.json, world/, pretrain/, roleplay/, meta/) or a single
training run (metrics.jsonl, config.json, eval/). Every section is always present; a stage that has not
run says so instead of failing, so the report can be written at any point of a demo.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from personae.data.images import IMAGE_FORMATS
from personae.data.kinds import open_data
from personae.eval import plots
from personae.eval.plots import Curve
from personae.files import write_text_atomic

STAGE_ORDER = ("pretrain", "roleplay", "meta", "multitask")
SECTIONS = {"training": "Training curves", "retrieval": "Retrieval", "roleplay": "Role-play",
            "grounding": "What the image is worth", "adaptation": "Adaptation", "ablation": "Ablation", "gallery": "Gallery of test scenes",
            "config": "Configuration and environment"}
SPLIT_NAMES = {"train": "seen", "heldout": "held-out"}
SHORT = {"response_accuracy": "accuracy", "image_text_relevance": "relevance", "relevance_precision": "precision",
         "relevance_recall": "recall", "instruction_adherence": "adherence", "persona_consistency": "persona",
         "knowledge_consistency": "knowledge"}
GALLERY_PER_SPLIT = 4  # dialogues shown per character split
THUMBNAIL = 320  # larger scene images are shrunk to this side before embedding
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
main{max-width:1160px;margin:0 auto;padding:24px}
h1{margin:0 0 4px}h2{border-bottom:2px solid #d5d9e0;padding-bottom:4px;margin-top:36px}
nav a{margin-right:14px;color:#3b5bb5;text-decoration:none}
section{background:#fff;border-radius:8px;padding:4px 20px 16px;margin:18px 0;box-shadow:0 1px 3px #0001}
table{border-collapse:collapse;margin:10px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e7;padding:4px 8px;text-align:right}th{background:#eef1f5}
td:first-child,th:first-child,.l{text-align:left}
img.plot{max-width:100%;display:block;margin:10px 0}
.muted{color:#6b7280}.missing{color:#8a6d00;background:#fff7d6;padding:6px 10px;border-radius:6px}
.scene{display:flex;gap:18px;border-top:1px solid #e3e6eb;padding:14px 0}
.scene img{width:192px;height:192px;image-rendering:pixelated;border-radius:6px;flex:none;object-fit:contain}
.turns{flex:1}.turn{margin-bottom:12px}.who{font-weight:600}
.reply{border-left:4px solid #9aa3b2;padding:2px 8px;margin:3px 0}
.reply.good{border-color:#2e9d4f}.reply.bad{border-color:#d23f3f}
.reference{color:#4b5563;font-style:italic}
.badge{display:inline-block;border-radius:10px;padding:0 8px;margin:2px 3px 0 0;font-size:12px;color:#fff}
.b-good{background:#2e9d4f}.b-bad{background:#d23f3f}.b-mid{background:#d08a1a}.b-na{background:#a0a7b4}
pre{background:#f2f4f7;padding:10px;overflow:auto;max-height:420px;font-size:12px}
"""


@dataclass
class StageRun:
    """One training stage of a run folder: its metrics log, config and evaluation results."""

    name: str
    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    evals: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunData:
    """Everything the report reads from a run folder, loaded once."""

    root: Path
    stages: list[StageRun]
    demo: dict[str, Any]
    world: Path | None
    ablation: dict[str, Any] | None = None

    def eval_result(self, name: str) -> tuple[StageRun, Any] | None:
        """The first stage (in stage order) holding eval/<name>.json, with its content."""
        for stage in self.stages:
            if name in stage.evals:
                return stage, stage.evals[name]
        return None


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file when it is malformed."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); a bad row names the file and line."""
    rows = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error})") from error
    return rows


def _load_stage(name: str, path: Path) -> StageRun:
    stage = StageRun(name, path)
    if (path / "metrics.jsonl").is_file():
        stage.metrics = read_jsonl(path / "metrics.jsonl")
    if (path / "config.json").is_file():
        stage.config = read_json(path / "config.json")
    for result in sorted((path / "eval").glob("*.json")):
        stage.evals[result.stem] = read_json(result)
    return stage


def _is_stage(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("metrics.jsonl", "config.json", "eval"))


def load_run(run_dir: Path) -> RunData:
    """Find the stages of a run folder (demo layout, or the folder itself as one stage)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder not found: {root}")
    if _is_stage(root) and not (root / "demo.json").is_file():
        stages = [_load_stage(root.name, root)]
    else:
        folders = sorted((p for p in root.iterdir() if p.name != "world" and _is_stage(p)),
                         key=lambda p: (STAGE_ORDER.index(p.name) if p.name in STAGE_ORDER else len(STAGE_ORDER),
                                        p.name))
        stages = [_load_stage(p.name, p) for p in folders]
    demo = read_json(root / "demo.json") if (root / "demo.json").is_file() else {}
    world = root / "world" if (root / "world" / "dialogues.jsonl").is_file() else None
    ablation = read_json(root / "ablation.json") if (root / "ablation.json").is_file() else None
    return RunData(root, stages, demo, world, ablation)


# ---- small HTML helpers ------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _heat(value: Any) -> str:
    """A pale red-to-green background for a score in [0, 1], so a table reads at a glance."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        return ""
    return f' style="background:hsl({int(120 * value)},60%,90%)"'


def _table(header: list[str], rows: Iterable[list[str]], header_rows: str = "") -> str:
    head = header_rows or "<tr>" + "".join(f"<th>{cell}</th>" for cell in header) + "</tr>"
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><thead>{head}</thead><tbody>{body}</tbody></table>"


def _td(value: Any, heat: bool = False) -> str:
    return f"<td{_heat(value) if heat else ''}>{_fmt(value)}</td>"


def _img(uri: str | None, alt: str) -> str:
    return f'<img class="plot" alt="{escape(alt)}" src="{uri}">' if uri else ""


def _missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{escape(SECTIONS[key])}</h2>{body}</section>'


# ---- sections ------------------------------------------------------------------------------------------------


def training_section(run: RunData) -> str:
    """One figure per stage: its losses and accuracies against step."""
    parts = []
    for stage in run.stages:
        uri = plots.training_curves(stage.name, stage.metrics) if stage.metrics else None
        if uri:
            last = stage.metrics[-1]
            parts.append(f"<h3>{escape(stage.name)}</h3><p class='muted'>{len(stage.metrics)} logged rows, last step "
                         f"{_fmt(last.get('step'))}</p>{_img(uri, f'{stage.name} training curves')}")
    return _section("training", "".join(parts) or _missing("not run: no stage has a metrics.jsonl yet."))


def retrieval_section(run: RunData) -> str:
    """Recall@K both ways next to chance, and the ITM / MLM accuracies, with a bar chart."""
    found = run.eval_result("retrieval")
    if found is None:
        return _section("retrieval", _missing("not run: no eval/retrieval.json."))
    stage, result = found
    rows = [[f"<td>R@{k}</td>", _td(result.get(f"i2t_r@{k}"), True), _td(result.get(f"t2i_r@{k}"), True),
             _td(result.get(f"chance_r@{k}"))] for k in (1, 5, 10) if f"i2t_r@{k}" in result]
    table = _table(["recall", "image &rarr; text", "text &rarr; image", "chance"], rows)
    extra = _table(["figure", "value"], [[f"<td>{escape(k)}</td>", _td(result.get(k), k.endswith('acc'))]
                                         for k in ("pairs", "unique_captions", "itm_acc", "mlm_acc") if k in result])
    note = f"<p class='muted'>{escape(stage.name)} model, test split.</p>"
    return _section("retrieval", note + table + extra + _img(plots.retrieval_bars(result), "retrieval recall"))


# the fields of a scored reply row (eval.roleplay.score_rows, adaptation samples) that are not metrics
ROW_FIELDS = frozenset({"dialogue", "turn", "type", "character", "character_split", "user", "reference", "reply",
                        "k", "steps"})


def _metric_names(blocks: Iterable[Mapping[str, Any]]) -> list[str]:
    """The metrics of the data kind's scorer, in its order, read from the result's rows or means."""
    return list(dict.fromkeys(key for block in blocks for key in block if key not in ROW_FIELDS and key != "n"))


def _roleplay_table(metrics: Mapping[str, Any]) -> str:
    splits = [s for s in ("train", "heldout") if s in metrics] + [s for s in metrics if s not in SPLIT_NAMES]
    names = [m for m in _metric_names(metrics[s]["overall"] for s in splits)
             if any(metrics[s]["overall"].get(m) is not None for s in splits)]
    head = (f"<tr><th rowspan=2>question type</th><th colspan={len(splits)}>turns</th>"
            + "".join(f"<th colspan={len(splits)}>{escape(SHORT.get(m, m))}</th>" for m in names) + "</tr><tr>"
            + "".join(f"<th>{escape(SPLIT_NAMES.get(s, s))}</th>" for _ in range(len(names) + 1) for s in splits)
            + "</tr>")
    types = ["overall"] + list(dict.fromkeys(t for s in splits for t in metrics[s].get("by_type", {})))
    rows = []
    for qtype in types:
        blocks = [metrics[s]["overall"] if qtype == "overall" else metrics[s].get("by_type", {}).get(qtype, {})
                  for s in splits]
        label = f"<td><b>{qtype}</b></td>" if qtype == "overall" else f"<td>{escape(qtype)}</td>"
        rows.append([label] + [_td(b.get("n")) for b in blocks]
                    + [_td(b.get(m), True) for m in names for b in blocks])
    return _table([], rows, head)


def roleplay_section(run: RunData) -> str:
    """Every exact metric per question type, seen vs held-out characters, plus fluency."""
    found = run.eval_result("roleplay")
    if found is None or not found[1].get("metrics"):
        return _section("roleplay", _missing("not run: no eval/roleplay.json."))
    stage, result = found
    metrics = result["metrics"]
    note = (f"<p class='muted'>{escape(stage.name)} model on the {escape(str(result.get('split', 'test')))} split: "
            f"{_fmt(result.get('conversations'))} conversations, {_fmt(result.get('turns'))} turns. Seen = "
            "characters trained on; held-out = characters never seen in training. &ndash; = not applicable.</p>")
    fluency = result.get("fluency_perplexity") or {}
    fluency_table = _table(["fluency (reference perplexity, lower is better)", "value"],
                           [[f"<td>{escape(SPLIT_NAMES.get(s, s))}</td>", _td(v)] for s, v in fluency.items()])
    overall = {SPLIT_NAMES.get(s, s): block["overall"] for s, block in metrics.items()}
    return _section("roleplay", note + _roleplay_table(metrics) + fluency_table
                    + _img(plots.split_bars(_metric_names(overall.values()), overall), "role-play metrics, seen vs held-out"))


def _grounding_rows(loss: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [("all tokens", loss["all"]), *loss.get("by_kind", {}).items(),
            *((f"type: {qtype}", row) for qtype, row in loss["by_type"].items())]


def grounding_section(run: RunData) -> str:
    """Reply-token loss with the true / shuffled / blank image per token kind and question type; prefix attention."""
    found = run.eval_result("grounding")
    if found is None:
        return _section("grounding", _missing("not run: no eval/grounding.json (personae eval grounding RUN)."))
    stage, result = found
    note = (f"<p class='muted'>{escape(stage.name)} model, {_fmt(result.get('conversations'))} "
            f"{escape(str(result.get('split', 'test')))} conversations scored teacher-forced with their own image, "
            "another scene's and a blank one. Where the true image's loss is no lower than the others', the reply "
            "does not use the image for that kind of word.</p>")
    rows = [[f"<td>{escape(name)}</td>", _td(row["n"]), *(_td(row[image]) for image in ("true", "shuffled", "blank")),
             *(_td(row[image] - row["true"] if row["n"] else None) for image in ("shuffled", "blank"))]
            for name, row in _grounding_rows(result["loss"])]
    losses = _table(["reply tokens (loss in nats)", "n", "true", "shuffled", "blank", "shuffled &minus; true",
                     "blank &minus; true"], rows)
    attention = []
    for name, row in result["attention"].items():
        heads = [mass for layer in (row.get("mass") or []) for mass in layer]
        attention.append([f"<td>{escape(name)}</td>", _td(row["n"]), _td(sum(heads) / len(heads) if heads else None),
                          _td(max(heads) if heads else None), _td(row.get("uniform"))])
    prefix = result.get("prefix_positions")
    return _section("grounding", note + losses + _table(
        [f"attention on the {_fmt(prefix)} image positions (true image)", "answer tokens", "mean over heads",
         "top head", "uniform"], attention))


def find_curves(data: Any, path: tuple[str, ...] = (), steps: list[float] | None = None) -> list[Curve]:
    """Every curve in an adaptation result: a list of numbers as long as the nearest enclosing `steps`."""
    if isinstance(data, Mapping):
        own = data.get("steps")
        if isinstance(own, list) and own and all(plots.is_number(x) for x in own):
            steps = [float(x) for x in own]
        curves = []
        for key, value in data.items():
            if key == "steps":
                continue
            if steps and isinstance(value, list) and len(value) == len(steps) and value \
                    and all(v is None or plots.is_number(v) for v in value) and any(plots.is_number(v) for v in value):
                label = ", ".join(p for p in path if p not in ("curves", "results"))
                curves.append(Curve(label, str(key), steps, list(value)))
            else:
                curves += find_curves(value, path + (str(key),), steps)
        return curves
    if isinstance(data, list):
        return [c for i, item in enumerate(data) for c in find_curves(item, path + (_item_label(item, i),), steps)]
    return []


def _item_label(item: Any, index: int) -> str:
    if isinstance(item, Mapping):
        named = [f"{k}={item[k]}" if k in ("k", "shots") else str(item[k])
                 for k in ("method", "name", "model", "k", "shots", "character") if isinstance(item.get(k), (str, int))]
        if named:
            return " ".join(named)
    return str(index)


def _curve_table(curves: list[Curve]) -> str:
    rows = []
    for curve in curves:
        points = [(s, v) for s, v in zip(curve.steps, curve.values) if v is not None]
        if points:
            rows.append([f"<td>{escape(curve.label or '-')}</td>", f"<td>{escape(curve.metric)}</td>",
                         _td(points[0][1]), _td(points[-1][1]), f"<td>{points[-1][0]:g}</td>"])
    return _table(["curve", "metric", "before (first step)", "after (last step)", "last step"], rows)


def adaptation_section(run: RunData) -> str:
    """Metrics on held-out characters against adaptation steps, per method and k; PNGs a stage saved too."""
    found = run.eval_result("adaptation")
    saved = [p for stage in run.stages for p in sorted((stage.path / "eval").glob("adaptation*.png"))]
    if found is None and not saved:
        return _section("adaptation", _missing("not run: no eval/adaptation.json (meta-training has not run)."))
    body = ""
    if found is not None:
        curves = find_curves(found[1])
        body = (_img(plots.curve_panels(curves), "adaptation curves") + _curve_table(curves) if curves
                else _missing("eval/adaptation.json holds no curves (no `steps` list with values beside it)."))
    for png in saved:
        body += _img(_image_uri(png), png.name)
    return _section("adaptation", body)


def ablation_section(run: RunData) -> str:
    """The ablation table (mean ± standard deviation over seeds) when the folder holds ablation.json."""
    found = run.ablation
    if not found:
        return _section("ablation", _missing("not run: no ablation.json here (`personae ablate --out DIR`, then "
                                             "`personae report DIR`)."))
    columns = found["columns"]
    rows = []
    for entry in found["table"]:
        cells = [f"<td>{escape(entry['group'])}</td>", f"<td class='l' title='{escape(entry['description'])}'>"
                 f"{escape(entry['variant'])}</td>"]
        for key in columns:
            stats = entry.get(key)
            digits = 0 if "seconds" in key else 2 if ("loss" in key or "perplexity" in key) else 3
            cells.append("<td>-</td>" if stats is None else
                         f"<td style='white-space:nowrap'>{_fmt(stats['mean'], digits)} "
                         f"<span class='muted'>± {_fmt(stats['std'], digits)}</span></td>")
        rows.append(cells)
    budget = found.get("budget", {})
    note = (f"<p class='muted'>Budget {escape(str(budget.get('name')))}, seeds {escape(str(found.get('seeds')))}; "
            "mean ± standard deviation over seeds; every variant of a group trains for the same steps.</p>")
    return _section("ablation", note + _table(["group", "variant", *columns.values()], rows))


def _image_uri(path: Path) -> str | None:
    """A base64 data URI of an image file, shrunk first when it is large; None if it cannot be read."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if len(data) > 200_000 or path.suffix.lower() != ".png":
        from PIL import Image

        with Image.open(path, formats=list(IMAGE_FORMATS)) as image:  # only the formats personae reads
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _dialogue_images(world: Path | None, ids: set[str]) -> dict[str, Path]:
    """Image path of each wanted dialogue, read from world/dialogues.jsonl (stops once all are found)."""
    if world is None or not ids:
        return {}
    found: dict[str, Path] = {}
    with open(world / "dialogues.jsonl") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                if row.get("id") in ids and row.get("image"):
                    found[row["id"]] = world / row["image"]
                    if len(found) == len(ids):
                        break
    return found


def _badge(metric: str, value: Any) -> str:
    if value is None:
        kind, text = "na", "n/a"
    else:
        kind = "good" if value >= 0.999 else "bad" if value <= 0.001 else "mid"
        text = {"good": "&#10003;", "bad": "&#10007;", "mid": f"{value:.2f}"}[kind]
    return f'<span class="badge b-{kind}" title="{escape(metric)}">{escape(SHORT.get(metric, metric))} {text}</span>'


def _turn_html(sample: Mapping[str, Any]) -> str:
    accuracy = sample.get("response_accuracy")
    verdict = "" if accuracy is None else " good" if accuracy >= 0.999 else " bad"
    badges = "".join(_badge(m, sample.get(m)) for m in _metric_names([sample]))
    return (f'<div class="turn"><div><span class="who">user</span> <span class="muted">'
            f'({escape(str(sample.get("type") or "?"))})</span>: {escape(str(sample.get("user", "")))}</div>'
            f'<div class="reply{verdict}"><span class="who">{escape(str(sample.get("character", "")))}</span>: '
            f'{escape(str(sample.get("reply", "")))}</div>'
            f'<div class="reference">reference: {escape(str(sample.get("reference", "")))}</div>{badges}</div>')


def _gallery_dialogues(samples: list[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The first few dialogues of each character split, each with its scored turns in order."""
    dialogues: dict[str, list[Mapping[str, Any]]] = {}
    per_split: dict[str, int] = {}
    for sample in samples:
        key, split = str(sample.get("dialogue")), str(sample.get("character_split"))
        if key not in dialogues:
            if per_split.get(split, 0) >= GALLERY_PER_SPLIT:
                continue
            per_split[split] = per_split.get(split, 0) + 1
            dialogues[key] = []
        dialogues[key].append(sample)
    return dialogues


def gallery_section(run: RunData) -> str:
    """Test scenes with each character's replies beside the image, scored per metric, reference shown."""
    found = run.eval_result("roleplay")
    samples = list(found[1].get("samples") or []) if found else []
    if not samples:
        return _section("gallery", _missing("not run: no role-play samples in eval/roleplay.json."))
    dialogues = _gallery_dialogues(samples)
    images = _dialogue_images(run.world, set(dialogues))
    cards = []
    for key, turns in dialogues.items():
        uri = _image_uri(images[key]) if key in images else None
        picture = (f'<img alt="scene {escape(key)}" src="{uri}">' if uri
                   else '<div class="missing" style="width:192px">image not found</div>')
        split = SPLIT_NAMES.get(str(turns[0].get("character_split")), str(turns[0].get("character_split")))
        title = (f'<div class="muted">dialogue {escape(key)} &middot; {escape(str(turns[0].get("character")))} '
                 f'({escape(split)} character)</div>')
        cards.append(f'<div class="scene">{picture}<div class="turns">{title}'
                     f'{"".join(_turn_html(t) for t in turns)}</div></div>')
    legend = ("<p class='muted'>Green: correct (1); red: wrong (0); amber: partly right; grey: not applicable to "
              "this question. The reply's left bar follows response accuracy.</p>")
    return _section("gallery", legend + "".join(cards))


def environment_info() -> dict[str, Any]:
    """Versions, threads and device of this process: what a run can store to describe where it ran."""
    import torch

    from personae import __version__

    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"python": platform.python_version(), "torch": torch.__version__, "personae": __version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": device}


def _data_summary(data: Path | None) -> tuple[str, dict[str, Any]]:
    """The data kind's name and what it says about itself (nothing for a plain folder)."""
    if data is None:
        return "", {}
    kind = open_data(data)
    return kind.name.replace("-", " "), kind.summary()


def _key_value_table(title: str, values: Mapping[str, Any]) -> str:
    rows = [[f"<td>{escape(str(k))}</td>",
             f"<td class='l'>{escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}</td>"]
            for k, v in values.items()]
    return _table([], rows, f"<tr><th>{escape(title)}</th><th class='l'>value</th></tr>")


def config_section(run: RunData) -> str:
    """Wall time per stage, the environment, the world, and every stage's config.json."""
    recorded = run.demo.get("environment")
    environment = dict(recorded) if isinstance(recorded, Mapping) else environment_info()
    source = "recorded by the run" if isinstance(recorded, Mapping) else "of the process that wrote this report"
    seconds = run.demo.get("seconds") or {}
    timing = _missing("no wall times: demo.json is absent.")
    if seconds:
        timing = _table(["stage", "wall time (s)"],
                        [[f"<td>{escape(str(k))}</td>", f"<td>{_fmt(v, 1)}</td>"] for k, v in seconds.items()])
    parts = [f"<h3>Wall time per stage</h3>{timing}",
             f"<h3>Environment</h3><p class='muted'>Environment {source}.</p>"
             + _key_value_table("environment", environment)]
    name, summary = _data_summary(run.world)
    if summary:
        parts.append("<h3>World</h3>" + _key_value_table(name, summary))
    for stage in run.stages:
        if stage.config is not None:
            text = escape(json.dumps(stage.config, indent=2, sort_keys=False))
            parts.append(f"<h3>{escape(stage.name)}: config.json</h3><details><summary>show</summary>"
                         f"<pre>{text}</pre></details>")
    return _section("config", "".join(parts))


def render_report(run: RunData) -> str:
    """The whole page as one HTML string."""
    sections = [training_section(run), retrieval_section(run), roleplay_section(run), grounding_section(run),
                adaptation_section(run),
                ablation_section(run), gallery_section(run), config_section(run)]
    nav = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in SECTIONS.items())
    stages = ", ".join(stage.name for stage in run.stages) or "none"
    title = f"personae report: {run.root.name or run.root}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><main><h1>{escape(title)}</h1>"
            f"<p class='muted'>run folder {escape(str(run.root))} &middot; stages: {escape(stages)}</p>"
            f"<nav>{nav}</nav>{''.join(sections)}</main></body></html>\n")


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write RUN_DIR/report.html (or OUT) for a run folder and return its path."""
    run = load_run(Path(run_dir))
    target = Path(out) if out is not None else run.root / "report.html"
    return write_text_atomic(target, render_report(run))  # a browser never sees half a report


def report_command(run_dir: Path, out: Path | None = None) -> Path:
    """`personae report RUN_DIR`: write the report and print where it is."""
    path = write_report(run_dir, out)
    print(f"report: {path.resolve()}  ({path.stat().st_size / 1024:.0f} KiB)", file=sys.stdout)
    return path


__all__ = ["SECTIONS", "RunData", "StageRun", "environment_info", "find_curves", "load_run", "render_report",
           "report_command", "write_report"]
