"""The teacher options every command line that needs a teacher shares, and a TeacherConfig from them (on top of a
run's stored teacher section or a YAML file's)."""
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from pretrain.config import TeacherConfig
from pretrain.teacher import TEACHER_BACKENDS
from pretrain.teacher_error import TeacherError
from runtime.config import config_from_dict

# keys of a stored teacher section that say where its outputs are, not what it is (`cached`: older runs)
NOT_THE_TEACHER = ("cache", "cached")


def stored_teacher_config(section: Dict[str, Any], overrides=(), source: str = "the run's teacher section"):
    """The TeacherConfig of a teacher section (a run's, a YAML file's), whatever it says about a cache."""
    return config_from_dict(TeacherConfig, teacher_keys(section), overrides, source)


def teacher_keys(section: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in (section or {}).items() if k not in NOT_THE_TEACHER}


def add_teacher_args(parser, checkpoint_help: str = "the teacher's weights file") -> None:
    """The teacher options every CLI that needs a teacher shares."""
    group = parser.add_argument_group("teacher (defaults: the run's teacher section, where there is a run)")
    group.add_argument("--teacher-config", help="a YAML file whose `teacher:` section describes the teacher "
                                                "(e.g. the pretraining config)")
    group.add_argument("--teacher-backend", choices=sorted(TEACHER_BACKENDS),
                       help="a teacher backend (TEACHER_BACKENDS in pretrain/teacher.py)")
    group.add_argument("--teacher-arch", help="open_clip model name / .json, or torchvision classifier name")
    group.add_argument("--teacher-checkpoint", help=checkpoint_help)
    group.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other teacher key (text_encoder, image_size, temperature, ...); repeatable")


def teacher_config_from_args(args, base: Optional[Dict[str, Any]] = None):
    """TeacherConfig from `base` (e.g. a run's stored teacher section), then --teacher-config, then the flags."""
    raw = teacher_keys(base)
    source = "the run's teacher section" if base else "defaults"
    if args.teacher_config:
        section = (yaml.safe_load(Path(args.teacher_config).read_text()) or {}).get("teacher")
        if not isinstance(section, dict):
            raise TeacherError(f"{args.teacher_config}: no `teacher:` section")
        raw.update(teacher_keys(section))
        source = args.teacher_config
    flags = {"backend": args.teacher_backend, "arch": args.teacher_arch, "checkpoint": args.teacher_checkpoint}
    if flags["backend"] and flags["backend"] != raw.get("backend", "open_clip") and not flags["arch"]:
        raw.pop("arch", None)  # another backend: its own default model unless one is named
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.teacher_set)
    return stored_teacher_config(raw, overrides, source)
