"""Parquet manifests: schema, round trip, and the bad rows a reader must refuse by name."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config, manifest
from pipeline.stages import prepare


@pytest.fixture
def rows():
    bench, _ = prepare.bench_rows(config.World(), config.Bench(subjects=3, prompts_per_subject=2))
    return bench


def write(rows, path, schema=manifest.TRIPLET_SCHEMA):
    manifest.write_shards(rows, path, schema, shard_rows=4)


def test_roundtrip_schema_and_images(rows, tmp_path):
    write(rows, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
    t = manifest.read(tmp_path / "m")
    assert t.schema == manifest.TRIPLET_SCHEMA and t.num_rows == 6
    refs = manifest.decode_column(t, "ref_png", "m")
    masks = manifest.decode_column(t, "mask_png", "m")
    assert refs.shape == (6, 32, 32, 3) and refs.dtype == np.uint8 and masks.dtype == bool and masks.any()
    x = manifest.to_float(refs)
    assert x.shape == (6, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(manifest.to_uint8(x), refs)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[2].update(ref_png=b"\x89PNG not really"), r"row id='bench-.*' column 'ref_png'.*cannot be decoded"),
    (lambda r: r[1].update(prompt="  "), r"row id='bench-.*' has an empty 'prompt'"),
    (lambda r: r[3].update(id=r[0]["id"]), r"duplicate id 'bench-"),
    (lambda r: r[0].update(cls=9), r"has cls=9, outside 0..3"),
])
def test_bad_rows_are_refused_by_name(rows, tmp_path, mutate, message):
    mutate(rows)
    write(rows, tmp_path / "m")
    with pytest.raises(config.ConfigError, match=message):
        t = manifest.read(tmp_path / "m")
        manifest.decode_column(t, "ref_png", "m")


def test_missing_column_wrong_type_missing_file(rows, tmp_path):
    table = pa.Table.from_pylist(rows, schema=manifest.TRIPLET_SCHEMA)
    (tmp_path / "a").mkdir()
    pq.write_table(table.drop_columns(["generic_prompt"]), tmp_path / "a" / "shard-00000.parquet")
    with pytest.raises(config.ConfigError, match="missing required column 'generic_prompt'"):
        manifest.read(tmp_path / "a")
    (tmp_path / "b").mkdir()
    bad = table.set_column(table.schema.get_field_index("prompt"), "prompt", pa.array(range(6)))
    pq.write_table(bad, tmp_path / "b" / "shard-00000.parquet")
    with pytest.raises(config.ConfigError, match="column 'prompt' has type int64, expected string"):
        manifest.read(tmp_path / "b")
    with pytest.raises(config.ConfigError, match="not found"):
        manifest.read(tmp_path / "nowhere")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "shard-00000.parquet").write_bytes(b"garbage")
    with pytest.raises(config.ConfigError, match="not a readable Parquet file"):
        manifest.read(tmp_path / "c")


def test_writes_leave_no_temporary_files(rows, tmp_path):
    write(rows, tmp_path / "m")
    assert not [p for p in (tmp_path / "m").iterdir() if ".tmp-" in p.name]


def test_shard_writer_streams_and_prepare_splits_use_it(rows, tmp_path):
    writer = manifest.ShardWriter(tmp_path / "s", manifest.TRIPLET_SCHEMA, shard_rows=4)
    for r in rows[:4]:
        writer.add(r)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["shard-00000.parquet"]   # written before close
    for r in rows[4:]:
        writer.add(r)
    assert [p.name for p in writer.close()] == ["shard-00000.parquet", "shard-00001.parquet"] and writer.rows == 6
    assert manifest.read(tmp_path / "s").column("id").to_pylist() == [r["id"] for r in rows]
    # the prepare stage's stream of (split, row): one writer per split, an empty split still gets its shard
    n = prepare.write_splits(((("a", "b")[i % 2], r) for i, r in enumerate(rows)),
                             {"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"}, shard_rows=2)
    assert n == {"a": 3, "b": 3, "c": 0}
    assert [manifest.read(tmp_path / d).num_rows for d in "abc"] == [3, 3, 0]
    assert len(list((tmp_path / "a").iterdir())) == 2
