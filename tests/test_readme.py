"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README lost its Python example"
    source = blocks[0].replace("/tmp/kvtier-readme", str(tmp_path / "disk"))
    namespace: dict = {}
    exec(compile(source, "README.md", "exec"), namespace)
    assert namespace["hit"].tokens == 768
    assert namespace["got"].tokens == 768 and tuple(namespace["got"].kv.shape) == (30, 2, 3, 768, 64)
