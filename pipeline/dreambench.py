"""DreamBench (the DreamBooth dataset) as the real-scale bench: subjects, prompts and generation jobs read in
place from the published folder layout (never copied into this repository).

    root/dataset/<subject>/*.jpg             4-6 reference photos per subject
    root/dataset/prompts_and_classes.txt     each subject's class; 25 object and 25 live-subject templates
    root/subject_names.csv                   (optional) descriptive names, SFO paper App. D.3

The root is, in order: the `root` argument, the environment variable SFO_DREAMBENCH, `../shared/dreambench`
beside this repository. Prompts put the descriptive name where DreamBooth puts "<unique token> <class>" (the
zero-shot protocol of the SFO paper); without `subject_names.csv` the class is used. Live subjects (class cat
or dog) take the live-subject templates, the others the object templates.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "dreambench"
LIVE_CLASSES = ("cat", "dog")
SEEDS = 4
_TEMPLATE = re.compile(r"'(.*?)'\.format\(unique_token, class_token\)")


@dataclass(frozen=True)
class Subject:
    dir: str                   # the folder name, e.g. "dog6"
    cls: str                   # DreamBooth's class, e.g. "dog"
    name: str                  # the descriptive name that goes into prompts, e.g. "puppy"
    live: bool
    images: tuple[Path, ...]   # the reference photos, sorted; images[0] is "the first reference"


@dataclass(frozen=True)
class Job:
    subject: str
    prompt_index: int
    prompt: str
    seed: int


@dataclass
class DreamBench:
    root: Path
    subjects: list[Subject]
    object_templates: list[str]
    live_templates: list[str]
    seeds: int = SEEDS
    by_dir: dict = field(init=False, repr=False)

    def __post_init__(self):
        self.by_dir = {s.dir: s for s in self.subjects}

    def templates(self, subject: Subject) -> list[str]:
        return self.live_templates if subject.live else self.object_templates

    def prompts(self, subject: Subject) -> list[str]:
        return [t.format(subject.name) for t in self.templates(subject)]

    def pairs(self) -> list[tuple[str, int, str]]:
        """(subject, prompt index, prompt) for every subject and its prompt list: 30 x 25 = 750."""
        return [(s.dir, i, p) for s in self.subjects for i, p in enumerate(self.prompts(s))]

    def jobs(self) -> list[Job]:
        """One generation per (subject, prompt, seed): 750 x 4 = 3000 with the standard 4 seeds."""
        return [Job(s, i, p, k) for s, i, p in self.pairs() for k in range(self.seeds)]


def resolve_root(root: str | Path | None = None) -> Path:
    root = Path(root or os.environ.get("SFO_DREAMBENCH") or DEFAULT_ROOT)
    if not (root / "dataset" / "prompts_and_classes.txt").is_file():
        raise ConfigError(f"{root}: no DreamBench here (expected dataset/prompts_and_classes.txt); point "
                          f"SFO_DREAMBENCH at your copy of https://github.com/google/dreambooth (its dataset/ "
                          f"folder, and subject_names.csv for the descriptive names)")
    return root


def _parse_prompts_and_classes(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    text = path.read_text()
    try:
        classes_part, prompts_part = text.split("\nPrompts", 1)
        object_part, live_part = prompts_part.split("Live Subject Prompts", 1)
    except ValueError:
        raise ConfigError(f"{path}: expected a 'Classes' part, then 'Prompts' with 'Object Prompts' and "
                          f"'Live Subject Prompts'") from None
    classes = {}
    for line in classes_part.splitlines():
        if "," in line and not line.startswith("subject_name"):
            subject, cls = (x.strip() for x in line.split(",", 1))
            classes[subject] = cls
    def templates(part):
        return [t.replace("{0} {1}", "{}") for t in _TEMPLATE.findall(part)]
    obj, live = templates(object_part), templates(live_part)
    if not classes or not obj or not live:
        raise ConfigError(f"{path}: found {len(classes)} classes, {len(obj)} object and {len(live)} live templates")
    return classes, obj, live


def load(root: str | Path | None = None, seeds: int = SEEDS) -> DreamBench:
    root = resolve_root(root)
    classes, obj, live = _parse_prompts_and_classes(root / "dataset" / "prompts_and_classes.txt")
    names = {}
    names_file = root / "subject_names.csv"
    if names_file.exists():
        with open(names_file, newline="") as f:
            names = {r["subject_dir"]: r["descriptive_name"] for r in csv.DictReader(f)}
    subjects = []
    for d, cls in sorted(classes.items()):
        folder = root / "dataset" / d
        images = tuple(sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")))
        if not images:
            raise ConfigError(f"{folder}: subject {d!r} is listed in prompts_and_classes.txt but has no images")
        subjects.append(Subject(d, cls, names.get(d, cls), cls in LIVE_CLASSES, images))
    return DreamBench(root, subjects, obj, live, seeds)
