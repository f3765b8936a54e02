"""README.md tells the truth about the tree: its layout names every module there is."""
import re

from helpers import ROOT


def test_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("## Measured here")]
    named = set(re.findall(r"[\w]+\.py", layout))
    modules = {p.name for folder in ("vae", "pipeline", "pipeline/serve") for p in (ROOT / folder).glob("*.py")
               if p.name != "__init__.py"}
    assert modules <= named, f"README's layout misses {sorted(modules - named)}"
    assert named - {"helpers.py", "conftest.py"} <= modules | {p.name for p in (ROOT / "benchmarks").glob("*.py")}
