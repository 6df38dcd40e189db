"""README.md's Python code blocks run as written: in order, in one namespace (each block
continues the one before it, as a reader would type them), in an empty folder."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str):
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_readme_has_the_blocks_this_test_runs():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4
    code = "\n".join(blocks)
    for call in ("sk.bsr_linear", "sk.bsr_conv2d", "sk.prune_and_regrow", "sd.sparsify", "sd.RigL",
                 "sd.save_pretrained", "sd.load_pretrained", "sd.densify"):
        assert call in code, call


def test_the_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for index, block in enumerate(python_blocks(README.read_text())):
        exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
    assert (tmp_path / "unet-dense" / "config.json").is_file()


def anchors(text: str):
    """GitHub's anchors of a Markdown file's headings."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [README] + sorted((README.parent / "docs").glob("*.md")), ids=lambda p: p.name)
def test_every_relative_link_leads_somewhere(page):
    """Links between the README, docs/ and the committed results name files (and headings) that exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(target)
    assert broken == []
