"""One self-contained HTML results page: the conditions table with its tests, the figures, a browser of the
value-vector lens (per layer, each vector's top tokens, concept sets highlighted, action-token share, token
search) and episode videos or frames.

Everything is inline (CSS, JS, images and videos as data URIs) and a Content-Security-Policy forbids any other
source, so the page opens offline, from a file, anywhere. Reports read results; they never run models.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .. import files
from ..errors import InputError
from ..rollout.stats import compare_conditions, episode_values, holm, paired, success_rates
from ..rollout.store import ResultsStore
from .html_assets import CSS, JS

CSP = ("default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")
#: summary fields that hold the episode mean of a step metric
_EPISODE_FIELD = {"action_disp": "mean_action_disp", "disp": "mean_disp", "dz": "mean_dz",
                  "action_dz": "mean_action_dz", "height": "mean_height"}
_MIME = {".png": "image/png", ".gif": "image/gif", ".mp4": "video/mp4", ".webm": "video/webm",
         ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def write_html_report(results: Any, out: str | os.PathLike | None = None, **options: Any) -> Path:
    """Write :func:`build_html_report`'s page atomically to ``out`` (default ``RESULTS/report.html``)."""
    store = results if isinstance(results, ResultsStore) else ResultsStore.open(results)
    out = Path(out) if out is not None else store.root / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"the report is an .html file, got {out.name}")
    return files.write_text(out, build_html_report(store, **options))


def build_html_report(results: Any, *, lens: Any = None, metric: str = "action_disp", reference: str = "baseline",
                      neurons: Iterable[Any] = (), k: int | None = None, max_media_mb: float = 25.0,
                      title: str | None = None) -> str:
    """The page's HTML text. ``lens``: a ValueVectorLens, its ``.npz`` file or an exported top-token table
    (``.parquet`` / ``.csv`` / ``.json``); ``neurons``: more sets to highlight (NeuronSets or ``FILE[#KEY]``)
    beside the steered ones; ``k``: top tokens shown per vector; ``max_media_mb``: budget of embedded videos."""
    store = results if isinstance(results, ResultsStore) else ResultsStore.open(results)
    store.check()
    manifest = store.manifest
    records = store.records()
    if isinstance(lens, (str, os.PathLike)) and Path(lens).suffix == ".npz":
        from ..lens import ValueVectorLens

        lens = ValueVectorLens.from_file(lens)
    lens_data = _lens_data(lens, k) if lens is not None else None
    d_mlp = lens_data["d_mlp"] if lens_data else None
    sets = _neuron_sets(manifest, neurons, d_mlp)
    rows, per_task, note = conditions_rows(store, metric, reference) if records else ([], [], "no episodes yet")
    title = title or f"nnsight-vla results: {store.root.name}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1>{_summary(store, manifest, records)}<nav>"
        + " ".join(f'<a href="#{a}">{t}</a>' for a, t in (("conditions", "conditions"), ("figures", "figures"),
                                                           ("neurons", "neuron browser"), ("episodes", "episodes")))
        + "</nav></header><main>",
        _conditions_section(rows, per_task, note, metric, reference, store),
        _figures_section(store, records, reference, lens),
        _neurons_section(lens_data, sets),
        _episodes_section(store, records, max_media_mb),
        "</main>",
        f'<script type="application/json" id="lens-data">{_json_script(lens_data)}</script>',
        f'<script type="application/json" id="sets-data">{_json_script(sets)}</script>',
        f"<script>{JS}</script></body></html>",
    ]
    return "\n".join(parts)


# -- the conditions table -----------------------------------------------------------------------------------------


