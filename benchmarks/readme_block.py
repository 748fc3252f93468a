"""Replace a generated block (``<!-- NAME:START -->`` ... ``<!-- NAME:END -->``) in the one
document that holds it: README.md or a page under docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


def replace_readme_block(name: str, body: str, documents=DOCUMENTS) -> None:
    pattern = re.compile(rf"<!-- {name}:START -->.*?<!-- {name}:END -->", flags=re.S)
    holders = [path for path in documents if pattern.search(path.read_text())]
    if len(holders) != 1:
        where = ", ".join(str(p.relative_to(ROOT)) for p in holders) or "no document"
        raise SystemExit(f"<!-- {name}:START --> ... <!-- {name}:END --> must be in exactly one of "
                         f"README.md and docs/*.md; found in {where}")
    block = f"<!-- {name}:START -->\n{body}\n<!-- {name}:END -->"
    holders[0].write_text(pattern.sub(lambda _: block, holders[0].read_text(), count=1))


def machine_line(machine: dict, command: str) -> str:
    bf16 = f" (bf16 {machine['cpu_bf16']})" if machine.get("cpu_bf16") else ""
    return (f"Machine: {machine['cpu']}{bf16}, {machine['threads']} threads, torch {machine['torch']}. "
            f"Command: `{command}`")
