"""Command line: python -m data_tools {shard-folder, shard-emoset, shard-emotic, shard-frames, crawl, idx-to-folder,
verify} ..."""
import argparse
import functools
import json
import os
import sys
from typing import Optional, Sequence

from data_tools.images import DEFAULT_MAX_PIXELS
from data_tools.registry import REGISTRY
from data_tools.samples import ImageOptions
from runtime.logs import setup_logging
from runtime.cli import HelpFormatter


def _part_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", metavar="I/N", help="write part I (from 0) of N of the job's shards, e.g. one Slurm "
                                                  "array task each (default: SLURM_ARRAY_TASK_ID/COUNT when set)")


def _image_args(p: argparse.ArgumentParser, min_shards: int) -> None:
    p.add_argument("--out", required=True, help="output directory (created; reruns skip finished shards)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (at most 10000)")
    p.add_argument("--min-shards", type=int, default=min_shards,
                   help="at least this many shards per split (>= loader workers x ranks for plain reading)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="shard-writing processes")
    p.add_argument("--max-side", type=int, default=512, help="longer image side after re-encoding (0: keep)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--detector", default="hog+face",
                   help="person detector: hog, face, hog+face, none, or torchvision:ARCH:/path/weights.pth")


def _options(args) -> ImageOptions:
    return ImageOptions(max_side=args.max_side, quality=args.quality, max_pixels=args.max_pixels,
                        detector=args.detector)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)  # every tool shows defaults

    p = sub.add_parser("shard-folder", help=f"a benchmark ({', '.join(REGISTRY)}) or class-folder tree")
    p.add_argument("name", help=f"registry name ({', '.join(REGISTRY)}), or any name with --generic")
    p.add_argument("src", help="dataset root: class folders, train/val/test folders, or splits/*.txt")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (written to splits/*.txt)")
    p.add_argument("--split-files", help="directory with train.txt/val.txt/test.txt ('path [label]' lines)")
    p.add_argument("--generic", action="store_true", help="not a registered benchmark: classes = sub-folders")
    p.add_argument("--ratios", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="split ratios for --generic")
    _image_args(p, min_shards=8)
    _part_arg(p)

    p = sub.add_parser("shard-emoset", help="EmoSet-118K layout with attribute annotations")
    p.add_argument("src", help="EmoSet root (train.json, val.json, test.json, image/, annotation/, info.json)")
    p.add_argument("--name", default="EmoSet")
    _image_args(p, min_shards=8)
    _part_arg(p)

    p = sub.add_parser("shard-emotic", help="EMOTIC: one sample per annotated person, its box as person crop")
    p.add_argument("src", help="EMOTIC root: Annotations/Annotations.mat (or emotic_pre/{train,val,test}.csv) and "
                               "the image folders (emotic/mscoco/images, ...)")
    p.add_argument("--annotations", help="Annotations.mat, or the folder with train.csv/val.csv/test.csv, "
                                         "elsewhere than under SRC")
    p.add_argument("--name", default="EMOTIC")
    _image_args(p, min_shards=8)

    p = sub.add_parser("shard-frames", help="clips with per-frame valence/arousal (AFEW-VA, Aff-Wild2, generic)")
    p.add_argument("name", help="dataset name recorded in the shards")
    p.add_argument("src", help="AFEW-VA root (<clip>/<clip>.json + frames), Aff-Wild2 root (annotations/, "
                               "cropped_aligned/), or frames/<clip>/ + annotations.csv")
    p.add_argument("--format", required=True, choices=("afew-va", "affwild2", "generic"))
    p.add_argument("--out", required=True, help="output directory (created; reruns skip finished shards)")
    p.add_argument("--annotations", help="generic: the CSV (default SRC/annotations.csv)")
    p.add_argument("--max-frames", type=int, default=64, help="frames per sample (a clip is cut into chunks)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject split")
    p.add_argument("--ratios", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--shard-size", type=int, default=100, help="clip chunks per shard")
    p.add_argument("--min-shards", type=int, default=4)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--max-side", type=int, default=256, help="longer frame side after re-encoding")
    p.add_argument("--quality", type=int, default=90)

    p = sub.add_parser("video-to-frames", help="videos -> frame folders (PyAV, OpenCV fallback), optionally "
                                               "cropped to the person or face per frame")
    p.add_argument("videos", nargs="+", help="video files, or folders of them")
    p.add_argument("--out", required=True, help="OUT/<video name>/00000.jpg ... + frames.json (reruns skip "
                                                "finished videos)")
    p.add_argument("--every", type=int, default=1, help="keep every n-th frame")
    p.add_argument("--detect", default="none", help="per-frame crop: hog, face, hog+face, none, or "
                                                    "torchvision:ARCH:/path/weights.pth")
    p.add_argument("--backend", default="auto", choices=("auto", "pyav", "opencv"))
    p.add_argument("--max-frames", type=int, help="at most this many frames per video")
    p.add_argument("--max-side", type=int, default=256, help="longer frame side")
    p.add_argument("--quality", type=int, default=90)

    p = sub.add_parser("crawl", help="download a URL list into shards")
    p.add_argument("annotations", help="CSV/TSV/parquet/JSONL with a url column (or FindingEmo's image_path)")
    p.add_argument("--name", default="web", help="dataset name recorded in each sample")
    p.add_argument("--split", default="train")
    p.add_argument("--url-map", help="FindingEmo dataset_urls_exploded.json: image_path -> URLs")
    p.add_argument("--url-column"), p.add_argument("--label-column"), p.add_argument("--caption-column")
    p.add_argument("--classes", help="file with one class name per line (default: the labels found, sorted)")
    p.add_argument("--threads", type=int, default=16, help="concurrent downloads per shard-writing process")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=2, help="retries on timeouts, 5xx and 429")
    p.add_argument("--max-bytes", type=int, default=20_000_000, help="refuse larger downloads")
    p.add_argument("--max-seconds", type=float, default=60.0, help="give up on an answer still arriving after this")
    p.add_argument("--allow-private", action="store_true",
                   help="also connect to loopback, link-local and private addresses (default: public ones only)")
    p.add_argument("--allow-cidr", nargs="+", default=[], metavar="CIDR",
                   help="also connect to these networks (e.g. 10.1.0.0/16 for an image server inside a cluster)")
    _image_args(p, min_shards=1)
    _part_arg(p)

    p = sub.add_parser("merge-parts", help="after every part of a crawl / shard-folder / shard-emoset job: "
                                           "sizes.json and info.json, or the shards still missing")
    p.add_argument("out", help="the job's --out")

    p = sub.add_parser("idx-to-folder", help="MNIST-format IDX files -> class-folder tree (e.g. Fashion-MNIST)")
    p.add_argument("images", help="IDX images file (.gz or plain)")
    p.add_argument("label_file", metavar="labels", help="IDX labels file (.gz or plain)")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", nargs="*", help="class names by label index, or of the --labels kept (default: "
                                                "Fashion-MNIST's if 10 labels)")
    p.add_argument("--labels", type=int, nargs="*", help="keep only these label indices (default: all)")
    p.add_argument("--per-class", type=int, default=0, help="first N images of each class (0: all)")
    p.add_argument("--skip-per-class", type=int, default=0, help="skip the first K images of each class first")

    p = sub.add_parser("verify", help="re-read every shard; check schema and stats; count classes")
    p.add_argument("root", help="a directory written by shard-folder, shard-emoset or crawl")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    args = parser.parse_args(argv)
    setup_logging()
    from data_tools.writer import Part
    try:
        if args.command == "shard-folder":
            from data_tools.folder import shard_folder
            info = shard_folder(args.name, args.src, args.out, seed=args.seed, shard_size=args.shard_size,
                                min_shards=args.min_shards, workers=args.workers, split_files=args.split_files,
                                generic=args.generic, ratios=tuple(args.ratios), options=_options(args),
                                part=Part.parse(args.part))
            print(json.dumps(info["splits"] if info else "part done; others still running", indent=1))
        elif args.command == "shard-emoset":
            from data_tools.emoset import shard_emoset
            info = shard_emoset(args.src, args.out, shard_size=args.shard_size, min_shards=args.min_shards,
                                workers=args.workers, options=_options(args), name=args.name,
                                part=Part.parse(args.part))
            print(json.dumps(info["splits"] if info else "part done; others still running", indent=1))
        elif args.command == "shard-emotic":
            from data_tools.emotic import shard_emotic
            info = shard_emotic(args.src, args.out, annotations=args.annotations, shard_size=args.shard_size,
                                min_shards=args.min_shards, workers=args.workers, options=_options(args),
                                name=args.name)
            print(json.dumps(info["splits"], indent=1))
        elif args.command == "shard-frames":
            from data_tools.frames import shard_frames
            info = shard_frames(args.name, args.src, args.out, fmt=args.format, max_frames=args.max_frames,
                                seed=args.seed, ratios=tuple(args.ratios), annotations=args.annotations,
                                shard_size=args.shard_size, min_shards=args.min_shards, workers=args.workers,
                                max_side=args.max_side, quality=args.quality)
            print(json.dumps({"splits": info["splits"], "frames": info["frames"], "rule": info["split_rule"]},
                             indent=1))
        elif args.command == "video-to-frames":
            from data_tools.video import videos_to_frames
            print(json.dumps(videos_to_frames(args.videos, args.out, every=args.every, detect=args.detect,
                                              max_side=args.max_side, quality=args.quality, backend=args.backend,
                                              max_frames=args.max_frames), indent=1))
        elif args.command == "crawl":
            from data_tools.crawl import crawl
            classes = None
            if args.classes:
                classes = [c.strip() for c in open(args.classes) if c.strip()]
            summary = crawl(args.annotations, args.out, name=args.name, split=args.split,
                            shard_size=args.shard_size, min_shards=args.min_shards, workers=args.workers,
                            threads=args.threads, timeout=args.timeout, retries=args.retries,
                            max_bytes=args.max_bytes, max_seconds=args.max_seconds, classes=classes,
                            url_column=args.url_column,
                            label_column=args.label_column, caption_column=args.caption_column,
                            url_map=args.url_map, options=_options(args), allow_private=args.allow_private,
                            allow_cidrs=args.allow_cidr, part=Part.parse(args.part))
            print(json.dumps(summary, indent=1))
        elif args.command == "merge-parts":
            from data_tools.writer import merge_parts
            print(json.dumps(merge_parts(args.out)["splits"], indent=1))
        elif args.command == "idx-to-folder":
            from data_tools.idx import idx_to_folder
            counts = idx_to_folder(args.images, args.label_file, args.out, args.classes, args.per_class,
                                   args.skip_per_class, args.labels)
            print(json.dumps(counts))
        else:
            from data_tools.verify import format_report, verify
            report = verify(args.root)
            print(json.dumps(report, indent=1) if args.json else format_report(report))
            return 1 if report["problems"] else 0
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