def conditions_rows(store: ResultsStore, metric: str = "action_disp", reference: str = "baseline"
                    ) -> tuple[list[dict], list[dict], str]:
    """(one row per condition, per-task rows, a note). A row: the condition's kind / concept / alpha / layers,
    episodes and success rate, ``metric``'s episode-level mean, % change and Welch p against ``reference``, and
    the paired test over shared (task, trial) episodes (mean difference, paired t p, Wilcoxon p, d_z, Holm p)."""
    conds = store.manifest.get("conditions", {})
    success = {r["condition"]: r for r in success_rates(store) if r["task"] == "all"}
    note = ""
    try:
        compared = compare_conditions(store, metric, reference, level="episode")
    except InputError as error:
        compared, note = [], str(error)
    overall = {r["condition"]: r for r in compared if r["task"] == "all"}
    field = _EPISODE_FIELD.get(metric, metric)
    values = episode_values(store, field)
    tests: dict[str, dict] = {}
    if reference in values:
        for name in values:
            if name != reference:
                tests[name] = paired(values, name, reference)
    adjusted = holm({name: t["p"] for name, t in tests.items()})
    rows = []
    for name in sorted(success, key=lambda c: (c != reference, c)):
        c, s, o, t = conds.get(name, {}), success[name], overall.get(name, {}), tests.get(name, {})
        rows.append({
            "condition": name, "kind": c.get("kind"), "concept": c.get("concept"), "alpha": c.get("alpha"),
            "layers": c.get("layers"), "episodes": s["episodes"], "success_rate": s["success_rate"],
            "mean": o.get("mean", math.nan), "sem": o.get("sem", math.nan), "pct_change": o.get("pct_change", math.nan),
            "p_welch": o.get("p_value", math.nan), "pairs": t.get("n", 0), "mean_diff": t.get("mean_diff", math.nan),
            "p_paired": t.get("p", math.nan), "p_wilcoxon": t.get("p_wilcoxon", math.nan),
            "cohen_dz": t.get("cohen_dz", math.nan), "p_holm": adjusted.get(name, math.nan),
        })
    per_task = [r for r in compared if r["task"] != "all"]
    return rows, per_task, note


_COLUMNS = [("condition", "condition"), ("kind", "kind"), ("concept", "concept"), ("alpha", "α"),
            ("layers", "layers"), ("episodes", "episodes"), ("success_rate", "success"), ("mean", "mean"),
            ("sem", "± sem"), ("pct_change", "Δ% vs ref"), ("p_welch", "Welch p"), ("pairs", "pairs"),
            ("mean_diff", "paired Δ"), ("p_paired", "paired t p"), ("p_wilcoxon", "Wilcoxon p"),
            ("cohen_dz", "d_z"), ("p_holm", "Holm p")]


def _conditions_section(rows, per_task, note, metric, reference, store) -> str:
    head = "".join(f'<th data-key="{key}">{_e(label)}</th>' for key, label in _COLUMNS)
    body = []
    for row in rows:
        cells = "".join(f'<td data-key="{key}" data-value="{_e(_raw(row[key]))}">{_e(_fmt(row[key], key))}</td>'
                        for key, _ in _COLUMNS)
        cls = ' class="reference"' if row["condition"] == reference else ""
        body.append(f'<tr{cls} data-condition="{_e(row["condition"])}">{cells}</tr>')
    task_rows = "".join(
        f"<tr><td>{_e(r['task'])}</td><td>{_e(r['condition'])}</td><td>{r['n']}</td><td>{_fmt(r['mean'])}</td>"
        f"<td>{_fmt(r['sem'])}</td><td>{_fmt(r['pct_change'], 'pct_change')}</td><td>{_fmt(r['p_value'], 'p')}</td>"
        "</tr>" for r in per_task)
    field = _EPISODE_FIELD.get(metric, metric)
    return (
        f'<section id="conditions"><h2>Conditions</h2><p class="note">Metric: <b>{_e(metric)}</b>, one sample per '
        f"episode (its mean; summary field <code>{_e(field)}</code> for the paired test), against <b>"
        f"{_e(reference)}</b>. Welch: unpaired t-test over episodes; paired: episodes sharing task and trial (same "
        "seed and instruction), paired t-test, Wilcoxon signed-rank and Cohen's d_z; Holm: the paired p-values "
        f"adjusted over all conditions. {_e(note)}</p>"
        f'<div class="scroll"><table id="conditions-table" class="sortable"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(body) + "</tbody></table></div>"
        + (f'<details><summary>per task ({len(per_task)} rows)</summary><table id="per-task"><thead><tr><th>task</th>'
           "<th>condition</th><th>n</th><th>mean</th><th>± sem</th><th>Δ%</th><th>Welch p</th></tr></thead><tbody>"
           f"{task_rows}</tbody></table></details>" if per_task else "")
        + f"<p class=\"note\">Results folder: <code>{_e(store.root)}</code></p></section>"
    )


# -- figures, episodes ---------------------------------------------------------------------------------------------


