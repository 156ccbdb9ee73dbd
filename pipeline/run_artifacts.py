"""A report as it renders in MLflow: Markdown, its figures and one HTML page, for a run's
artifacts (re-exported by :mod:`pipeline.tracking`)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from pipeline import paths


@contextlib.contextmanager
def report_bundle(
    markdown: str, figures: Mapping[str, Path], to_html: Callable[[str, Path], str]
) -> Iterator[tuple[Path, Path, Path]]:
    """A report as it renders in MLflow, in a temporary folder, for a run's artifacts.

    The folder holds ``report.md`` (``markdown``), the figures it links under
    ``figures/`` and ``report.html``, the same report as one page from
    ``to_html(markdown, folder)`` (MLflow's viewer shows no images in Markdown).

    Args:
        markdown: The report, linking its figures as ``figures/<path>``.
        figures: ``<path>`` under ``figures/`` -> the file or folder copied there.
        to_html: Renders the Markdown as a page, reading the figures it links from the
            folder given.

    Yields:
        The Markdown file, the HTML page and the figure folder; all are deleted after.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report_file, figure_dir = folder / paths.REPORT_MD.name, folder / paths.FIGURES.name
        report_file.write_text(markdown, encoding="utf-8")
        for name, source in figures.items():
            if source.is_dir():
                shutil.copytree(source, figure_dir / name)
            else:
                (figure_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, figure_dir / name)
        page = folder / "report.html"
        page.write_text(to_html(markdown, folder), encoding="utf-8")
        yield report_file, page, figure_dir
