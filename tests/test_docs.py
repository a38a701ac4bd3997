"""The documentation site builds with warnings as errors: a page left out of the navigation, a broken
link or anchor, or a docstring mkdocstrings cannot read fails the suite, so the docs cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# mkdocs build --strict (the site's configuration is mkdocs.yml, pages in docs/, API from the docstrings)
def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("ActivationClustering") > 5