def _figures_section(store, records, reference, lens) -> str:
    from .plots import plot_all

    images = []
    with tempfile.TemporaryDirectory(prefix="nnsight-vla-report-") as tmp:
        paths = plot_all(store, Path(tmp), reference=reference) if records else []
        if lens is not None and not isinstance(lens, (str, os.PathLike)) and getattr(lens, "has_action_tokens", 0):
            from .lens_plots import plot_action_share

            paths.append(plot_action_share(lens, Path(tmp) / "action_share.png"))
        for path in paths:
            images.append(f'<figure><img alt="{_e(Path(path).stem)}" src="{_data_uri(Path(path))}">'
                          f"<figcaption>{_e(Path(path).stem.replace('_', ' '))}</figcaption></figure>")
    body = "".join(images) or '<p class="note">No figures (no episodes).</p>'
    return f'<section id="figures"><h2>Figures</h2><div class="figures">{body}</div></section>'


def _episodes_section(store, records, max_media_mb: float) -> str:
    budget = int(max_media_mb * 2**20)
    chosen: dict[tuple, dict] = {}
    for record in sorted(records, key=lambda r: (str(r["task"]), r["condition"], int(r["trial"]))):
        if record.get("media"):
            chosen.setdefault((str(record["task"]), record["condition"]), record)
    cards, used, skipped = [], 0, 0
    for (task, condition), record in chosen.items():
        media = store.root / record["media"]
        html_media, size = _media_html(media)
        if not html_media or used + size > budget:
            skipped += 1
            continue
        used += size
        ok = "success" if record["summary"].get("success") else "failure"
        cards.append(f'<div class="episode" data-episode="{_e(record["episode_id"])}"><div class="media">'
                     f"{html_media}</div><p>task {_e(task)} · <b>{_e(condition)}</b> · trial {record['trial']} · "
                     f"{record['summary'].get('steps', '?')} steps · {ok}</p></div>")
    with_media = sum(1 for r in records if r.get("media"))
    note = (f"First trial of each task and condition: {len(cards)} shown of {with_media} episodes with media"
            + (f"; {skipped} left out (over the {max_media_mb:g} MB budget or unreadable)" if skipped else "") + ".")
    body = "".join(cards) if cards else '<p class="note">No episode media (run the sweep with --video).</p>'
    return (f'<section id="episodes"><h2>Episodes</h2><p class="note">{_e(note)}</p>'
            f'<div class="episodes">{body}</div></section>')


def _media_html(path: Path, max_frames: int = 24) -> tuple[str, int]:
    if path.is_dir():  # a folder of PNG frames: an evenly spaced subset, stepped through by a slider
        frames = sorted(path.glob("*.png"))
        if not frames:
            return "", 0
        picks = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))]
        uris = [_data_uri(p) for p in picks]
        imgs = "".join(f'<img class="frame{"" if i else " shown"}" alt="frame {i}" src="{u}">'
                       for i, u in enumerate(uris))
        slider = (f'<input type="range" class="scrub" min="0" max="{len(uris) - 1}" value="0" '
                  f'aria-label="frame">' if len(uris) > 1 else "")
        return f'<div class="frames">{imgs}</div>{slider}', sum(len(u) for u in uris)
    if path.suffix.lower() not in _MIME or not path.is_file():
        return "", 0
    uri = _data_uri(path)
    if path.suffix.lower() in (".mp4", ".webm"):
        return f'<video controls muted loop preload="metadata" src="{uri}"></video>', len(uri)
    return f'<img alt="{_e(path.stem)}" src="{uri}">', len(uri)


# -- the lens and the neuron sets ----------------------------------------------------------------------------------


def _lens_data(lens: Any, k: int | None) -> dict:
    """The lens as compact page data: each vector's top-k as indices into the page's own token list (uint16 or
    uint32, base64), the token strings, their normalised words and action flags, and the action share per layer."""
    from ..lens import ValueVectorLens, normalize_token

    if isinstance(lens, (str, os.PathLike)):
        if Path(lens).suffix != ".npz":
            return _table_lens_data(Path(lens), k)
        lens = ValueVectorLens.from_file(lens)
    if not isinstance(lens, ValueVectorLens):
        raise InputError(f"lens must be a ValueVectorLens, its .npz file or a top-token table, got {lens!r}")
    kk = lens.k if k is None else max(1, min(int(k), lens.k))
    ids = np.asarray(lens.ids[..., :kk])
    used, local = np.unique(ids, return_inverse=True)
    tokens = lens.token_strings(used)
    action = lens.action_mask()[used]
    chance = len(lens.action_ids) / lens.vocab_rows if lens.has_action_tokens else None
    return _pack_lens(local.reshape(ids.shape), tokens, [normalize_token(t) for t in tokens], action,
                      family=lens.family, stack=lens.stack, chance=chance, has_action=lens.has_action_tokens)


