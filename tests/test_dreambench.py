"""The DreamBench source on the real dataset (../shared/dreambench, or SFO_DREAMBENCH): skipped, with the
reason, where no copy is present."""
import shutil

import pytest

from pipeline import dreambench
from pipeline.config import ConfigError

try:
    ROOT = dreambench.resolve_root()
except ConfigError as e:
    ROOT, REASON = None, str(e)
needs_dreambench = pytest.mark.skipif(ROOT is None, reason=f"DreamBench not found: {REASON if ROOT is None else ''}")


@needs_dreambench
def test_the_standard_protocol_counts():
    b = dreambench.load()
    assert len(b.subjects) == 30 and len(b.pairs()) == 750 and len(b.jobs()) == 3000
    assert {j.seed for j in b.jobs()} == {0, 1, 2, 3}
    live = sorted(s.dir for s in b.subjects if s.live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert all(len(s.images) >= 4 for s in b.subjects)


@needs_dreambench
def test_each_subject_gets_its_list_and_its_descriptive_name():
    b = dreambench.load()
    dog6, clock = b.by_dir["dog6"], b.by_dir["clock"]
    assert b.prompts(dog6)[10] == "a puppy wearing a red hat"          # the live list
    assert b.prompts(clock)[10] == "a number '3' clock with a wheat field in the background"   # the object list
    assert b.prompts(clock)[0] == "a number '3' clock in the jungle"
    assert all(len(b.prompts(s)) == 25 for s in b.subjects)
    assert b.by_dir["berry_bowl"].name == "'Bon appetit' bowl"


@needs_dreambench
def test_without_the_names_file_the_class_is_used(tmp_path):
    shutil.copytree(ROOT / "dataset", tmp_path / "dataset")
    b = dreambench.load(tmp_path)
    assert b.prompts(b.by_dir["dog6"])[0] == "a dog in the jungle"


def test_a_missing_copy_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SFO_DREAMBENCH", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="point SFO_DREAMBENCH at your copy"):
        dreambench.load()
