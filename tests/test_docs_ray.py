"""docs/ray.md shows its Ray Data, Ray Serve and Ray job snippets from files that tests run (test_ray_data,
test_ray_serve_run, test_ray_job_example): each ``<!-- snippet: PATH -->`` block must be PATH verbatim, and every
file under examples/snippets must be shown, so the page cannot drift from what is tested. Also the page's claim
that Ray Serve LLM's own builder needs vLLM or SGLang."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "ray.md")
SNIPPET = re.compile(r"<!-- snippet: (\S+) -->\n```[a-z]*\n(.*?)\n```", re.S)


def _snippets() -> dict[str, str]:
    with open(DOC) as f:
        found = SNIPPET.findall(f.read())
    paths = [p for p, _ in found]
    assert len(paths) == len(set(paths)), f"a snippet is shown twice: {paths}"
    return dict(found)


def test_every_snippet_is_its_file_verbatim():
    shown = _snippets()
    for path, body in shown.items():
        with open(os.path.join(ROOT, path)) as f:
            assert body == f.read().rstrip("\n"), f"docs/ray.md's copy of {path} differs from the file"
    files = {f"examples/snippets/{n}" for n in os.listdir(os.path.join(ROOT, "examples", "snippets"))}
    assert files | {"examples/batch_ray_data.py"} == set(shown), "a snippet file is not shown in docs/ray.md"


def test_a_changed_snippet_is_caught(tmp_path):
    """The pattern really pairs each marker with its block (a doc edit that breaks it would pass vacuously)."""
    text = "<!-- snippet: a.py -->\n```python\nprint(1)\n```\ntext\n<!-- snippet: b.sh -->\n```bash\nls\n```\n"
    assert dict(SNIPPET.findall(text)) == {"a.py": "print(1)", "b.sh": "ls"}


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("vllm", "sglang")), reason="vLLM or SGLang installed")
def test_ray_serve_llm_needs_vllm_or_sglang():
    pytest.importorskip("ray.serve")
    with pytest.raises(ImportError, match="vLLM"):
        from ray.serve.llm import build_openai_app  # noqa: F401
