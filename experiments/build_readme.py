"""Render experiments/README.md from experiments/README.template.md.

Every template line ``@@ <command>`` is replaced by the command, visible in a ```` ```bash ```` block, then a
blank line and what the command prints (run from the repository root, ``python`` meaning this interpreter):
each table of the README stands under the command that printed it. A command that prints nothing (a figure
drawn with ``> /dev/null``) renders as its block alone, which says how the figure is drawn (``block``).
Every other line is copied. The commands read sweep folders: the committed copies of their result files
under experiments/data/ (``report.py archive``), or the git-ignored multirun/. ``--check`` writes nothing:
it renders the README and draws the figures of ``@@`` commands (their ``--out`` file) into a temporary
folder, and exits non-zero if the README or any figure differs from the committed one.

``--only TEXT`` re-runs only the ``@@`` commands that contain TEXT and keeps, for every other command,
the text it has in the committed README (its block and output): that text is recovered by matching the
committed template against the committed README (as of git HEAD; with ``--check``, the files on disk, which
the check compares against), line by line. Use it to update one section when the other sweeps are not on
disk; a command whose committed output cannot be recovered unambiguously (or is new) must be re-run, and
the build says which.

``--committed`` re-runs exactly the commands whose data is committed (every path they name lies under
experiments/data/ and exists; a command naming no path reads none), keeps the others' output the same way,
and lists them. ``--check --committed`` is the check CI can run (tests/test_report.py does it command by
command): every table made from committed data still equals its data.

    python experiments/build_readme.py                                   # rewrite experiments/README.md
    python experiments/build_readme.py --check                           # compare only
    python experiments/build_readme.py --only deepcache_n5000_ddim100    # re-run one section's commands
    python experiments/build_readme.py --check --committed               # compare what committed data can
"""

from __future__ import annotations

import argparse
import difflib
import glob
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Union

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "experiments" / "README.template.md"
README = ROOT / "experiments" / "README.md"
MARK = "@@ "
FENCE = ("```bash", "```")             # the lines around a command's own line in its rendered block
OUT = re.compile(r"--out (\S+)")
DATA = "experiments/data/"
# a relative path named in a command (a/b, globs, Hydra job names with = and ,), not part of a longer path
PATH = re.compile(r"(?<![\w./-])[\w.*,=+-]+(?:/[\w.*,=+-]+)+")


def inputs(command: str) -> list[str]:
    """The relative paths a command names other than scripts (*.py) and the figures it draws (--out)."""
    drawn = set(OUT.findall(command))
    return [p for p in dict.fromkeys(PATH.findall(command)) if p not in drawn and not p.endswith(".py")]


def missing_data(command: str) -> list[str]:
    """The paths a command reads that are not committed data: outside experiments/data/, or matching
    nothing there. [] means its output can be recomputed from the repository alone."""
    return [p for p in inputs(command) if not p.startswith(DATA) or not glob.glob(str(ROOT / p))]


def block(command: str, output: str) -> str:
    """The rendered text of the template line ``@@ command`` that printed output: the command in a bash
    block, then a blank line and the output; the block alone if the output is empty."""
    return "\n".join([FENCE[0], command, FENCE[1]] + (["", output] if output else []))


def run(command: str) -> str:
    if command.startswith("python "):
        command = shlex.quote(sys.executable) + command[len("python"):]
    r = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"build_readme: command failed ({r.returncode}): {command}\n{r.stderr.strip()}")
    return r.stdout.rstrip("\n")


class Committed(NamedTuple):
    """What the committed README holds for each command, recovered by committed_outputs."""
    outputs: dict[str, str | None]        # command -> its rendered text (block(...)); None where ambiguous
    chains: list[tuple[list[str], str]]   # ambiguous stretches: (their template lines, their rendered text)


def committed_outputs(template: str, readme: str) -> Committed:
    """Recover each command's rendered text (``block``: its command block and output) from readme, which
    was rendered from template.

    Each ``@@`` line rendered to its three block lines (```` ```bash ````, the command, ```` ``` ````), then
    either nothing (an empty output) or a blank line and one or more output lines. The split is found by
    dynamic programming over (template line, README line); a command's text is known when the shortest
    and the longest consistent outputs agree. Where they do not (an output that itself holds the next
    command's block), the stretch of template lines from the first to the last such command still has one
    rendering: it is kept whole, as a chain.
    """
    t, r = template.splitlines(), readme.splitlines()
    n, m = len(t), len(r)
    # ok[i][j]: template lines i.. render to README lines j..; later[i][j]: ok[i][k] for some k >= j
    ok = [bytearray(m + 1) for _ in range(n + 1)]
    later = [bytearray(m + 6) for _ in range(n + 1)]
    ok[n][m] = 1
    later[n][:m + 1] = bytearray([1]) * (m + 1)

    def heads(i: int, j: int) -> bool:
        """README lines j.. start with the block of template line i's command."""
        return r[j:j + 3] == [FENCE[0], t[i][len(MARK):], FENCE[1]]

    def ends(i: int, j: int):
        """Where the rendering of template line i (an @@ line) that starts at README line j may end."""
        yield j + 3                                           # an empty output: the block alone
        if j + 3 < m and r[j + 3] == "":
            yield from range(j + 5, m + 1)                    # a blank line and at least one output line

    for i in range(n - 1, -1, -1):
        for j in range(m, -1, -1):
            if t[i].startswith(MARK):
                ok[i][j] = heads(i, j) and (ok[i + 1][j + 3] or (j + 3 < m and r[j + 3] == ""
                                                                  and later[i + 1][j + 5]))
            else:
                ok[i][j] = j < m and t[i] == r[j] and ok[i + 1][j + 1]
            later[i][j] = ok[i][j] or later[i][j + 1]
    if not ok[0][0]:
        raise SystemExit("build_readme: the committed README was not rendered from the committed template")

    def split(shortest: bool) -> list[tuple[int, int, int]]:
        spans, j = [], 0
        for i, line in enumerate(t):
            if line.startswith(MARK):
                ks = [k for k in ends(i, j) if ok[i + 1][k]]
                k = ks[0] if shortest else ks[-1]
                spans.append((i, j, k))
                j = k
            else:
                j += 1
        return spans

    outputs: dict[str, str | None] = {}
    chains: list[list[tuple[int, int, int]]] = []
    chain: list[tuple[int, int, int]] = []
    for (i, j, k), (_, j2, k2) in zip(split(True), split(False)):
        command, text = t[i][len(MARK):], "\n".join(r[j:k])
        sure = (j, k) == (j2, k2)
        outputs[command] = text if sure and outputs.get(command, text) == text else None
        if not sure:
            chain.append((i, j, k))
        elif chain:
            chains.append(chain)
            chain = []
    if chain:
        chains.append(chain)
    kept = [(t[c[0][0]:c[-1][0] + 1], "\n".join(r[c[0][1]:c[-1][2]])) for c in chains]
    return Committed(outputs, kept)


