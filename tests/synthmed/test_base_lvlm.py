"""The tiny base LVLM's builder: vocabulary, determinism, build reuse, refusals, evaluation items.

The default build itself (probes, format, grounding, reload, the positive control) is checked
on a real `medalign prepare` build in ``test_prepared_build.py``."""

from __future__ import annotations

import pytest
import torch

from medalign_platform.core.student import load_student
from medalign_platform.synthmed.base_lvlm import (base_lvlm_words, ensure_base_lvlm, pretrain_base_lvlm,
                                                  select_eval_items)
from medalign_platform.synthmed.generator import SYNTHMED_WORDS, ensure_synthmed, pretrain_file

# A small SynthMed: the determinism check runs a few steps, so the default sizes would only
# cost generation time.
SYNTHMED_SIZES = {"n_train": 200, "n_val": 40, "n_test": 0}


@pytest.fixture(scope="module")
def synthmed_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_lvlm") / "synthmed"
    ensure_synthmed(root, seed=0, progress=False, **SYNTHMED_SIZES)
    return root


def test_vocabulary_has_every_prompt_word():
    words = base_lvlm_words()
    assert set(SYNTHMED_WORDS) <= set(words) and {"user", "assistant"} <= set(words)
    assert len(words) == len(set(words))


@pytest.mark.slow
def test_pretraining_is_deterministic_given_the_seed(synthmed_dir, tmp_path):
    runs = [pretrain_base_lvlm(synthmed_dir, tmp_path / name, steps=5, batch_size=8, vision_steps=5, val_questions=0,
                               progress=False) for name in ("a", "b")]
    other = pretrain_base_lvlm(synthmed_dir, tmp_path / "c", seed=1, steps=5, batch_size=8, vision_steps=5, val_questions=0,
                               progress=False)
    (a, _), (b, _), (c, _) = (load_student(path) for path in (*runs, other))
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert any(not torch.equal(state_a[n], state_c[n]) for n in state_a), "the seed must matter"
    # ensure_base_lvlm reuses a matching build instead of training again.
    stamp = (runs[0] / "model.safetensors").stat().st_mtime_ns
    ensure_base_lvlm(synthmed_dir, runs[0], steps=5, batch_size=8, vision_steps=5, val_questions=0, progress=False)
    assert (runs[0] / "model.safetensors").stat().st_mtime_ns == stamp


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(FileNotFoundError, match="ensure_synthmed"):
        pretrain_base_lvlm(data, tmp_path / "out", progress=False)
    for split in ("train", "val"):
        (data / pretrain_file(split)).write_text("[]")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a base-LVLM build"):
        pretrain_base_lvlm(data, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "foreign"]   # nothing left behind


def test_select_eval_items_is_even_and_seed_free():
    class Item:
        def __init__(self, i, kind):
            self.i, self.answer_type = i, kind

    class Data:
        items = [Item(i, "closed" if i % 3 else "report") for i in range(30)]

    chosen = select_eval_items(Data, 5)
    picked = [c.i for c in chosen]
    assert len(set(picked)) == 5 and picked == sorted(picked) and picked[0] == 1 and picked[-1] == 29
    assert all(c.answer_type == "closed" for c in chosen)
    assert select_eval_items(Data, 5) == chosen and len(select_eval_items(Data, 100)) == 20