def _table_lens_data(path: Path, k: int | None) -> dict:
    import pandas as pd

    from ..lens import normalize_token

    suffix = path.suffix.lower()
    meta: dict = {}
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"nnsight_vla", b"{}"))
        frame = table.to_pandas()
    elif suffix == ".csv":
        frame = pd.read_csv(path, keep_default_na=False)
    elif suffix == ".json":
        data = json.loads(path.read_text())
        frame, meta = pd.DataFrame(data.get("rows", [])), data.get("meta", {})
    else:
        raise InputError(f"a lens is a .npz file or a top-token table (.parquet/.csv/.json), got {path.name}")
    need = {"layer", "neuron", "rank", "token"}
    if not need <= set(frame.columns):
        raise InputError(f"{path} is not a top-token table (needs columns {sorted(need)}; `nnsight-vla lens --out`)")
    if k is not None:
        frame = frame[frame["rank"] < int(k)]
    num_layers = int(meta.get("num_layers") or frame["layer"].max() + 1)
    d_mlp = int(meta.get("d_mlp") or frame["neuron"].max() + 1)
    kk = int(frame["rank"].max() + 1)
    tokens_col = frame["token"].astype(str).to_numpy()
    used, local = np.unique(tokens_col, return_inverse=True)
    grid = np.full((num_layers, d_mlp, kk), len(used), dtype=np.int64)  # the sentinel: no token
    grid[frame["layer"].to_numpy(), frame["neuron"].to_numpy(), frame["rank"].to_numpy()] = local
    has_action = "is_action" in frame.columns
    action = np.zeros(len(used), bool)
    if has_action:
        action[local[frame["is_action"].astype(bool).to_numpy()]] = True
    return _pack_lens(grid, list(used), [normalize_token(t) for t in used], action, family=meta.get("family", ""),
                      stack=meta.get("stack", "backbone"), chance=None, has_action=has_action)


def _pack_lens(grid: np.ndarray, tokens, words, action, *, family, stack, chance, has_action) -> dict:
    num_layers, d_mlp, k = grid.shape
    dtype = "u16" if len(tokens) < 0xFFFF else "u32"
    flat = grid.astype("<u2" if dtype == "u16" else "<u4").reshape(-1)
    action = np.asarray(action, bool)
    share, with_action = [], []
    for layer in range(num_layers):
        hits = np.append(action, False)[grid[layer]]
        share.append(float(hits.mean()) if has_action else None)
        with_action.append(float(hits.any(axis=1).mean()) if has_action else None)
    return {"family": family, "stack": stack, "num_layers": num_layers, "d_mlp": d_mlp, "k": k, "dtype": dtype,
            "ids": base64.b64encode(flat.tobytes()).decode("ascii"), "tokens": [str(t) for t in tokens],
            "words": [str(w) for w in words], "action": action.astype(int).tolist(), "chance": chance,
            "has_action": bool(has_action), "share": share, "vectors_with_action": with_action}


def _neuron_sets(manifest: Mapping, extra: Iterable[Any], d_mlp: int | None) -> list[dict]:
    """The steered sets of the results' conditions (concept or control, with the condition names that steer
    them) and the extra sets, each ``{name, kind, stack, pairs, conditions}``; identical sets listed once."""
    from ..neurons import NeuronSet

    found: dict[tuple, dict] = {}

    def add(neurons: NeuronSet, name: str, kind: str, condition: str | None) -> None:
        key = (name, neurons.stack, neurons.pairs)
        entry = found.setdefault(key, {"name": name, "kind": kind, "stack": neurons.stack,
                                       "pairs": [list(p) for p in neurons.pairs], "conditions": []})
        if condition:
            entry["conditions"].append(condition)

    for cname, cond in manifest.get("conditions", {}).items():
        for steering in _steerings(cond.get("steering")):
            try:
                neurons = NeuronSet.from_dict(steering["neurons"])
            except (InputError, KeyError, TypeError):
                continue
            name = cond.get("concept") or steering.get("name") or neurons.name or cname
            if cond.get("kind") == "control":
                add(neurons, name if name.startswith("random") else f"random[{name}]", "control", cname)
            else:
                add(neurons, name, "concept", cname)
    for item in extra:
        neurons = item if isinstance(item, NeuronSet) else NeuronSet.load(item, d_mlp=d_mlp)
        add(neurons, neurons.name or str(item), "extra", None)
    return list(found.values())


