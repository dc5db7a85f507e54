"""What each person detector costs at shard time: seconds per web-size photo in one process, as `shard-folder` runs
each sample (decode, re-encode to --max-side, detect), written to bench/results/detector_cost.json."""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.photos import make_web_photos  # noqa: E402
from data_tools.samples import ImageOptions, SampleBuilder  # noqa: E402
from runtime.atomic import atomic_write_json  # noqa: E402
from runtime.cli import HelpFormatter  # noqa: E402

DETECTORS = ("none", "face", "hog", "hog+face")


def seconds_per_photo(files, detector: str, repeats: int) -> float:
    """The best of `repeats` passes over the files (the machine's noise only ever adds time)."""
    builder = SampleBuilder("bench", ["class0", "class1", "class2", "class3"], ImageOptions(detector=detector))
    data = [f.read_bytes() for f in files]
    builder.build(data[0], split="train", source="warm-up", label=0)  # the detector is built on first use
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i, d in enumerate(data):
            builder.build(d, split="train", source=str(i), label=0)
        best = min(best, (time.perf_counter() - start) / len(data))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--photos", type=int, default=24, help="web-size photos (400-640 x 300-427 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/detector_cost.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_web_photos(Path(tmp), args.photos)
        files = sorted(Path(tmp).rglob("*.jpg"))
        costs = {d: seconds_per_photo(files, d, args.repeats) for d in DETECTORS}
    result = {"photos": args.photos, "repeats": args.repeats, "processes": 1,
              "seconds_per_photo": {d: round(c, 4) for d, c in costs.items()},
              "relative_to_none": {d: round(c / costs["none"], 1) for d, c in costs.items()}}
    atomic_write_json(Path(args.out), result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
