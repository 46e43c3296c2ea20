"""What a benchmark's MLflow experiment shows without a click: each method's parent run says which benchmark it
belongs to (dataset, model, train size, recipe, protocol, as tags) and its verdict against the reference in its
Description, the reference's parent carries one comparison figure, and the experiment carries a saved view (the runs
table with the headline columns, the chart view with the figure first) that ``regbench ui`` opens.

Every number comes from the leaderboard's own code: ``report.runs_frame`` and ``stats.compare`` (same reference,
same margin), formatted by ``regbench.cells`` and drawn by ``regbench.figures``. Nothing here trains or reads torch.

MLflow facts used (3.18's UI, read from its bundled JavaScript and checked in headless Chromium, reports/mlflow/):
an experiment tag ``mlflow.sharedViewState.<key>`` holding ``{"name", "createdAt", "updatedAt", "state"}`` is a saved
view, listed under *Views* and opened by the URL parameter ``viewStateShareKey=<key>``; ``state`` is the view's JSON,
optionally zlib-compressed and base64-encoded behind ``deflate;``. ``mlflow.experiment.primaryMetric.name`` names the
metric the chart view and its parallel-coordinates plot start from. ``mlflow.note.content`` is a run's Description.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import uuid
import zlib

HEADLINE = "test_acc"
VIEW_KEY = "regbench"  # the saved view's id: `viewStateShareKey=regbench` in a link opens it
VIEW_NAME = "regbench: methods at a glance"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
NOTE_TAG = "mlflow.note.content"
FIGURE_KEY = "comparison"  # the image key of the comparison figure (an "Image grid" chart in the chart view)
FIGURE_FILE = "comparison.png"  # the same figure as a plain artifact of every parent run
FIGURE_DIGEST_TAG = "regbench.comparison_sha256"
MAX_WIDTH = 780  # px: the description panel's width in a 1600-px window with MLflow's Assistant panel open
# The runs table's columns in the saved view, in order: the headline and Δ, the verdict sentence (Δ with its
# interval, Holm p, verdict, the accuracy over seeds), then Holm p, the headline's interval, the seeds and the dataset.
COLUMNS = ["metrics.`test_acc`", "metrics.`delta_test_acc`", "attributes.`Description`", "metrics.`p_holm_test_acc`",
           "metrics.`test_acc_ci_low`", "metrics.`test_acc_ci_high`", "tags.`n_seeds`", "attributes.`Dataset`"]
CHART_METRICS = ["test_acc", "delta_test_acc", "gap", "test_ece"]  # bar charts after the figure, in this order


def identity(spec: dict) -> dict[str, str]:
    """The tags every parent run of a benchmark carries: which benchmark, on what, trained how, compared how."""
    base = spec.get("base") or {}
    base = json.loads(base) if isinstance(base, str) else base
    proto = spec.get("protocol") or {}
    if base.get("train_size"):
        size = str(base["train_size"])
    elif base.get("train_per_class"):
        size = f"{base['train_per_class']} per class"
    else:
        size = "full"
    recipe = (f"{base.get('optimizer', '?')}, lr {base.get('lr', '?')}, {base.get('schedule', '?')} schedule, batch "
              f"{base.get('batch_size', '?')}, weight decay {base.get('weight_decay', 0)}"
              + (f", augment {base['augment']}" if base.get("augment") else ""))
    budget = " and ".join(x for x in (f"{proto['trials']} trials" if proto.get("trials") else "",
                                      f"{proto['budget_epochs']} epochs" if proto.get("budget_epochs") else "") if x)
    if budget:
        protocol = (f"tuned: {budget} of TPE per method on {proto.get('objective', 'val_acc')}"
                    + (" (lr and weight decay tuned too)" if proto.get("tune_shared") else "")
                    + f", best rerun over {len(spec.get('seeds', []))} seeds")
    else:
        protocol = f"no tuning: defaults, {len(spec.get('seeds', []))} seeds"
    tags = {"benchmark": spec.get("benchmark", ""), "dataset": spec.get("dataset", ""), "model": spec.get("model", ""),
            "train_size": size, "epochs": str(spec.get("epochs", "")),
            "seeds": ",".join(str(s) for s in spec.get("seeds", [])), "recipe": recipe, "protocol": protocol,
            "trials": str(proto.get("trials") or 0), "budget_epochs": str(proto.get("budget_epochs") or "none"),
            "tune_shared": str(bool(proto.get("tune_shared"))), "objective": str(proto.get("objective", "val_acc"))}
    if spec.get("shift"):
        tags["shift"] = str(spec["shift"])
    return tags


def note(method: str, mine, row, reference: str) -> str:
    """A method's Description: its Δ to the reference with the interval, Holm p and verdict of ``stats.compare``
    (the leaderboard's row), then its own test accuracy over seeds. ``mine``: its runs (a runs_frame slice);
    ``row``: its row of the comparison table, None when the reference has no runs."""
    from regbench import cells, stats

    n = len(mine)
    own = f"test acc {cells.mean_cell(mine.test_acc, 100)} % over {n} seed{'s' if n != 1 else ''}"
    if n < stats.MIN_SEEDS:
        own += f" (no interval below {stats.MIN_SEEDS} seeds)"
    if method == reference:
        if "degenerate" in mine and len(mine) and mine.degenerate.astype(bool).all():
            return f"collapsed in every run: no comparison against it means anything; {own}"
        return f"the reference: every other method's Δ is against it; {own}"
    if row is None:
        return f"no {reference} runs yet, so no comparison; {own}"
    if row.delta is None:
        return f"{row.verdict}: {row.note or 'no Δ'}; {own}"
    # The verdict first: the runs table's Description column shows the first ~55 characters.
    text = f"{row.verdict}: {row.delta * 100:+.2f} pp vs {reference}"
    if row.delta_ci_low is not None:
        text += f" [{row.delta_ci_low * 100:+.2f}, {row.delta_ci_high * 100:+.2f}]"
    if row.p_holm is not None:
        text += f", Holm p = {cells.p_text(row.p_holm)}"
    else:
        text += f" (no interval or test: {min(n, row.n or n)} seeds where {stats.MIN_SEEDS} are needed)"
    return f"{text}; {own}"


def comparison_png(df, table, reference: str, margin_pp: float) -> bytes:
    """The two leaderboard figures a comparison needs, stacked into one PNG: every method's test accuracy per seed
    with its mean and 95 % interval (error bar), above the paired Δ to the reference per seed with its mean and
    interval. Drawn by ``regbench.figures`` exactly as the leaderboard draws them; byte-identical on a redraw."""
    import numpy as np

    jitter = np.random.get_state()  # seaborn's strip-plot jitter draws from NumPy's global generator:
    np.random.seed(0)  # seeded here so a redraw from the same store is the same bytes (and is not logged again)
    try:
        return _stacked_png(df, table, reference, margin_pp)
    finally:
        np.random.set_state(jitter)


def _stacked_png(df, table, reference: str, margin_pp: float) -> bytes:
    import tempfile
    from pathlib import Path

    from PIL import Image

    from regbench import cells, degenerate, figures, report_figures

    with tempfile.TemporaryDirectory() as folder:
        rows = table.reset_index()
        runs = df[["method", "seed"]].assign(value=df.test_acc,
                                             degenerate=df.get("degenerate", "").astype(bool))
        paths = [figures.seed_points(runs, rows[["method", "mean", "ci_low", "ci_high"]], Path(folder) / "a.png",
                                     chance=degenerate.chance_level(df))]
        others = rows[rows.method != reference]
        if len(others):
            others = others.assign(label=[f"{r.method}  {cells.delta_text(r)}" for r in others.itertuples()])
            paths.append(figures.paired_differences(report_figures.paired_frame(df, reference), others, margin_pp,
                                                    Path(folder) / "b.png", reference=reference))
        images = [Image.open(p).convert("RGB") for p in paths]
        width = max(i.width for i in images)
        sheet = Image.new("RGB", (width, sum(i.height for i in images)), "white")
        y = 0
        for image in images:
            sheet.paste(image, ((width - image.width) // 2, y))
            y += image.height
        if sheet.width > MAX_WIDTH:  # the UI shows the experiment description's image unscaled: fit it, not crop it
            sheet = sheet.resize((MAX_WIDTH, round(sheet.height * MAX_WIDTH / sheet.width)), Image.LANCZOS)
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
    return buf.getvalue()


def view_state(now_ms: int) -> str:
    """The saved view's envelope: the runs table sorted by the headline with its columns, parents collapsed (one row
    per method), and the chart view opening on a section with the comparison figure and the headline bars."""
    def chart(kind: str, **fields) -> dict:
        return {"uuid": uuid.uuid5(uuid.NAMESPACE_URL, f"regbench/{kind}/{fields}").hex, "type": kind,
                "runsCountToCompare": 10, "metricSectionId": section, "deleted": False, "isGenerated": True, **fields}

    section = uuid.uuid5(uuid.NAMESPACE_URL, "regbench/at-a-glance").hex
    charts = [chart("IMAGE", imageKeys=[FIGURE_KEY], step=0, showRunParams=False, displayName=FIGURE_KEY)]
    charts += [chart("BAR", metricKey=key, displayName=key) for key in CHART_METRICS]
    # MLflow's own sort (newest first): sorting by a metric would list the seed runs among the parents, flat.
    state = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
             "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
             "selectedColumns": COLUMNS, "columnOrder": COLUMNS, "runsExpanded": {},
             "compareRunCharts": charts,
             "compareRunSections": [{"uuid": section, "name": "At a glance", "display": True, "isReordered": False,
                                     "deleted": False, "isGenerated": True}],
             "hideEmptyCharts": True}
    packed = "deflate;" + base64.b64encode(zlib.compress(json.dumps(state, sort_keys=True).encode())).decode()
    return json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": packed})


def view_unchanged(current: str | None, wanted: str) -> bool:
    """Whether the stored view already holds ``wanted``'s name and state (its timestamps aside)."""
    try:
        a, b = json.loads(current or "{}"), json.loads(wanted)
    except ValueError:
        return False
    return (a.get("name"), a.get("state")) == (b.get("name"), b.get("state"))


