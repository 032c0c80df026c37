"""The real-scale sources of `prepare`: Subjects200K pairs (a small Parquet file in the published schema, drawn
here) and the DreamBench bench (the real dataset, skipped with the reason where no copy is present)."""
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run, smoke_params
from pipeline import config, dreambench, manifest, subjects200k
from pipeline.config import ConfigError
from real_fixtures import DESCRIPTION, S, SCHEMA, W, colours, pair_row, passing, write_pairs, write_subjects200k

# 12 pairs: 3, 7, 11 in collection_1; 5 unrated; 6 with imageQuality 4. With collection_2 and min_quality 5:
PASSING = [0, 1, 2, 4, 8, 9, 10]


@pytest.fixture
def pairs(tmp_path) -> Path:
    return write_subjects200k(tmp_path / "s200k.parquet")


def prep(source, **kw) -> config.Prepare:
    kw = {"source": "subjects200k", "subjects200k": str(source), "subset": 4, "val_subset": 2, "image_size": S,
          **kw}
    return config.Prepare(**kw)


def split(p: config.Prepare) -> dict[str, list[dict]]:
    out = {"train": [], "val": []}
    for s, row in subjects200k.triplets(p):
        out[s].append(row)
    return out


def ids(rows) -> list[str]:
    return [r["id"] for r in rows]


def s200k_ids(indices) -> list[str]:
    return [f"s200k-{i:07d}" for i in indices]


def check_manifest(path: Path) -> pa.Table:
    """The manifest as every stage reads it (schema, ids, prompts, attributes in range or -1: unknown)."""
    table = manifest.read(str(path))
    assert all((np.asarray(table.column(k)) == manifest.UNKNOWN).all() for k in subjects200k.ATTR_COLUMNS)
    return table


def test_the_shared_fixture_passes_the_documented_pairs():
    assert passing(12) == PASSING


def test_crops_are_exactly_the_two_boxes(pairs):
    rows = split(prep(pairs))
    for r in rows["train"] + rows["val"]:
        i = int(r["id"].split("-")[1])
        ref, target = (manifest.decode_png(r[c], r["id"]) for c in ("ref_png", "target_png"))
        left, right = colours(i)
        assert ref.shape == target.shape == (S, S, 3)
        assert (ref == left).all() and (target == right).all()          # every pixel: no padding leaks in
        assert (manifest.decode_png(r["mask_png"], "mask") == 255).all()
        assert all(r[k] == -1 for k in subjects200k.ATTR_COLUMNS)


def test_resized_crops_keep_their_colour_and_no_padding(pairs):
    rows = split(prep(pairs, image_size=32))
    ref = manifest.decode_png(rows["train"][0]["ref_png"], "ref")
    assert ref.shape == (32, 32, 3) and np.abs(ref.astype(int) - colours(0)[0]).max() <= 1
    assert manifest.decode_png(rows["train"][0]["mask_png"], "mask").shape == (32, 32)


def test_filters_split_ordering_and_prompts(pairs):
    rows = split(prep(pairs))
    assert ids(rows["train"]) == s200k_ids(PASSING[:4]) and ids(rows["val"]) == s200k_ids(PASSING[4:6])
    assert [r["subject_id"] for r in rows["train"]] == [0, 1, 2, 3]
    assert [r["subject_id"] for r in rows["val"]] == [0, 1]
    r = rows["val"][0]
    assert r["prompt"] == "item 8 in scene one" and r["generic_prompt"] == "a photo of item 8"
    # subset 0: every passing pair, the last val_subset held out
    rows = split(prep(pairs, subset=0))
    assert ids(rows["train"]) == s200k_ids(PASSING[:5]) and ids(rows["val"]) == s200k_ids(PASSING[5:])
    # every collection, any rated quality (the unrated pair 5 stays out)
    rows = split(prep(pairs, subset=0, val_subset=0, collection="", min_quality=0))
    assert ids(rows["train"]) == s200k_ids([i for i in range(12) if i != 5]) and rows["val"] == []
    rows = split(prep(pairs, subset=0, val_subset=0, collection="collection_1"))
    assert ids(rows["train"]) == s200k_ids([3, 7, 11])


def test_a_folder_of_two_files_reads_as_one(pairs, tmp_path):
    folder = tmp_path / "folder"
    write_pairs(folder / "b" / "train-00001.parquet", range(7, 12))
    no_category = pa.schema([f if f.name != "description" else pa.field("description", pa.struct(
        [x for x in DESCRIPTION if x.name != "category"])) for f in SCHEMA])
    write_pairs(folder / "a" / "train-00000.parquet", range(7), schema=no_category)   # category may be absent
    for p in ({}, {"subset": 0}):
        assert split(prep(folder, **p)) == split(prep(pairs, **p))


