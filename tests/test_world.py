"""The embedded world: deterministic, prompts without identity details, train and bench disjoint."""
import dataclasses
import hashlib

import numpy as np

from pipeline import config, manifest, world
from pipeline.stages import prepare

IDENTITY_WORDS = {*world.BODY_COLORS, *world.PATTERNS, *world.PATTERN_COLORS, *world.MARK_COLORS, "mark", "with"}


def test_the_field_tables_match_the_dataclasses():
    assert list(world.SUBJECT_FIELDS) == [f.name for f in dataclasses.fields(world.Subject)]
    assert list(world.CONTEXT_ATTRS) == [f.name for f in dataclasses.fields(world.Context)]
    assert set(world.IDENTITY_ATTRS) <= set(world.SUBJECT_FIELDS)


def test_with_other_value_changes_exactly_that_field_to_any_other_value():
    rng = np.random.default_rng(0)
    objs = world.sample_subjects(rng, 20) + [world.sample_context(rng) for _ in range(20)]
    for obj in objs:
        fields = [f.name for f in dataclasses.fields(obj)]
        for field in fields:
            seen = set()
            for _ in range(40):
                m = world.with_other_value(obj, field, rng)
                assert [f for f in fields if getattr(m, f) != getattr(obj, f)] == [field]
                seen.add(getattr(m, field))
            assert seen == set(range(len(world.FIELDS[field]))) - {getattr(obj, field)}, field


def test_other_values_lists_each_other_value_once_from_the_drawn_one_on():
    rng = np.random.default_rng(1)
    for obj in world.sample_subjects(rng, 10) + [world.sample_context(rng) for _ in range(10)]:
        for field in (f.name for f in dataclasses.fields(obj)):
            n, own = len(world.FIELDS[field]), getattr(obj, field)
            state = rng.bit_generator.state
            first = world.with_other_value(obj, field, rng)
            rng.bit_generator.state = state
            values = [getattr(m, field) for m in world.other_values(obj, field, rng)]
            assert values[0] == getattr(first, field)                      # the same one draw
            assert sorted(values) == [v for v in range(n) if v != own], field
            assert all((b - a) % n in (1, 2) for a, b in zip(values, values[1:]))   # next ones, own skipped


