"""Strip outputs from the notebooks so they are committed clean.

Usage::

    python notebooks/strip_outputs.py            # strip every notebooks/*.ipynb in place
    python notebooks/strip_outputs.py --check    # exit 1 (and list them) if any is not stripped
    python notebooks/strip_outputs.py a.ipynb    # only these files

Removes outputs and execution counts, per-cell metadata except ``tags``, and notebook metadata
except the kernel spec and the language name (so the files do not change with who ran them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent
KEPT_CELL_METADATA = ("tags",)


def strip_notebook(nb: nbformat.NotebookNode) -> bool:
    """Strip ``nb`` in place; return True if anything changed."""
    changed = False
    for cell in nb.cells:
        kept = {k: v for k, v in cell.get("metadata", {}).items() if k in KEPT_CELL_METADATA}
        if kept != cell.get("metadata", {}):
            cell["metadata"] = nbformat.NotebookNode(kept)
            changed = True
        if cell.cell_type == "code":
            if cell.get("outputs"):
                cell["outputs"] = []
                changed = True
            if cell.get("execution_count") is not None:
                cell["execution_count"] = None
                changed = True
    metadata = {}
    if "kernelspec" in nb.metadata:
        metadata["kernelspec"] = nb.metadata["kernelspec"]
    language = nb.metadata.get("language_info", {}).get("name")
    if language:
        metadata["language_info"] = {"name": language}
    if metadata != nb.metadata:
        nb.metadata = nbformat.NotebookNode(metadata)
        changed = True
    return changed


def is_stripped(path: str | Path) -> bool:
    """True if the notebook at ``path`` has nothing :func:`strip_notebook` would remove."""
    nb = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
    return not strip_notebook(nb)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "paths", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)"
    )
    parser.add_argument("--check", action="store_true", help="only report unstripped notebooks")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
        if strip_notebook(nb):
            dirty.append(path)
            if not args.check:
                nbformat.validate(nb)
                nbformat.write(nb, str(path))
    for path in dirty:
        print(f"{'not stripped' if args.check else 'stripped'}: {path}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