@pytest.mark.parametrize("case, match", [
    ("no quality column", r"missing Subjects200K column\(s\) \['quality_assessment'\]"),
    ("no item", r"\['description.item'\]"),
    ("bad bytes", r"s200k.parquet: row 0: the pair image cannot be decoded"),
    ("wrong width", r"a 170x80 pair image is not two square crops with padding 8 .*prepare.padding"),
    ("no row passes", r"no row passes the filters \(prepare.collection='collection_9'"),
    ("all held out", r"only 7 row\(s\) pass the filters, all held out by prepare.val_subset=7"),
    ("not a path", r"prepare.subjects200k='/nowhere/s200k.parquet': no such local path"),
])
def test_bad_input_names_the_column_file_or_key(tmp_path, case, match):
    path, kw = tmp_path / "s200k.parquet", {}
    table = pa.Table.from_pylist([pair_row(i) for i in range(12)], schema=SCHEMA)
    if case == "no quality column":
        table = table.drop_columns(["quality_assessment"])
    elif case == "no item":
        desc = pa.StructArray.from_arrays([table.column("description").combine_chunks().field("description_1")],
                                          ["description_1"])
        table = table.set_column(3, "description", desc)
    elif case == "bad bytes":
        rows = table.to_pylist()
        rows[0]["image"]["bytes"] = b"not a png"
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
    elif case == "wrong width":
        table = pa.Table.from_pylist([pair_row(i, width=W + 10) for i in range(12)], schema=SCHEMA)
    elif case == "no row passes":
        kw = {"collection": "collection_9"}
    elif case == "all held out":
        kw = {"val_subset": 7}
    elif case == "not a path":
        path = Path("/nowhere/s200k.parquet")
    if path.parent == tmp_path:
        pq.write_table(table, path)
    with pytest.raises(ConfigError, match=match):
        split(prep(path, **kw))


def test_an_unreachable_hub_fails_within_seconds(tmp_path, monkeypatch):
    """A hub id with no network (an endpoint nothing listens on, an empty cache): a ConfigError naming the key,
    not a minute of retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(tmp_path / "cache"))   # what `hub._cached` scans
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"prepare.subjects200k='Yuanshi/Subjects200K': the Hugging Face hub "
                                          r"cannot be reached"):
        split(prep("Yuanshi/Subjects200K"))
    assert time.time() - t0 < 10


def run_prepare(tmp_path: Path, **sections) -> Path:
    """The prepare stage as DVC runs it (a subprocess) in a working dir with smoke params and `sections`."""
    params = smoke_params()
    for name, values in sections.items():
        params[name].update(values)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([sys.executable, "-m", "pipeline.stages.prepare"], work)
    return work


def test_the_prepare_stage_reads_subjects200k(pairs, tmp_path):
    work = run_prepare(tmp_path, prepare={"source": "subjects200k", "subjects200k": str(pairs), "subset": 4,
                                          "val_subset": 2, "image_size": S, "shard_rows": 3})
    assert len(list((work / "data/train").glob("shard-*.parquet"))) == 2       # streamed, shard_rows at a time
    train, val = check_manifest(work / "data/train"), check_manifest(work / "data/val")
    assert train.column("id").to_pylist() == s200k_ids(PASSING[:4])
    assert val.column("id").to_pylist() == s200k_ids(PASSING[4:6])
    bench = manifest.read(work / "data/bench")                                  # the embedded bench, 3 subjects
    refs = manifest.read(work / "data/bench_refs")
    assert refs.column("id").to_pylist() == [f"bench-{i:05d}/ref0" for i in range(3)]
    assert refs.column("subject_id").to_pylist() == [0, 1, 2]
    first = {}
    for sid, png in zip(bench.column("subject_id").to_pylist(), bench.column("ref_png").to_pylist()):
        first.setdefault(sid, png)
    assert refs.column("ref_png").to_pylist() == [first[i] for i in range(3)]


try:
    DREAMBENCH = dreambench.resolve_root()
except ConfigError as e:
    DREAMBENCH, WHY = None, str(e)


def test_the_prepare_stage_with_the_dreambench_bench(pairs, tmp_path):
    if DREAMBENCH is None:
        pytest.skip(f"DreamBench not found: {WHY}")
    work = run_prepare(tmp_path, prepare={"source": "subjects200k", "subjects200k": str(pairs), "subset": 4,
                                          "val_subset": 2, "image_size": S},
                       bench={"source": "dreambench"})
    bench, refs = check_manifest(work / "data/bench"), check_manifest(work / "data/bench_refs")
    assert bench.num_rows == 750 and len(set(bench.column("subject_id").to_pylist())) == 30
    photos = {d.name: sorted(f.name for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
              for d in (DREAMBENCH / "dataset").iterdir() if d.is_dir()}
    assert refs.num_rows == sum(len(v) for v in photos.values())
    rows = {r["id"]: r for r in bench.to_pylist()}
    ref_rows = {r["id"]: r for r in refs.to_pylist()}
    for subject, k, prompt, generic in (("dog6", 10, "a puppy wearing a red hat", "a photo of puppy"),
                                        ("clock", 0, "a number '3' clock in the jungle",
                                         "a photo of number '3' clock")):
        r = rows[f"dreambench/{subject}/{k:02d}"]
        assert (r["prompt"], r["generic_prompt"]) == (prompt, generic)
        mine = [ref_rows[f"dreambench/{subject}/ref{j}"] for j in range(len(photos[subject]))]
        assert {m["subject_id"] for m in mine} == {r["subject_id"]}
        assert r["ref_png"] == r["target_png"] == mine[0]["ref_png"]
        assert manifest.decode_png(r["ref_png"], r["id"]).shape == (S, S, 3)
        assert len({m["ref_png"] for m in mine}) == len(mine)                    # each photo its own row
    assert sum(1 for i in rows if i.startswith("dreambench/dog6/")) == 25