def render(template: str, figures: Path | None = None, only: Union[str, Callable[[str], bool], None] = None,
           committed: Committed | None = None) -> tuple[str, dict[str, Path]]:
    """The README text, and {figure named by --out: where it was drawn}; figures=None draws them in place.

    Each ``@@`` line becomes ``block(command, what it printed)``: the command as the template writes it
    (not its --out redirected into figures). With ``only`` (a text, or a test of the command), commands
    that do not contain it (fail the test) are not run: their text comes from ``committed``.
    """
    drawn: dict[str, Path] = {}

    def redirect(m: re.Match) -> str:
        drawn[m.group(1)] = figures / f"{len(drawn)}{Path(m.group(1)).suffix}"
        return f"--out {shlex.quote(str(drawn[m.group(1)]))}"

    def rerun(line: str) -> bool:
        command = line[len(MARK):]
        return line.startswith(MARK) and (only is None or (only(command) if callable(only) else only in command))

    lines, out, i = template.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith(MARK):
            out.append(line)
            continue
        command = line[len(MARK):]
        if rerun(line):
            out.append(block(command, run(OUT.sub(redirect, command) if figures is not None else command)))
            continue
        known = committed.outputs if committed else {}
        if known.get(command) is not None:
            out.append(known[command])
            continue
        chain = next((c for c in (committed.chains if committed else [])
                      if lines[i - 1:i - 1 + len(c[0])] == c[0] and not any(map(rerun, c[0]))), None)
        if chain is None:
            why = "is ambiguous there" if command in known else "is not there"
            raise SystemExit(f"build_readme: the committed output of this command {why}; "
                             f"re-run it (widen --only): {command}")
        out.append(chain[1])
        i += len(chain[0]) - 1
    return "\n".join(out) + "\n", drawn


def git_show(path: Path) -> str:
    """The file as of git HEAD."""
    r = subprocess.run(["git", "show", f"HEAD:{path.relative_to(ROOT).as_posix()}"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"build_readme: --only needs the committed {path.name} (git show failed): "
                         f"{r.stderr.strip()}")
    return r.stdout


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
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only", metavar="TEXT", help="re-run only the @@ commands containing TEXT; keep the "
                       "committed output of the others")
    which.add_argument("--committed", action="store_true", help="re-run only the @@ commands whose data is "
                       "committed (under experiments/data/); keep the committed output of the others")
    args = p.parse_args(argv)
    committed, only = None, args.only
    if args.only is not None and not args.only.strip():
        raise SystemExit("build_readme: --only needs a non-empty TEXT (a part of the commands to re-run)")
    if args.committed:
        only = lambda command: not missing_data(command)  # noqa: E731
    commands = {line[len(MARK):]: n for n, line in reversed(list(enumerate(TEMPLATE.read_text().splitlines(), 1)))
                if line.startswith(MARK)}                # command -> its first template line
    if only is not None and not all(only(c) if callable(only) else only in c for c in commands):
        # some text is kept: recover it. --check compares with the files on disk, so it recovers from them too
        committed = committed_outputs(*(f.read_text() if args.check else git_show(f) for f in (TEMPLATE, README)))
    if args.committed:
        kept = {c: missing_data(c) for c in commands if missing_data(c)}
        print(f"re-running the {len(commands) - len(kept)} commands whose data is committed; keeping the "
              f"committed output of {len(kept)} whose data is not:")
        for c, missing in sorted(kept.items(), key=lambda kv: commands[kv[0]]):
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            print(f"  template line {commands[c]}: {missing[0]}{more} not committed")
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            return check(*render(TEMPLATE.read_text(), Path(tmp), only, committed))
    text, _ = render(TEMPLATE.read_text(), None, only, committed)
    from fewstep.fileio import write_text_atomic

    write_text_atomic(README, text)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
