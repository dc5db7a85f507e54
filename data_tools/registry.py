"""The downstream benchmarks: class vocabularies, task types and split rules (docs/method.md §6)."""
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple, get_args

Task = Literal["single_label", "multi_label", "regression"]
SINGLE_LABEL: Task = "single_label"
MULTI_LABEL: Task = "multi_label"
REGRESSION: Task = "regression"
TASKS: Tuple[Task, ...] = get_args(Task)
UNLABELLED = "unlabelled"  # the task info.json records for crawled shards: pretraining only

# "per_class": seeded ratios within each class; "per_group": within each (class, sub-folder);
# "official_test_split": the source's train/ and test/ kept, test divided into test and val;
# "files": the source's own split files are required
SplitRule = Literal["per_class", "per_group", "official_test_split", "files"]

MIKELS8 = ("amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness")
# EMOTIC's 26 categories in the alphabetical order its code and papers use (the dataset's site lists another order)
EMOTIC_CATEGORIES = ("Affection", "Anger", "Annoyance", "Anticipation", "Aversion", "Confidence", "Disapproval",
                     "Disconnection", "Disquietment", "Doubt/Confusion", "Embarrassment", "Engagement", "Esteem",
                     "Excitement", "Fatigue", "Fear", "Happiness", "Pain", "Peace", "Pleasure", "Sadness",
                     "Sensitivity", "Suffering", "Surprise", "Sympathy", "Yearning")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    classes: Tuple[str, ...]
    split_rule: SplitRule
    ratios: Tuple[float, float, float] = (0.8, 0.1, 0.1)   # train, val, test
    task: Task = SINGLE_LABEL
    note: str = ""

    def __post_init__(self) -> None:
        if self.split_rule not in get_args(SplitRule):
            raise ValueError(f"{self.name}: split_rule {self.split_rule!r} is not one of {get_args(SplitRule)}")
        if self.task not in TASKS:
            raise ValueError(f"{self.name}: task {self.task!r} is not one of {TASKS}")

    def class_index(self, folder_name: str) -> Optional[int]:
        """Index of a class folder, matched case-insensitively ('Anger' and 'anger' are the same class)."""
        lowered = [c.lower() for c in self.classes]
        name = folder_name.lower()
        return lowered.index(name) if name in lowered else None


REGISTRY: Dict[str, DatasetSpec] = {s.name: s for s in [
    DatasetSpec("FI", MIKELS8, "per_class", (0.80, 0.05, 0.15)),
    DatasetSpec("Emotion6", ("anger", "disgust", "fear", "joy", "sadness", "surprise"), "per_class",
                (0.70, 0.10, 0.20)),
    DatasetSpec("UBE", ("anger", "fear", "joy", "love", "sadness", "surprise"), "per_group", (0.70, 0.10, 0.20),
                note="UnBiasedEmo: class folders hold sub-folders of subjects; split within each (class, sub-folder)"),
    DatasetSpec("CAER-S", ("Anger", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"),
                "official_test_split", (0.0, 0.34, 0.66),
                note="official train/ and test/; the official test set is divided 66% test / 34% val per class"),
    DatasetSpec("HECO", ("Anger", "Disgust", "Excitement", "Fear", "Happiness", "Peace", "Sadness", "Surprise"),
                "per_class", (0.70, 0.10, 0.20)),
    DatasetSpec("Emo8", MIKELS8, "files", (0.8, 0.1, 0.1), note="the authors' split files (8:1:1) are required"),
    DatasetSpec("EMOTIC", EMOTIC_CATEGORIES, "files", (0.7, 0.1, 0.2), task=MULTI_LABEL,
                note="shard-emotic: one sample per annotated person, its body box as the person crop; the official "
                     "split of Annotations.mat; 26 categories multi-hot plus valence/arousal/dominance (1..10)"),
]}


class UnknownDatasetError(KeyError):
    def __str__(self) -> str:
        return self.args[0]


def get_dataset(name: str) -> DatasetSpec:
    for key, spec in REGISTRY.items():
        if key.lower() == name.lower():
            return spec
    raise UnknownDatasetError(f"unknown dataset {name!r}; registered: {', '.join(REGISTRY)} "
                              f"(use --generic for any class-folder tree)")


def generic_spec(name: str, classes: Tuple[str, ...], ratios: Tuple[float, float, float]) -> DatasetSpec:
    """Any ImageFolder-style tree: classes are its sub-folders, split per class by the given ratios (three
    non-negative fractions that sum to 1)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(f"--ratios {' '.join(f'{r:g}' for r in ratios)}: expected three non-negative fractions "
                         f"(train val test) that sum to 1, got a sum of {sum(ratios):g}")
    return DatasetSpec(name, tuple(classes), "per_class", ratios)
