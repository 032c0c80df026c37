"""params.yaml validation: every bad value stops with a message that names the key."""
import dataclasses

import pytest
import yaml

from pipeline import config

from conftest import REPO


def load_with(tmp_path, section, values, names=None):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.setdefault(section, {}).update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return config.load(*(names or [section]), path=path)


def test_repository_params_are_valid():
    params = config.read_params(REPO / "params.yaml")
    assert set(params) == set(config.SECTIONS)
    for name in config.SECTIONS:
        config.section(name, params)


@pytest.mark.parametrize("section, values, message", [
    ("loss", {"beta": float("nan")}, "loss.beta must be finite"),
    ("loss", {"beta": -1.0}, "loss.beta must be a finite number > 0"),
    ("loss", {"beta": "big"}, "loss.beta must be a number"),
    ("cdns", {"blur_radius": -2.0}, "cdns.blur_radius must be a finite number >= 0"),
    ("cdns", {"image": "sharpen"}, "cdns.image must be one of"),
    ("cdns", {"text": "shout"}, "cdns.text must be one of"),
    ("sft", {"lr": 0.0}, "sft.lr must be a finite number > 0"),
    ("sft", {"steps": 2.5}, "sft.steps must be an integer"),
    ("sft", {"generic_prompt_prob": 1.5}, r"sft.generic_prompt_prob must be in \[0, 1\]"),
    ("sfo", {"lora_rank": 0}, "sfo.lora_rank must be >= 1"),
    ("sfo", {"timesteps": "cosine"}, "sfo.timesteps must be one of"),
    ("train", {"checkpoint_every": 0}, "train.checkpoint_every must be >= 1"),
    ("sfo", {"lr": float("inf")}, "sfo.lr must be finite"),
    ("sfo", {"bogus": 1}, r"unknown key\(s\) \['sfo.bogus'\]"),
    ("bench", {"subjects": 0}, "bench.subjects must be >= 1"),
    ("model", {"axes_dims_rope": [8, 8, 8]}, "model.axes_dims_rope must be 3 numbers summing to"),
    ("world", {"image_size": True}, "world.image_size must be an integer"),
    ("prepare", {"target_mismatch": 1.5}, r"prepare.target_mismatch must be in \[0, 1\]"),
    ("prepare", {"target_mismatch": -0.1}, r"prepare.target_mismatch must be in \[0, 1\]"),
    ("prepare", {"mismatch_fields": ["mark_size"]}, r"prepare.mismatch_fields\[0\] must be one of"),
    ("prepare", {"mismatch_fields": ["mark_color", "cls"]}, r"prepare.mismatch_fields\[1\] must be one of"),
    ("prepare", {"mismatch_fields": ["pattern", "pattern"]}, "prepare.mismatch_fields must not repeat a field"),
    ("prepare", {"mismatch_fields": []}, "prepare.mismatch_fields must name at least one field"),
    ("prepare", {"target_mismatch": 0.2, "source": "subjects200k"}, "prepare.target_mismatch applies to the embedded"),
])
def test_bad_values_name_their_key(tmp_path, section, values, message):
    with pytest.raises(config.ConfigError, match=message):
        load_with(tmp_path, section, values)


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match=r"unknown section\(s\) \['distill'\]"):
        load_with(tmp_path, "distill", {"steps": 1}, names=["loss"])


def test_scientific_notation_and_ints_are_numbers(tmp_path):
    cfg = load_with(tmp_path, "sfo", {"lr": "5e-4", "lora_alpha": 16})
    assert cfg.lr == 5e-4 and cfg.lora_alpha == 16.0


def test_the_dataclass_defaults_are_params_yaml():
    """A stage reading a params file without some key gets the embedded default, not an older value."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, cls in config.SECTIONS.items():
        assert dataclasses.asdict(cls()) == params[name], name


def test_docs_params_lists_every_key_with_its_default():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    documented, section = {}, None
    for line in (REPO / "docs/params.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            documented[section] = {}
        elif section and line.startswith("| `"):
            key, default, meaning = (c.strip() for c in line.strip("|").split("|", 2))
            assert meaning, (section, key)
            documented[section][key.strip("`")] = yaml.safe_load(default.strip("`"))
    assert documented == params


@pytest.mark.parametrize("patch", sorted(p.name for p in (REPO / "docs/probes").glob("*.patch")))
def test_documented_probe_patches_still_apply(patch):
    """docs/calibration.md tells users to `git apply` these probes: they must apply to the code as it is."""
    import subprocess
    p = subprocess.run(["git", "apply", "--check", f"docs/probes/{patch}"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
