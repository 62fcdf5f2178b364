"""MkDocs hook: publish the repository files the docs link to from outside docs/.

The pages link to measurement reports and examples by their repository paths
(`../benchmarks/reports/peers_cpu2_202611.md`, `../examples/moefy_gpt2.py`), so the same links
work on a Git host and on the site. This hook adds those files to the build, published under
their repository paths; `mkdocs build --strict` then checks every such link like any other, so a
report that moves or disappears fails the build.
"""

from __future__ import annotations

import os
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

# Repository folders (relative to mkdocs.yml) whose files the docs link to.
FOLDERS = {"benchmarks/reports": "*.md", "examples": "*.py"}


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).parent
    for folder, pattern in FOLDERS.items():
        for path in sorted((root / folder).glob(pattern)):
            rel = path.relative_to(root).as_posix()  # benchmarks/reports/x.md: where it is served
            dest = rel
            if path.suffix == ".md":  # a page: x.md -> x/index.html, as for docs/ pages
                stem = rel.removesuffix(".md")
                dest = f"{stem}/index.html" if config.use_directory_urls else f"{stem}.html"
            # Its source path relative to docs/ (../benchmarks/...), which is what the links say.
            src = Path(os.path.relpath(path, config.docs_dir)).as_posix()
            # NOT_IN_NAV: built and linkable, and not excluded as a dot path ("../").
            shown = InclusionLevel.NOT_IN_NAV
            urls = config.use_directory_urls
            files.append(
                File(src, config.docs_dir, config.site_dir, urls, dest_uri=dest, inclusion=shown)
            )
    return files
