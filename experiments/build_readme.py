"""Render experiments/README.md from experiments/README.template.md.

Every template line ``@@ <command>`` is replaced by what the command prints (run from the repository root,
``python`` meaning this interpreter); every other line is copied. The commands read the sweeps under
multirun/, so rendering needs those runs on disk. ``--check`` renders and exits non-zero if the result
differs from the committed README, without writing it (figures made by `@@` plot commands are
redrawn either way).

    python experiments/build_readme.py            # rewrite experiments/README.md
    python experiments/build_readme.py --check    # compare only
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "experiments" / "README.template.md"
README = ROOT / "experiments" / "README.md"
MARK = "@@ "


def run(command: str) -> str:
    if command.startswith("python "):
        command = shlex.quote(sys.executable) + command[len("python"):]
    r = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"build_readme: command failed ({r.returncode}): {command}\n{r.stderr.strip()}")
    return r.stdout.rstrip("\n")


def render(template: str) -> str:
    out = [run(line[len(MARK):]) if line.startswith(MARK) else line for line in template.splitlines()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the committed README, do not write")
    args = p.parse_args(argv)
    text = render(TEMPLATE.read_text())
    if args.check:
        old = README.read_text()
        if old == text:
            print("experiments/README.md is up to date")
            return 0
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), "committed", "rendered"))
        return 1
    README.write_text(text)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
