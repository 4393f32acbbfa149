"""Benchmarks (`make bench`): results are written to experiments/bench/*.md, never asserted by tests."""
from pathlib import Path


def write_report(out_dir: str, name: str, text: str) -> Path:
    """out_dir/name written atomically (out_dir created), the text also printed; -> its path."""
    from ..fileio import write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = write_text_atomic(out / name, text)
    print(text)
    return path
