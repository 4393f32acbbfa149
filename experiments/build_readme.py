"""Render experiments/README.md from experiments/README.template.md.

Every template line ``@@ <command>`` is replaced by what the command prints (run from the repository root,
``python`` meaning this interpreter); every other line is copied. The commands read the sweeps under
multirun/, so rendering needs those runs on disk. ``--check`` writes nothing: it renders the README and
draws the figures of ``@@`` commands (their ``--out`` file) into a temporary folder, and exits non-zero
if the README or any figure differs from the committed one.

    python experiments/build_readme.py            # rewrite experiments/README.md
    python experiments/build_readme.py --check    # compare only
"""

from __future__ import annotations

import argparse
import difflib
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "experiments" / "README.template.md"
README = ROOT / "experiments" / "README.md"
MARK = "@@ "
OUT = re.compile(r"--out (\S+)")


def run(command: str) -> str:
    if command.startswith("python "):
        command = shlex.quote(sys.executable) + command[len("python"):]
    r = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"build_readme: command failed ({r.returncode}): {command}\n{r.stderr.strip()}")
    return r.stdout.rstrip("\n")


def render(template: str, figures: Path | None = None) -> tuple[str, dict[str, Path]]:
    """The README text, and {figure named by --out: where it was drawn}; figures=None draws them in place."""
    drawn: dict[str, Path] = {}

    def redirect(m: re.Match) -> str:
        drawn[m.group(1)] = figures / f"{len(drawn)}{Path(m.group(1)).suffix}"
        return f"--out {shlex.quote(str(drawn[m.group(1)]))}"

    out = []
    for line in template.splitlines():
        if line.startswith(MARK):
            command = line[len(MARK):]
            out.append(run(OUT.sub(redirect, command) if figures is not None else command))
        else:
            out.append(line)
    return "\n".join(out) + "\n", drawn


def check(text: str, drawn: dict[str, Path]) -> int:
    """0 if the rendered README and every redrawn figure equal the committed ones; else say which differ."""
    differ = 0
    old = README.read_text()
    if old != text:
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True), "committed", "rendered"))
        differ = 1
    for name, path in drawn.items():
        committed = ROOT / name
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            print(f"figure differs from the committed one: {name}")
            differ = 1
    if not differ:
        print(f"experiments/README.md and {len(drawn)} figures are up to date")
    return differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the committed README, do not write")
    args = p.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            return check(*render(TEMPLATE.read_text(), Path(tmp)))
    text, _ = render(TEMPLATE.read_text())
    README.write_text(text)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