def test_renders_are_a_pure_function_of_the_seed():
    def draw(seed):
        rng = np.random.default_rng(seed)
        s, c = world.sample_subject(rng), world.sample_context(rng)
        return world.render(s, c, 32, (0.5, -1.0))[0], world.render(s, c, 32, reference=True)[0]
    a, b, c = draw(3), draw(3), draw(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_reference_is_the_subject_alone_on_a_plain_background_at_its_target_size():
    rng = np.random.default_rng(0)
    s = world.sample_subject(rng)
    for size in range(len(world.SIZES)):
        ctx = world.Context(background=0, position=0, size=size)
        ref, ref_mask = world.render(s, ctx, 32, reference=True)
        tgt, tgt_mask = world.render(s, ctx, 32)
        assert (ref[~ref_mask] == world.REFERENCE_BACKGROUND).all()
        assert abs(int(ref_mask.sum()) - int(tgt_mask.sum())) <= 0.2 * tgt_mask.sum()   # same scale
    assert world.render(s, world.Context(0, 0, 1), 32)[1].sum() > world.render(s, world.Context(0, 0, 0), 32)[1].sum()


def test_every_identity_detail_changes_the_render():
    base = world.Subject(cls=0, body_color=0, pattern=0, pattern_color=0, pattern_scale=0, pattern_angle=0,
                         mark_corner=0, mark_color=0)
    ctx = world.Context(0, 1, 1)
    img = world.render(base, ctx)[0]
    for field in ("cls", "body_color", "pattern", "pattern_color", "pattern_scale", "pattern_angle", "mark_corner",
                  "mark_color"):
        other = world.Subject(**{**base.__dict__, field: 1})
        assert not np.array_equal(world.render(other, ctx)[0], img), field


def test_prompts_name_class_and_context_but_no_identity_detail():
    rng = np.random.default_rng(1)
    for _ in range(200):
        s, c = world.sample_subject(rng), world.sample_context(rng)
        words = set(world.prompt(s, c).split())
        assert s.class_name in words and not words & IDENTITY_WORDS
        assert tuple(world.SIZES)[c.size] in words
        assert world.generic_prompt(s) == f"a photo of a {s.class_name}"
        assert set(world.caption(s, c).split()) <= set(world.vocabulary())


def test_train_bench_and_validation_subjects_are_disjoint():
    w, b = config.World(), config.Bench(subjects=40, prompts_per_subject=2, val_subjects=40)
    bench, keys = prepare.bench_rows(w, b)
    val, val_keys = prepare.bench_rows(w, b, "val", exclude=keys)
    assert len(val_keys) == 40 and not val_keys & keys and val[0]["id"].startswith("val-")
    train = prepare.train_rows(w, config.Prepare(train_subjects=300, targets_per_subject=1), keys | val_keys)
    attrs = ("cls", "body_color", "pattern", "pattern_color", "pattern_scale", "pattern_angle", "mark_corner",
             "mark_color")
    train_keys = {tuple(r[a] for a in attrs) for r in train}
    assert len(keys) == 40 and len(train_keys) == 300 and not train_keys & (keys | val_keys)
    assert len(bench) == 80 and len({r["id"] for r in bench}) == 80
    # another bench seed gives other subjects
    _, keys2 = prepare.bench_rows(w, config.Bench(seed=1, subjects=40))
    assert keys2 != keys


def _digest(rows) -> str:
    """md5 of a manifest's ids, prompts, labels and decoded pixels (independent of the PNG encoder)."""
    h = hashlib.md5()
    for r in rows:
        h.update(repr((r["id"], r["prompt"], r["generic_prompt"], *(r[k] for k in world.FIELDS))).encode())
        for c in ("ref_png", "target_png", "mask_png"):
            h.update(manifest.decode_png(r[c], r["id"]).tobytes())
    return h.hexdigest()


def test_exact_pairs_are_the_training_rows_written_before_imperfect_pairs_existed():
    # pinned from the code before `prepare.target_mismatch` (4175f6f), jitter on so that every world draw counts
    rows = prepare.train_rows(config.World(jitter=1.5), config.Prepare(train_subjects=20, targets_per_subject=2), set())
    assert _digest(rows) == "005e443fc0bb9a9f89e96a4f2af91991"


def test_imperfect_pairs_change_one_named_detail_of_some_targets_and_nothing_else():
    w, kw = config.World(), dict(train_subjects=200, targets_per_subject=2)
    exact = prepare.train_rows(w, config.Prepare(**kw), set())
    noisy = prepare.train_rows(w, config.Prepare(**kw, target_mismatch=0.25,
                                                 mismatch_fields=["mark_corner", "pattern"]), set())
    changed = {"mark_corner": 0, "pattern": 0}
    for e, n in zip(exact, noisy, strict=True):
        # the reference, the prompts and the context are the exact pair's; the labels are what the target shows
        assert (n["id"], n["ref_png"], n["prompt"], n["generic_prompt"]) == (
            e["id"], e["ref_png"], e["prompt"], e["generic_prompt"])
        assert all(n[a] == e[a] for a in world.CONTEXT_ATTRS)
        diff = [f for f in world.SUBJECT_FIELDS if n[f] != e[f]]
        assert diff in ([], ["mark_corner"], ["pattern"])
        assert (n["target_png"] != e["target_png"]) == bool(diff)
        if diff != ["mark_corner"]:                           # the mask is body and mark: a pattern keeps it
            assert n["mask_png"] == e["mask_png"]
        for f in diff:
            changed[f] += 1
    assert 60 <= sum(changed.values()) <= 140                 # about a quarter of 400
    assert min(changed.values()) >= 25                        # both fields are drawn


def test_an_imperfect_target_never_shows_an_excluded_identity():
    w, p = config.World(), config.Prepare(train_subjects=5, targets_per_subject=20, target_mismatch=1.0,
                                          mismatch_fields=["mark_corner"])
    exact = prepare.train_rows(w, dataclasses.replace(p, target_mismatch=0.0), set())[0]
    subject = world.Subject(**{f: exact[f] for f in world.SUBJECT_FIELDS})
    drawn = prepare.train_rows(w, p, set())[0]["mark_corner"]          # the first target's near miss
    others = [c for c in range(len(world.MARK_CORNERS)) if c != subject.mark_corner]
    near = {c: dataclasses.replace(subject, mark_corner=c).key for c in others}
    # excluding the drawn near miss moves that target to another corner that is not excluded, not to the subject's
    rows = prepare.train_rows(w, p, {near[drawn]})
    assert rows[0]["mark_corner"] not in (drawn, subject.mark_corner)
    assert all(tuple(r[f] for f in world.SUBJECT_FIELDS) != near[drawn] for r in rows)
    # every near miss excluded: the target stays exact
    assert prepare.train_rows(w, p, set(near.values()))[0]["mark_corner"] == subject.mark_corner
