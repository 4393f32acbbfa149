"""make bench: every benchmark, each writing its experiments/bench/<name>.md."""
import argparse
import importlib

BENCHES = ("samplers", "deepcache", "sd_deepcache", "block_cache", "precision", "batch")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=BENCHES, nargs="*", default=list(BENCHES))
    p.add_argument("--out-dir", default="experiments/bench")
    args = p.parse_args()
    for name in args.only:
        print(f"[bench] {name}")
        importlib.import_module(f"fewstep.bench.{name}").main(out_dir=args.out_dir)
