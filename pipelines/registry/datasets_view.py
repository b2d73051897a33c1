"""`vaepipe datasets`: the operator's view of generated datasets, read back from their MLflow lineage runs
(pipelines/registry/lineage.py) in every experiment of a tracking store: one row per dataset with its date,
model version, rows, location and headline usefulness number. Not here: writing or logging anything.
"""
from __future__ import annotations

import datetime
from typing import Any

from pipelines.registry import lineage
from pipelines.registry.tracking import check_reachable, connect

COLUMNS = (("date", "DATE"), ("model", "MODEL"), ("rows", "ROWS"), ("usefulness", "USEFULNESS"),
           ("status", "STATUS"), ("location", "LOCATION"), ("run_id", "RUN"))


def list_datasets(tracking_uri: str, model_name: str | None = None) -> list[dict[str, Any]]:
    """Every generation run in the store (of `model_name` only, when given), newest first."""
    check_reachable(tracking_uri)
    client = connect(tracking_uri, must_exist=True)
    experiments = [e.experiment_id for e in client.search_experiments()]
    rows: list[dict[str, Any]] = []
    token = None
    while experiments:
        page = client.search_runs(experiments, f"tags.`{lineage.KIND_TAG}` = '{lineage.GENERATION_KIND}'",
                                  order_by=["attributes.start_time DESC"], max_results=500, page_token=token)
        rows.extend(_row(run) for run in page)
        token = page.token
        if not token:
            break
    if model_name is not None:
        rows = [r for r in rows if r["model_name"] == model_name]
    return rows


def _row(run) -> dict[str, Any]:
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    best = lineage.headline(metrics)
    reliable = tags.get(lineage.RELIABLE_TAG)
    name, version = tags.get(lineage.MODEL_NAME_TAG, ""), tags.get(lineage.MODEL_VERSION_TAG, "")
    started = datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.timezone.utc)
    return {
        "date": tags.get(lineage.DATE_TAG) or started.date().isoformat(),
        "model": f"{name} v{version}" if version else f"{params.get('model_dir') or params.get('model_uri', '?')} (unregistered)",
        "model_name": name or None,
        "model_version": version or None,
        "model_uri": params.get("model_uri"),
        "rows": int(metrics["rows"]) if "rows" in metrics else None,
        "location": tags.get(lineage.OUT_TAG),
        "manifest_sha256": tags.get(lineage.MANIFEST_TAG),
        "seed": int(params["seed"]) if params.get("seed") else None,
        "headline_metric": best[0] if best else None,
        "headline_value": best[1] if best else None,
        "reliable": None if reliable is None else reliable == "true",
        "usefulness": _usefulness(best, reliable),
        "status": run.info.status,
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "resumed": int(tags.get(lineage.RESUMED_TAG, "0")),
    }


def _usefulness(best: tuple[str, float] | None, reliable: str | None) -> str:
    if best is None:
        return "-" if reliable is None else "none"
    text = f"{best[0]} {best[1]:.3f}"
    return text + " UNRELIABLE" if reliable == "false" else text


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned columns for a terminal; the run id is the key to everything else (mlflow ui, --json)."""
    if not rows:
        return "no generated datasets recorded in this tracking store"
    cells = [[str(row[key]) if row[key] is not None else "-" for key, _ in COLUMNS] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(COLUMNS)]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(COLUMNS, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
    return "\n".join(lines)
