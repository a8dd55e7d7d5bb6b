"""The calibration cache (calibration.py), skinny_linear's measured routing (skinny.calibrate) and the
cost curve kept across processes (step.Decoder._tune)."""

import json

import pytest
import torch

from models import tiny_model
from token_recycling import TokenRecycler, calibration, draft, skinny


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(calibration.MODE_ENV, "on")
    return tmp_path / calibration.FILE


def two_shape_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8, bias=False)).eval()


def test_calibrate_keeps_the_rows_before_torch_first_wins():
    # A fake clock: skinny_linear wins up to 6 rows for the wide layer and never for the narrow one.
    def timer(weights, rows, repeats):
        wins_up_to = 6 if weights[0].shape == (32, 16) else 0
        return (1.0, 2.0) if rows <= wins_up_to else (2.0, 1.0)

    table = skinny.calibrate(two_shape_model(), timer=timer)
    assert table == {"float32 32x16": 6, "float32 8x32": 0}


def test_calibrate_stops_at_the_first_loss():
    # Winning again at 16 rows after losing at 8 does not route 8..16 (a noisy size is not trusted).
    def timer(weights, rows, repeats):
        return (2.0, 1.0) if rows == 8 else (1.0, 2.0)

    assert skinny.calibrate(two_shape_model(), timer=timer)["float32 32x16"] == 6


def test_calibrate_times_every_layer_of_a_shape():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    seen = {}

    def timer(weights, rows, repeats):
        seen[tuple(weights[0].shape)] = len(weights)
        return 1.0, 2.0

    skinny.calibrate(model, rows=(1, 2), timer=timer)
    assert seen == {(16, 16): 2, (4, 16): 1}


def test_routed_follows_the_table_per_shape(monkeypatch):
    model = two_shape_model()
    calls = []
    real = torch.ops.token_recycling.skinny_linear.default

    def spy(x, w, b, vectorized):
        calls.append((tuple(w.shape), x.numel() // x.shape[-1]))
        return real(x, w, b, vectorized)

    monkeypatch.setattr(skinny, "_op", lambda: spy)
    table = {"float32 32x16": 3, "float32 8x32": 0}
    with torch.no_grad(), skinny.routed(model, table=table):
        for rows in (1, 3, 4):
            out = model(torch.randn(rows, 16))
            assert out.shape == (rows, 8)
    # The wide layer takes the op up to 3 rows; the narrow one (limit 0) never does.
    assert calls == [((32, 16), 1), ((32, 16), 3)]
    with torch.no_grad(), skinny.routed(model, table={}):  # a shape missing from the table: MAX_ROWS
        model(torch.randn(2, 16))
    assert calls[-2:] == [((32, 16), 2), ((8, 32), 2)]


def test_routing_table_is_measured_once_and_then_read(cache, monkeypatch):
    model = two_shape_model()
    measured = []
    monkeypatch.setattr(skinny, "calibrate", lambda m: measured.append(1) or {"float32 32x16": 4})
    assert skinny.routing_table(model) == {"float32 32x16": 4}
    assert skinny.routing_table(model) == {"float32 32x16": 4}
    assert len(measured) == 1
    entries = json.loads(cache.read_text())
    assert len(entries) == 1 and "skinny_linear routing" in next(iter(entries))
    # Another thread count is another machine setting: measured again.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        skinny.routing_table(model)
    finally:
        torch.set_num_threads(threads)
    assert len(measured) == 2 and len(json.loads(cache.read_text())) == 2


def test_refresh_measures_again_and_off_touches_nothing(cache, monkeypatch):
    model = two_shape_model()
    monkeypatch.setattr(skinny, "calibrate", lambda m: {"float32 32x16": 4})
    skinny.routing_table(model)
    monkeypatch.setattr(skinny, "calibrate", lambda m: {"float32 32x16": 2})
    assert skinny.routing_table(model) == {"float32 32x16": 4}
    monkeypatch.setenv(calibration.MODE_ENV, "refresh")
    assert skinny.routing_table(model) == {"float32 32x16": 2}
    monkeypatch.setenv(calibration.MODE_ENV, "on")
    assert skinny.routing_table(model) == {"float32 32x16": 2}
    cache.unlink()
    monkeypatch.setenv(calibration.MODE_ENV, "off")
    assert skinny.routing_table(model) is None
    assert not cache.exists()


def test_an_unreadable_cache_is_measured_again_and_rewritten(cache, monkeypatch):
    cache.write_text("{ torn")
    monkeypatch.setattr(skinny, "calibrate", lambda m: {"float32 32x16": 4})
    assert skinny.routing_table(two_shape_model()) == {"float32 32x16": 4}
    assert len(json.loads(cache.read_text())) == 1


def test_a_bad_mode_names_the_variable(cache, monkeypatch):
    monkeypatch.setenv(calibration.MODE_ENV, "sometimes")
    with pytest.raises(ValueError, match="TOKEN_RECYCLING_CALIBRATION"):
        skinny.routing_table(two_shape_model())


def test_the_cost_curve_is_kept_for_the_next_process(cache, monkeypatch):
    model = tiny_model("llama")
    timed = []
    real = draft.measure_cost  # the fixed curve of conftest's fixture

    def counting(forward_n, **kw):
        timed.append(1)
        return real(forward_n, **kw)

    monkeypatch.setattr(draft, "measure_cost", counting)
    ids = torch.randint(3, 100, (1, 12))
    first = TokenRecycler(model, skinny_linear=False)
    first.generate(ids, max_new_tokens=6)
    assert len(timed) == 1
    curve = first.drafter.policy.cost.curve
    # A new recycler (as in a new process) starts from the stored curve instead of timing forwards.
    second = TokenRecycler(model, skinny_linear=False)
    second.generate(ids, max_new_tokens=6)
    assert len(timed) == 1
    assert second.drafter.policy.cost.curve.seconds == pytest.approx(curve.seconds)
    assert second.drafter.policy.cost.curve.context == curve.context
    assert any("cost curve; rows=1" in k for k in json.loads(cache.read_text()))
    # Off: measured in every recycler again.
    monkeypatch.setenv(calibration.MODE_ENV, "off")
    TokenRecycler(model, skinny_linear=False).generate(ids, max_new_tokens=6)
    assert len(timed) == 2
