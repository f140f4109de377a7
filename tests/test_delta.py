"""Delta integrity (gallop_kernels.delta): damaged or hand-edited files, fingerprints checked after adding,
missing parameters, int64 indices from 2^31 weights. The round trips themselves are in test_finetune.py."""

import json

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels import delta

safetensors_torch = pytest.importorskip("safetensors.torch")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))


def _tuned(model: torch.nn.Module) -> delta.Delta:
    """Select 30% of ``model``'s weights at random, move them by ~1e-2 (as SparseAdamW would), return the delta."""
    sel = gk.select_mask(model, rho=0.3, criterion="random", seed=1)
    base = delta.selected_values(model, sel)
    masks = sel.masks()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn(p.shape) * 1e-2 * masks[n])
    return delta.make_delta(model, sel, base, {"task": "t"})


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, state) -> bool:
    return all(torch.equal(p, state[n]) for n, p in model.named_parameters())


def _raw(path):
    """(tensors, metadata) of a safetensors file, to edit and write back."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _flip_exponent_bit(values: torch.Tensor, at: int) -> None:
    """Flip the highest exponent bit of float32 ``values[at]`` in place: ~1e-2 becomes ~3e36, still finite."""
    bits = values.view(torch.int32)
    bits[at] ^= 1 << 30


@pytest.fixture
def saved(tmp_path):
    """(base model, tuned model, path of the delta between them)."""
    base = _model()
    tuned = _model()
    d = _tuned(tuned)
    path = tmp_path / "d.safetensors"
    delta.save_delta(path, d)
    return base, tuned, path


def test_corrupted_difference_is_refused_and_the_model_left_untouched(saved, tmp_path):
    base, tuned, path = saved
    tensors, meta = _raw(path)
    name = "0.weight.diff"
    exact = set(tensors.get("0.weight.exact_at", torch.zeros(0)).tolist())  # written as stored, not added
    _flip_exponent_bit(tensors[name], next(i for i in range(tensors[name].numel()) if i not in exact))
    assert torch.isfinite(tensors[name]).all() and tensors[name].abs().max() > 1e30
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(tensors, str(bad), metadata=meta)
    d = delta.load_delta(bad)  # finite values: only the tuned fingerprint can tell
    before = _state(base)
    with pytest.raises(delta.DeltaError, match="damaged delta: adding its differences"):
        delta.apply_delta(base, d)
    assert _same(base, before)
    with pytest.raises(delta.DeltaError, match="damaged delta: adding"):
        delta.apply_delta(base, d, force=True)  # force overrides another base, never a damaged file
    assert _same(base, before)
    after = _state(tuned)
    with pytest.raises(delta.DeltaError, match="damaged delta: removing its differences"):
        delta.apply_delta(tuned, d, subtract=True)
    assert _same(tuned, after)
    delta.apply_delta(base, delta.load_delta(path))  # the intact file still applies
    assert _same(base, _state(tuned))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_difference_is_refused_at_load(value, saved, tmp_path):
    _, _, path = saved
    tensors, meta = _raw(path)
    name = next(k for k in tensors if k.endswith(".diff"))
    tensors[name][0] = value
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(delta.DeltaError, match=rf"bad.safetensors: damaged gallop delta: '{name[:-5]}': 1 of its "
                                               r"differences are NaN or Inf"):
        delta.load_delta(bad)


def _edit_meta(key, value):
    def edit(tensors, meta):
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return edit


def _edit_shapes(shape):
    def edit(tensors, meta):
        shapes = json.loads(meta["shapes"])
        shapes[next(iter(shapes))] = shape
        meta["shapes"] = json.dumps(shapes)
    return edit


def _edit_tensor(suffix, change):
    def edit(tensors, meta):
        name = next(k for k in sorted(tensors) if k.endswith(suffix))
        result = change(tensors[name])
        if result is None:
            del tensors[name]
        else:
            tensors[name] = result
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_edit_meta("shapes", "{not json"), "metadata 'shapes' is not valid JSON"),
    (_edit_meta("shapes", "[[16, 8]]"), "metadata 'shapes' must be a JSON dict, got list"),
    (_edit_meta("shapes", None), "metadata 'shapes' is missing"),
    (_edit_meta("info", '"a task"'), "metadata 'info' must be a JSON dict, got str"),
    (_edit_meta("base_fingerprint", None), "metadata 'base_fingerprint' must be a SHA-256 hex digest, got None"),
    (_edit_meta("tuned_fingerprint", "abc"), "metadata 'tuned_fingerprint' must be a SHA-256 hex digest"),
    (_edit_shapes("8x16"), "metadata shape of '0.weight' must be a list of integers >= 0, got '8x16'"),
    (_edit_shapes([8, -16]), "must be a list of integers >= 0"),
    (_edit_shapes([8.0, 16]), "must be a list of integers >= 0"),
    (_edit_shapes([8, True]), "must be a list of integers >= 0"),
    (_edit_shapes([2, 2]), "'0.weight': index out of range for 4 weights"),
    (_edit_tensor(".indices", lambda t: None), "tensor '0.bias.indices' is missing"),
    (_edit_tensor(".diff", lambda t: t[:-1].clone()), "'0.bias': 2 indices but 1 differences"),
    (_edit_tensor(".indices", lambda t: t.float()), "'0.bias': indices must be int32 or int64"),
    (_edit_tensor(".diff", lambda t: t.double()), "'0.bias': differences must be float32"),
    (_edit_tensor(".diff", lambda t: t.reshape(1, -1).clone()),
     "'0.bias': indices, differences and exact values must be 1-D"),
    (_edit_tensor(".indices", lambda t: t.flip(0).clone()), "'0.bias': indices are not strictly increasing"),
    (_edit_tensor(".indices", lambda t: torch.cat([t[:1], t[:-1]])), "'0.bias': indices are not strictly increasing"),
    (_edit_tensor(".indices", lambda t: t - t[0] - 1), "'0.bias': index out of range for 8 weights"),
    (lambda tensors, meta: tensors.update({"stray": torch.zeros(1)}), "tensor 'stray' belongs to no parameter"),
])
def test_malformed_file_is_one_delta_error(edit, needle, saved, tmp_path):
    _, _, path = saved
    tensors, meta = _raw(path)
    assert tensors["0.bias.indices"].numel() == 2  # what the needles count on (seeded)
    edit(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(delta.DeltaError) as info:
        delta.load_delta(bad)
    message = str(info.value)
    assert needle in message and len(message.splitlines()) == 1
    assert message.startswith(f"{bad}: damaged gallop delta: ")


def _with_exact(tmp_path) -> tuple[dict, dict]:
    """(tensors, metadata) of a float32 delta whose weights moved far, so it stores exact values."""
    model = _model()
    sel = gk.select_mask(model, rho=0.5, criterion="random", seed=1)
    base = delta.selected_values(model, sel)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1000)  # across 0 and by x1000: float32 differences round
    path = tmp_path / "exact.safetensors"
    delta.save_delta(path, delta.make_delta(model, sel, base))
    tensors, meta = _raw(path)
    assert any(k.endswith(".exact_at") for k in tensors)
    return tensors, meta


@pytest.mark.parametrize("part, change, needle", [
    ("exact_tuned", lambda t: None, "has only some of exact_at, exact_base and exact_tuned"),
    ("exact_base", lambda t: t[:-1].clone(), "its exact_at, exact_base and exact_tuned differ in length"),
    ("exact_at", lambda t: t.int(), "exact_at int64"),
    ("exact_at", lambda t: t + 10**6, "exact_at points outside its"),
    ("exact_tuned", lambda t: t.long(), "exact values floating point"),
])
def test_malformed_exact_values_are_one_delta_error(part, change, needle, tmp_path):
    tensors, meta = _with_exact(tmp_path)
    name = next(k for k in sorted(tensors) if k.endswith(".exact_at")).removesuffix(".exact_at")
    result = change(tensors[f"{name}.{part}"])
    if result is None:
        del tensors[f"{name}.{part}"]
    else:
        tensors[f"{name}.{part}"] = result
    bad = tmp_path / "bad.safetensors"
    safetensors_torch.save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(delta.DeltaError, match=f"damaged gallop delta: '{name}'.*{needle}"):
        delta.load_delta(bad)


def test_applying_a_delta_twice_is_refused(saved):
    base, tuned, path = saved
    d = delta.load_delta(path)
    delta.apply_delta(base, d)
    with pytest.raises(delta.DeltaError, match="not the base model"):
        delta.apply_delta(base, d)
    assert _same(base, _state(tuned))


def test_a_model_lacking_a_selected_parameter_is_refused(saved):
    _, _, path = saved
    smaller = torch.nn.Sequential(torch.nn.Linear(16, 8))  # no "1.weight", "1.bias"
    before = _state(smaller)
    with pytest.raises(delta.DeltaError, match=r"delta parameter '1\.(weight|bias)' is not in the model"):
        delta.apply_delta(smaller, delta.load_delta(path))
    assert _same(smaller, before)
    sel = gk.select_mask(_model(), rho=0.3, criterion="random", seed=1)
    with pytest.raises(delta.DeltaError, match=r"the selection names parameter '1\.(weight|bias)', which the model"):
        delta.selected_values(smaller, sel)
    base = delta.selected_values(_model(), sel)
    with pytest.raises(delta.DeltaError, match=r"the selection names parameter '1\.(weight|bias)', which the model"):
        delta.make_delta(smaller, sel, base)


@pytest.mark.parametrize("numel, dtype", [(2**31 - 1, torch.int32), (2**31, torch.int64), (2**31 + 7, torch.int64)])
def test_indices_are_int64_from_2_31_weights(numel, dtype, tmp_path):
    """A fake shape (only the delta's two weights are allocated, never the parameter)."""
    indices = torch.tensor([0, numel - 1], dtype=torch.int64)
    fake = delta.TensorDelta((numel,), indices, torch.tensor([0.5, -0.25]), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0), torch.zeros(0))
    d = delta.Delta({"w": fake}, "0" * 64, "1" * 64, {})
    path = tmp_path / "big.safetensors"
    delta.save_delta(path, d)
    tensors, _ = _raw(path)
    assert tensors["w.indices"].dtype == dtype
    loaded = delta.load_delta(path)
    assert loaded.tensors["w"].shape == (numel,)
    assert loaded.tensors["w"].indices.dtype == torch.int64 and loaded.tensors["w"].indices.tolist() == [0, numel - 1]
