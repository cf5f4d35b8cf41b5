"""Size and load time of a sweep's report.html (sweep/report.py), for a generated large sweep and real ones.

    python -m bench.report_size                                  # a generated 500-trial sweep, 30 epochs
    python -m bench.report_size --trials 500 --epochs 50 --sweep results/ham-report --out report-size.json

Generates a sweep folder of ``--trials`` trials without training (tests/synthetic_sweep.py: optuna.db,
trials.csv, every trial's metrics.csv; complete, stopped early, failed and running trials and
confirmation runs), writes its page with ``python -m sweep.report``'s code, and prints, for it and
for each ``--sweep`` folder given: the time to write the page, its size (plotly.js and each section),
and its load time in headless Chromium (median of ``--repeats``): the page's own clock when its last
script ran (``performance.now()``: parsing, plotly.js and drawing every figure) and the browser
process's wall time, from which an empty page's is subtracted (Chromium's start and exit); and what
each figure adds to the drawing time (a page of plotly.js and that figure alone).
Without Chromium (tests/browser.py finds it) only the sizes and write times are measured.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from core.io import atomic
from core import filenames
from core.errors import UserError, run_cli
from sweep.report import REPORT_FILE, read_sweep
from sweep.report import render as render_page
from tests.browser import find_chromium, render
from tests.synthetic_sweep import SweepShape, make_sweep


def measure(folder: Path, repeats: int, browser: str | None) -> dict[str, Any]:
    started = time.perf_counter()
    sweep = read_sweep(folder)
    read_s = time.perf_counter() - started
    page = render_page(sweep)
    atomic.write_text(folder / REPORT_FILE, page)
    write_s = time.perf_counter() - started
    result: dict[str, Any] = {"folder": str(folder), "trials": int(len(sweep.trials)), "read_s": read_s,
                              "write_s": write_s, "bytes": len(page.encode("utf-8")), "parts": parts(page)}
    if browser:
        runs = [render(folder / REPORT_FILE, browser=browser, budget_ms=None) for _ in range(repeats)]
        bad = [p.div_id for p in runs[0].plots if not p.drawn]
        result.update(rendered_ms=statistics.median(r.rendered_ms or float("nan") for r in runs),
                      browser_wall_s=statistics.median(r.wall_s for r in runs), figures=len(runs[0].plots),
                      figures_not_drawn=bad, page_errors=runs[0].errors,
                      figure_ms=figure_costs(page, repeats, browser))
    return result


def figure_costs(page: str, repeats: int, browser: str) -> dict[str, float]:
    """Milliseconds each figure adds to the page's drawing: a page of plotly.js and that figure alone, in
    Chromium, against a page of plotly.js alone (medians of ``repeats``)."""
    head = page[:page.index("<body>")]
    stamp = '<script>document.body.setAttribute("data-rendered-ms", String(Math.round(performance.now())));</script>'
    figures = dict(re.findall(r'(<div style="height:[^"]*">\s*<div id="fig-(\w+)".*?</script>\s*</div>)', page,
                              flags=re.S))
    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        def drawn_ms(body: str) -> float:
            path = Path(tmp) / "figure.html"
            path.write_text(f"{head}<body><main>{body}</main>{stamp}</body></html>", encoding="utf-8")
            return statistics.median(render(path, browser=browser, budget_ms=None).rendered_ms for _ in range(repeats))

        alone = drawn_ms("")
        costs["plotly.js alone"] = alone
        for block, key in figures.items():
            costs[key] = drawn_ms(block) - alone
    return costs


def parts(page: str) -> dict[str, int]:
    """Bytes of plotly.js and of each <section> (figure data, tables, the final model's images)."""
    from plotly.offline import get_plotlyjs

    sizes = {"plotly.js": len(get_plotlyjs().encode("utf-8"))}
    for match in re.finditer(r'<section id="([^"]+)">(.*?)</section>', page, flags=re.S):
        sizes[match.group(1)] = len(match.group(2).encode("utf-8"))
    return sizes


def empty_page_wall_s(repeats: int, browser: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "empty.html"
        page.write_text("<!DOCTYPE html><html><body>empty</body></html>\n", encoding="utf-8")
        return statistics.median(render(page, browser=browser, budget_ms=None).wall_s for _ in range(repeats))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report_size", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--trials", type=int, default=500, help="trials of the generated sweep (default 500)")
    parser.add_argument("--epochs", type=int, default=30, help="its epochs per trial (default 30)")
    parser.add_argument("--sweep", action="append", default=[], metavar="DIR",
                        help="also measure this sweep folder (its report.html is rewritten); repeatable")
    parser.add_argument("--repeats", type=int, default=3, help="browser loads per page; the median is given")
    parser.add_argument("--keep", metavar="DIR", help="write the generated sweep here (default: a temporary folder)")
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args(argv)
    for folder in args.sweep:
        if not (Path(folder) / filenames.SWEEP_SETTINGS).is_file():
            raise UserError(f"--sweep {folder}: not a sweep folder (no sweep.json)")
    browser = find_chromium()
    if browser is None:
        print("no chromium on PATH: sizes only (apt-get install chromium)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="report-size-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        generated = root / f"generated-{args.trials}"
        if generated.exists():
            raise UserError(f"{generated} exists; give another --keep folder")
        started = time.perf_counter()
        make_sweep(generated, SweepShape(trials=args.trials, epochs=args.epochs, failed=max(1, args.trials // 50),
                                         running=max(1, args.trials // 100), confirm=6))
        generate_s = time.perf_counter() - started
        results = [measure(generated, args.repeats, browser)] + [measure(Path(f), args.repeats, browser)
                                                                   for f in args.sweep]
    baseline = empty_page_wall_s(args.repeats, browser) if browser else None
    doc = {"command": "python -m bench.report_size " + " ".join(argv if argv is not None else sys.argv[1:]),
           "generated": {"trials": args.trials, "epochs": args.epochs, "generate_s": generate_s},
           "browser": browser, "empty_page_wall_s": baseline, "pages": results}
    print(table(doc))
    if args.out:
        atomic.write_json(args.out, doc)
    return 0


def table(doc: dict[str, Any]) -> str:
    baseline = doc["empty_page_wall_s"]
    lines = ["| page | trials | write s | size MB | plotly.js MB | figures + tables MB | drawn in page, ms | "
             "browser wall s (minus empty page) | figures drawn | page errors |", "|" + " --- |" * 10]
    for r in doc["pages"]:
        name = Path(r["folder"]).name
        other = (r["bytes"] - r["parts"]["plotly.js"]) / 1e6
        if "rendered_ms" in r:
            wall = f"{r['browser_wall_s']:.2f} ({r['browser_wall_s'] - baseline:.2f})"
            drawn = f"{r['figures'] - len(r['figures_not_drawn'])} of {r['figures']}"
            browser = [f"{r['rendered_ms']:.0f}", wall, drawn, r["page_errors"] or "none"]
        else:
            browser = ["-", "-", "-", "-"]
        lines.append(f"| {name} | {r['trials']} | {r['write_s']:.1f} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['parts']['plotly.js'] / 1e6:.2f} | {other:.2f} | " + " | ".join(browser) + " |")
    lines.append("")
    lines.append("bytes per section: " + "; ".join(
        f"{Path(r['folder']).name}: " + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in r["parts"].items())
        for r in doc["pages"]))
    for r in doc["pages"]:
        if "figure_ms" in r:
            lines.append(f"{Path(r['folder']).name}, drawing time, ms: " + ", ".join(
                f"{k} {v:.0f}" for k, v in r["figure_ms"].items()) + " (each figure alone, beyond plotly.js alone)")
    if baseline is not None:
        lines.append(f"empty page in the same browser: {baseline:.2f} s wall")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
