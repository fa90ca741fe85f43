"""check: the pass/fail table, JUnit XML, the Markdown step summary."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from batchprobe.results import CheckRun
from batchprobe.units import format_bytes, format_count


def _metric_value(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name == "peak_bytes":
        return format_bytes(value)
    if name == "max_batch_size":
        return f"{value:g}"
    return f"{format_count(value)}/s"


def check_table(run: CheckRun) -> Table:
    table = Table(title="Checks", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("check", "source", "expected", "measured", "result", "detail"):
        table.add_column(name, no_wrap=name != "detail", overflow="fold")
    for o in run.outcomes:
        d = o.to_dict()
        sign = "≥" if o.expectation.minimum else "≤"
        table.add_row(
            d["name"],
            d["source"],
            f"{sign} {_metric_value(o.expectation.name, o.threshold)}",
            _metric_value(o.expectation.name, o.measured),
            Text("pass", style="green") if o.passed else Text("FAIL", style="bold red"),
            Text(o.detail, style="dim"),
        )
    table.caption = f"tolerance {run.outcomes[0].tolerance:.0%} included" if run.outcomes else None
    table.caption_justify = "left"
    return table


def junit_xml(run: CheckRun, source: str) -> str:
    """JUnit XML: one test case per check, for CI systems that render test reports."""
    from xml.etree import ElementTree as ET

    failures = sum(not o.passed for o in run.outcomes)
    suite = ET.Element(
        "testsuite",
        name="batchprobe check",
        tests=str(len(run.outcomes)),
        failures=str(failures),
        errors="0",
        time=f"{run.seconds:.3f}",
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("model", source),
        ("device", run.device.device),
        ("device_name", run.device.name),
        ("torch_version", run.device.torch_version),
    ):
        ET.SubElement(props, "property", name=key, value=str(value))
    for o in run.outcomes:
        d = o.to_dict()
        case = ET.SubElement(
            suite, "testcase", classname="batchprobe.check", name=d["name"], time="0"
        )
        message = (
            f"{d['name']}: expected {d['comparison']} {_metric_value(o.expectation.name, o.threshold)}, "
            f"measured {_metric_value(o.expectation.name, o.measured)}"
        )
        if not o.passed:
            failure = ET.SubElement(case, "failure", message=message, type="regression")
            failure.text = o.detail
        else:
            ET.SubElement(case, "system-out").text = f"{message}. {o.detail}"
    root = ET.Element("testsuites", tests=str(len(run.outcomes)), failures=str(failures))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def check_markdown(run: CheckRun, source: str) -> str:
    """A Markdown summary (for $GITHUB_STEP_SUMMARY)."""
    verdict = "✅ passed" if run.passed else "❌ failed"
    lines = [
        f"### batchprobe check: {verdict}",
        "",
        f"`{source}` on {run.device.device} ({run.device.name}), torch {run.device.torch_version}",
        "",
        "| check | expected | measured | result |",
        "|---|---|---|---|",
    ]
    for o in run.outcomes:
        d = o.to_dict()
        sign = "≥" if o.expectation.minimum else "≤"
        lines.append(
            f"| {d['name']} | {sign} {_metric_value(o.expectation.name, o.threshold)} | "
            f"{_metric_value(o.expectation.name, o.measured)} | {'pass' if o.passed else '**FAIL**'} |"
        )
    return "\n".join(lines) + "\n"