def apply(tracker, storage, benchmark: str, margin_pp: float = 0.5) -> None:
    """Give the experiment of ``tracker`` (a ``tracking.Tracker``) its at-a-glance state from the store: tags and
    Description on every parent run (also those another worker created), the comparison figure, the saved view and
    the primary metric. Writes only what changed, so a rerun that trains nothing writes nothing."""
    from mlflow.entities import RunTag

    from regbench import report, stats
    from regbench.store import load_spec

    spec = load_spec(storage, benchmark)
    if spec is None:
        return
    client, experiment = tracker.client, tracker.experiment_id
    parents = {r.data.tags["regbench.parent"]: r for r in client.search_runs(
        [experiment], filter_string="tags.`regbench.parent` != ''", max_results=1000)}
    if not parents:
        return
    df = report.runs_frame(storage, benchmark, spec)
    reference = report.REFERENCE
    table = None
    if not df.empty:
        from regbench import degenerate

        df["degenerate"] = degenerate.flags(df)
        if reference in set(df.method):
            table = stats.compare(df, HEADLINE, reference=reference, margin=margin_pp / 100).set_index("method")
        degenerate.override_verdicts(table, df, reference)  # the leaderboard's verdicts, word for word
    tags = identity(spec)
    for method, run in parents.items():
        mine = df[df.method == method] if not df.empty else df
        wanted = dict(tags)
        if len(mine):
            row = table.loc[method] if table is not None and method in table.index else None
            wanted[NOTE_TAG] = note(method, mine, row, reference)
            wanted["n_seeds"] = str(len(mine))
        else:
            wanted[NOTE_TAG] = "no finished runs yet"
        changed = [RunTag(k, v[:5000]) for k, v in wanted.items() if run.data.tags.get(k) != v[:5000]]
        if changed:
            client.log_batch(run.info.run_id, tags=changed)
        config = mine.config.iloc[0] if len(mine) else json.loads(spec["base"]) if isinstance(spec.get("base"), str) \
            else (spec.get("base") or {})
        tracker.link_dataset(run.info.run_id, config, run)
    home = None
    if table is not None and len(table):
        home = _attach_figure(client, parents, df, table, reference, margin_pp)
    tags = client.get_experiment(experiment).tags
    about = description(spec, table, reference, home, margin_pp)
    if tags.get(NOTE_TAG) != about:
        client.set_experiment_tag(experiment, NOTE_TAG, about)
    if tags.get(PRIMARY_METRIC_TAG) != HEADLINE:
        client.set_experiment_tag(experiment, PRIMARY_METRIC_TAG, HEADLINE)
    view = view_state(int(time.time() * 1000))
    if not view_unchanged(tags.get(VIEW_TAG), view):
        client.set_experiment_tag(experiment, VIEW_TAG, view)


