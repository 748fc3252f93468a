"""Replace a generated block (``<!-- NAME:START -->`` ... ``<!-- NAME:END -->``) in README.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def replace_readme_block(name: str, body: str, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    block = f"<!-- {name}:START -->\n{body}\n<!-- {name}:END -->"
    new, count = re.subn(rf"<!-- {name}:START -->.*?<!-- {name}:END -->", lambda _: block, text,
                         flags=re.S)
    if count != 1:
        raise SystemExit(f"README.md has no <!-- {name}:START --> ... <!-- {name}:END --> block")
    readme.write_text(new)


def machine_line(machine: dict, command: str) -> str:
    bf16 = f" (bf16 {machine['cpu_bf16']})" if machine.get("cpu_bf16") else ""
    return (f"Machine: {machine['cpu']}{bf16}, {machine['threads']} threads, torch {machine['torch']}. "
            f"Command: `{command}`")
