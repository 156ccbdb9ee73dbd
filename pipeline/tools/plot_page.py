"""The HTML template of ``make plots``: DVC's page with Vega bundled, so it renders offline.

``dvc plots show`` loads vega, vega-lite and vega-embed from a CDN and writes a page
without a character set, which browsers then read as Windows-1252 (Vega's "…" shows as
"â€¦"). ``make plots`` installs the three packages from npm into ``.tools/`` and runs
this module to inline them into ``.dvc/plots/page.html`` (UTF-8, no ``{scripts}``
placeholder, so no CDN tags), then passes the result to ``dvc plots show
--html-template``. The rendered ``dvc_plots/index.html`` is self-contained.

    python -m pipeline.tools.plot_page --node-modules .tools/node_modules --out .tools/plots.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import ROOT
from pipeline.errors import PipelineError, run_stage

SKELETON = ROOT / ".dvc/plots/page.html"
MARKER = "<!-- vega scripts"
SCRIPTS = (  # load order matters: vega-lite and vega-embed need vega
    "vega/build/vega.min.js",
    "vega-lite/build/vega-lite.min.js",
    "vega-embed/build/vega-embed.min.js",
)


def build_page(skeleton: str, scripts: list[str]) -> str:
    """``skeleton`` with ``scripts`` inlined in place of its ``<!-- vega scripts ... -->``
    line; DVC fills ``{plot_divs}`` (required) and ``{refresh_tag}`` later."""
    if "{plot_divs}" not in skeleton:
        raise PipelineError("plot page: the skeleton has no {plot_divs} placeholder")
    lines = skeleton.splitlines(keepends=True)
    where = [i for i, line in enumerate(lines) if line.strip().startswith(MARKER)]
    if len(where) != 1:
        raise PipelineError(f"plot page: expected one '{MARKER} ...' line in the skeleton")
    safe = [source.replace("</script", "<\\/script") for source in scripts]
    tags = "".join(f"<script>\n{source}\n</script>\n" for source in safe)
    lines[where[0]] = tags
    return "".join(lines)


def read_scripts(node_modules: Path) -> list[str]:
    """The minified builds of vega, vega-lite and vega-embed, in load order."""
    missing = [name for name in SCRIPTS if not (node_modules / name).is_file()]
    if missing:
        raise PipelineError(
            f"{node_modules}: missing {', '.join(missing)} (run `make plots`, which installs "
            "them with npm)"
        )
    return [(node_modules / name).read_text(encoding="utf-8") for name in SCRIPTS]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node-modules", type=Path, default=ROOT / ".tools/node_modules")
    parser.add_argument("--skeleton", type=Path, default=SKELETON)
    parser.add_argument("--out", type=Path, default=ROOT / ".tools/plots.html")
    args = parser.parse_args(argv)
    page = build_page(args.skeleton.read_text(encoding="utf-8"), read_scripts(args.node_modules))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(args.out)
    print(f"plot page: {args.out} ({len(page) // 1024} KiB, vega inlined)")


if __name__ == "__main__":
    run_stage(main)