def _attach_figure(client, parents: dict, df, table, reference: str, margin_pp: float) -> None:
    """The comparison figure once per experiment where the chart view shows it (an image of the reference's parent
    under FIGURE_KEY: one "Image grid" card), and as ``comparison.png`` among every parent's artifacts. Logged again
    only when its bytes change (more seeds, another method)."""
    from PIL import Image

    png = comparison_png(df, table, reference, margin_pp)
    digest = hashlib.sha256(png).hexdigest()
    home = parents.get(reference) or next(iter(parents.values()))
    if home.data.tags.get(FIGURE_DIGEST_TAG) == digest:
        return home.info.run_id
    image = Image.open(io.BytesIO(png)).convert("RGB")
    client.log_image(home.info.run_id, image, key=FIGURE_KEY, step=0)
    for run in parents.values():
        client.log_image(run.info.run_id, image, artifact_file=FIGURE_FILE)
    client.set_tag(home.info.run_id, FIGURE_DIGEST_TAG, digest)
    return home.info.run_id


def headline(spec: dict, table, reference: str) -> str:
    """Two paragraphs: each method's Δ to the reference and verdict (short: the UI shows the first line of a
    collapsed description), then which benchmark, with the Holm-adjusted p-values."""
    tags = identity(spec)
    about = (f"{tags['dataset']} / {tags['model']}, train size {tags['train_size']}, {tags['epochs']} epochs, "
             f"{tags['protocol']}.")
    if table is None:
        return f"**{tags['benchmark']}**: no {reference} runs yet, so no comparison.\n\n{about}"
    from regbench import cells

    parts, ps = [], []
    for method, row in table.iterrows():
        if method == reference or row.delta is None:
            continue
        parts.append(f"{method} {row.delta * 100:+.2f} pp ({row.verdict})")
        ps.append(f"{method} {cells.p_text(row.p_holm)}")
    first = f"**{tags['benchmark']}**, test accuracy vs {reference}: " + ", ".join(parts) if parts else \
        f"**{tags['benchmark']}**: no method to compare with {reference} yet"
    return first + f"\n\n{about}" + (f" Holm-adjusted p: {', '.join(ps)}." if ps else "")


def description(spec: dict, table, reference: str, figure_run: str | None, margin_pp: float) -> str:
    """The experiment's Description (shown above its runs, first line visible): the headline line, then the
    comparison figure, served by the MLflow UI from the reference's parent run."""
    text = headline(spec, table, reference)
    if figure_run:
        text += (f"\n\n![comparison figure](get-artifact?path={FIGURE_FILE}&run_uuid={figure_run})\n\n"
                 f"*Top: test accuracy per seed (dots), mean (bar) and 95 % t-interval (whisker) per method. Bottom: "
                 f"the difference to {reference} per seed (paired by seed), its mean (◆) and 95 % interval; shaded: "
                 f"the ±{margin_pp:g} pp equivalence margin. The leaderboard's numbers (leaderboard.md).*")
    return text + ("\n\nWritten by regbench from its store at each mirror (an edit here is overwritten); each "
                   "method's verdict is its run's Description.")