def _steerings(data: Any) -> list[Mapping]:
    if not isinstance(data, Mapping):
        return []
    if data.get("type") == "steering_group":
        return [m for member in data.get("members", []) for m in _steerings(member)]
    return [data] if "neurons" in data else []


def _neurons_section(lens_data: dict | None, sets: list[dict]) -> str:
    set_rows = "".join(
        f'<tr data-set="{i}"><td><button type="button" class="show-set" data-set="{i}">{_e(s["name"])}</button></td>'
        f'<td class="kind-{_e(s["kind"])}">{_e(s["kind"])}</td><td>{_e(s["stack"])}</td><td>{len(s["pairs"])}</td>'
        f'<td>{_e(", ".join(map(str, sorted({p[0] for p in s["pairs"]}))))}</td>'
        f'<td>{_e(", ".join(s["conditions"][:6]) + (" …" if len(s["conditions"]) > 6 else ""))}</td></tr>'
        for i, s in enumerate(sets))
    sets_html = (f'<h3>Neuron sets</h3><table id="sets"><thead><tr><th>set</th><th>kind</th><th>stack</th>'
                 f"<th>neurons</th><th>layers</th><th>conditions</th></tr></thead><tbody>{set_rows}</tbody></table>"
                 if sets else '<p class="note">No neuron sets (no steered condition).</p>')
    if lens_data is None:
        return (f'<section id="neurons"><h2>Neuron browser</h2><p class="note">No lens given: pass --lens with a '
                f"lens .npz or the table of `nnsight-vla lens --out`.</p>{sets_html}</section>")
    d = lens_data
    chance = f"; chance (action tokens' share of the vocabulary): {d['chance']:.3f}" if d["chance"] else ""
    return (
        f'<section id="neurons"><h2>Neuron browser</h2><p class="note">{_e(d["family"])} {_e(d["stack"])}: '
        f'{d["num_layers"]} layers × {d["d_mlp"]} value vectors, top {d["k"]} tokens each (lens projection '
        f"W_U · w_i); <span class=\"tok act\">action tokens</span> marked, neurons of a set "
        f'<span class="in-set-sample">highlighted</span>{_e(chance)}.</p>'
        '<div class="controls"><label>search tokens <input id="search" type="search" '
        'placeholder="e.g. up, fast" autocomplete="off"></label> <label><input id="substring" type="checkbox"> '
        'substring</label> <span id="search-count" class="note"></span></div>'
        '<div class="scroll"><table id="search-results" hidden><thead><tr><th>neuron</th><th>rank</th><th>sets</th>'
        "<th>top tokens</th></tr></thead><tbody></tbody></table></div>"
        f'<h3>Action-token share per layer</h3><div id="share"></div>{sets_html}'
        '<h3>Layers</h3><div class="controls"><label>layer <select id="layer"></select></label> '
        '<label><input id="only-sets" type="checkbox"> only neurons of a set</label> '
        '<label><input id="only-action" type="checkbox"> only vectors with an action token</label> '
        '<button id="prev" type="button">◀</button> <span id="page"></span> '
        '<button id="next" type="button">▶</button></div>'
        '<div class="scroll"><table id="neurons-table"><thead><tr><th>neuron</th><th>sets</th><th>top tokens</th>'
        "</tr></thead><tbody></tbody></table></div></section>"
    )


# -- helpers -------------------------------------------------------------------------------------------------------


def _summary(store, manifest: Mapping, records: Sequence[Mapping]) -> str:
    policy = manifest.get("config", {}).get("policy") or manifest.get("policy") or {}
    policy_text = policy.get("model_key") or policy.get("source") or policy.get("family") or policy.get("class") or ""
    tasks = sorted({str(r["task"]) for r in records}, key=lambda t: (len(t), t))
    return (f'<p class="note">{len(records)} episodes · {len(manifest.get("conditions", {}))} conditions · '
            f"{len(tasks)} task(s) · kind {_e(manifest.get('kind', '?'))} · policy {_e(policy_text)} · config "
            f"{_e(str(manifest.get('config_hash', ''))[:12])} · made {_e(time.strftime('%Y-%m-%d %H:%M'))}</p>")


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _json_script(data: Any) -> str:
    """JSON safe inside a <script> element (no '</' or '<!--' can close or confuse it)."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=_jsonable)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _raw(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return "" if value is None else str(value)


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if key == "success_rate":
            return f"{100 * value:.0f}%"
        if key == "pct_change":
            return f"{value:+.1f}%"
        if key.startswith("p"):
            return f"{value:.2e}" if 0 < value < 1e-3 else f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)
