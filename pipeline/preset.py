"""Switch params.yaml to a preset: `python -m pipeline.preset real [paper]` (`make real`, `make paper`).

Each preset is a partial params file under params/ (params/real.yaml: FLUX.1-dev, Subjects200K, DreamBench, the
pretrained judges; params/paper.yaml: the paper's numbers on top of it). They are merged, in the order given, over
the current params.yaml, the result is validated section by section, and params.yaml is rewritten; `git checkout
params.yaml` returns to the embedded default. `--show` prints the same change as `dvc exp run -S` arguments instead
of writing anything, to run it as an experiment.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

from . import config

PRESETS = Path(__file__).resolve().parents[1] / "params"


class _Dumper(yaml.SafeDumper):
    """params.yaml's own style: block mappings, lists inline."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump(params: dict) -> str:
    return yaml.dump(params, Dumper=_Dumper, sort_keys=False)


def merged(names: list[str], base: dict) -> tuple[dict, dict]:
    """(params with the presets applied, the flat {section.key: value} overrides)."""
    params, flat = copy.deepcopy(base), {}
    for name in names:
        path = PRESETS / f"{name}.yaml"
        if not path.exists():
            raise config.ConfigError(f"{path}: no such preset; known: {sorted(p.stem for p in PRESETS.glob('*.yaml'))}")
        for section, values in (yaml.safe_load(path.read_text()) or {}).items():
            params.setdefault(section, {}).update(values)
            flat.update({f"{section}.{k}": v for k, v in values.items()})
    for section in params:
        config.section(section, params)                     # validate before writing anything
    return params, flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="+", help="preset names under params/, applied in order (real, paper)")
    parser.add_argument("--show", action="store_true", help="print `dvc exp run -S` arguments; write nothing")
    args = parser.parse_args(argv)
    try:
        params, flat = merged(args.presets, config.read_params())
    except config.ConfigError as e:
        print(f"preset: error: {e}", file=sys.stderr)
        return 2
    if args.show:
        print("dvc exp run -n " + "-".join(args.presets) + " " +
              " ".join(f"-S '{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}'"
                       for k, v in flat.items()))
        return 0
    Path(config.PARAMS_FILE).write_text(dump(params))
    print(f"preset: params.yaml now has {len(flat)} values from {', '.join(args.presets)} "
          f"(`git diff params.yaml` shows them; `git checkout params.yaml` undoes it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
