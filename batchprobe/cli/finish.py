"""What each command prints and writes once its flow is done, and the exit code that follows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from batchprobe.cli.output import Out
from batchprobe.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOTHING_FITS,
    Problem,
    SpecError,
)
from batchprobe.report import check as check_view
from batchprobe.report import estimate as estimate_view
from batchprobe.report import find_max as find_max_view
from batchprobe.report import json as contract
from batchprobe.report import noise as noise_view
from batchprobe.report import plan as plan_view
from batchprobe.report import plots
from batchprobe.report.peak import peak_view
from batchprobe.results import CheckRun, EstimateRun, FindMaxResult, PlanRun
from batchprobe.spec import Spec


def exit_after_search(out: Out, result: FindMaxResult) -> None:
    """Exit codes after a search: 2 on a model error, 130 interrupted, 4 nothing fits."""
    error = result.error
    if error is not None and error.failure is not None:
        out.err.print(
            Text(
                f"The model failed at batch {error.batch_size} with an error that is not about "
                f"memory; fix the model or spec:\n",
                style="bold red",
            )
        )
        out.err.print(  # as Python prints it: long lines are not broken (paths stay whole)
            error.failure.traceback or error.failure.message,
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_BAD_INPUT)
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if result.max_batch_size is None:
        raise typer.Exit(EXIT_NOTHING_FITS)


def find_max(
    out: Out,
    spec: Spec,
    result: FindMaxResult,
    output: Path | None,
    top: int,
    plot_file: Path | None,
) -> None:
    source = spec.model.source
    out.result(contract.find_max_json(result, source, top), output)
    out.human.print(find_max_view.find_max_summary(result, source))
    size = "seq_len" if result.axis == "seq_len" else "batch"
    if result.explained is not None:
        out.human.print(peak_view(result.explained, top, size))
    if plot_file is not None and result.timeline and not out.quiet:
        title = f"batchprobe find-max: {source}, traced steps at {size} {result.max_batch_size}"
        out.write(plot_file, plots.timeline_plot(result.timeline, title))
    exit_after_search(out, result)


def estimate(
    out: Out,
    spec: Spec,
    run: EstimateRun,
    output: Path | None,
    top: int,
    plot_file: Path | None,
) -> None:
    source = spec.model.source
    out.result(contract.estimate_json(run, source, top), output)
    if plot_file is not None and not out.quiet:
        if run.sweep:
            title = f"batchprobe estimate: {source} on {run.target}"
            out.write(plot_file, plots.sweep_plot(run.sweep, title))
        elif run.timeline:
            best = run.result.max_batch_size if run.result else None
            title = f"batchprobe estimate: {source}, traced steps at batch {best}"
            out.write(plot_file, plots.timeline_plot(run.timeline, title))
    if run.result is not None:
        out.human.print(estimate_view.estimate_table(run))
    out.human.print(estimate_view.estimate_summary(run, source))
    if run.explained is not None:
        out.human.print(peak_view(run.explained, top))
    if run.what_if is not None:
        out.human.print(estimate_view.what_if_table(run.what_if))
    if run.sweep is not None:
        out.human.print(estimate_view.sweep_chart(run.sweep))
    if run.fallback is not None:
        exit_after_search(out, run.fallback)
    elif run.result is not None and run.result.max_batch_size is None:
        raise typer.Exit(EXIT_NOTHING_FITS)


def plan(
    out: Out,
    spec: Spec,
    run: PlanRun,
    output: Path | None,
    csv_file: Path | None,
    markdown_file: Path | None,
    plot_file: Path | None,
    top: int,
) -> None:
    source = spec.model.source
    out.result(contract.plan_json(run, source, top), output)
    plan = run.plan
    if plan is not None:
        out.write(csv_file, plan_view.plan_csv(plan))
        out.write(markdown_file, plan_view.plan_markdown(plan, run, source))
        if plot_file is not None and not out.quiet:
            out.write(plot_file, plan_view.plan_plot(plan, source))
    out.human.print(find_max_view.find_max_summary(run.find_max, source))
    if plan is not None and plan.rows:
        out.human.print(
            plan_view.plan_table(
                plan, width=out.human.width, threads=run.find_max.device.details.get("threads")
            )
        )
        out.human.print(plan_view.plan_chart(plan))
        out.human.print(plan_view.recommendation_panel(plan))
    if run.explained is not None:
        out.human.print(peak_view(run.explained, top))
    if run.what_if is not None:
        out.human.print(estimate_view.what_if_table(run.what_if))
    if run.noise is not None:
        target = plan.recommended.global_batch_size if plan and plan.recommended else None
        out.human.print(noise_view.noise_panel(run.noise, source, target))
    for warning in [*run.warnings, *(plan.warnings if plan else ())]:
        out.warn(warning)
    fm = run.find_max
    if fm.error is not None or fm.max_batch_size is None:
        exit_after_search(out, fm)
    if run.interrupted:
        timed = plan is not None and plan.rows
        out.human.print(
            Text(
                "Interrupted: the rows above are what was timed so far."
                if timed
                else "Interrupted before any micro-batch was timed.",
                style="yellow",
            )
        )
        raise typer.Exit(EXIT_INTERRUPTED)


def read_baseline(path: Path) -> dict[str, Any]:
    try:
        base = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError([Problem("--baseline", f"cannot read {path}: {exc}")]) from None
    if not isinstance(base, dict) or base.get("command") != "check-baseline":
        raise SpecError(
            [Problem("--baseline", f"{path} is not a baseline written by check --update-baseline")]
        )
    return base


def check(
    out: Out,
    spec: Spec,
    run: CheckRun,
    output: Path | None,
    junit: Path | None,
    update_baseline: Path | None,
) -> None:
    source = spec.model.source
    out.result(contract.check_json(run, source), output)
    out.write(junit, check_view.junit_xml(run, source))
    if update_baseline is not None and run.baseline is not None and not run.interrupted:
        out.write(update_baseline, contract.to_json(run.baseline), "baseline ")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and not out.quiet:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(check_view.check_markdown(run, source))
    if run.outcomes:
        out.human.print(check_view.check_table(run))
    verdict = "all checks passed" if run.passed else "a check FAILED"
    out.human.print(Text(verdict, style="bold green" if run.passed else "bold red"))
    if run.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not run.passed:
        raise typer.Exit(EXIT_CHECK_FAILED)
