"""estimate_gradients: offloaded estimation (host sums fed by hooks) against the on-device sums it replaces."""

import weakref

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels.estimate import estimate_gradients

transformers = pytest.importorskip("transformers")


def _tiny_llama(dtype, device="cpu", tie=True, layers=2, hidden=32, vocab=64):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                                   intermediate_size=48 if hidden == 32 else 2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _batches(n=3, vocab=64, seq=12):
    gen = torch.Generator().manual_seed(5)
    return [{"input_ids": t, "labels": t} for t in (torch.randint(0, vocab, (2, seq), generator=gen) for _ in range(n))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 and 0.0 differ): bit-for-bit equality, not value equality."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def _assert_same_estimate(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
        assert torch.equal(_bits(got[n].cpu()), _bits(want[n].cpu())), f"{n}: offloaded sum differs"


def _assert_same_selection(got, want) -> None:
    assert list(got) == list(want) and got.threshold == want.threshold
    for n in want:
        assert torch.equal(got[n], want[n]), n
        assert got[n].device == want[n].device, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("accum", [None, torch.float32], ids=["accum-param", "accum-float32"])
def test_offloaded_estimation_equals_on_device(dtype, accum):
    model = _tiny_llama(dtype)
    want = estimate_gradients(model, _batches(), accum_dtype=accum)
    got = estimate_gradients(model, _batches(), accum_dtype=accum, offload=True)
    _assert_same_estimate(got, want)
    assert all(p.grad is None for p in model.parameters())
    _assert_same_selection(gk.select_mask(model, got, rho=0.05), gk.select_mask(model, want, rho=0.05))


def test_offloaded_estimation_holds_one_dense_gradient_during_backward():
    """When a parameter's gradient arrives (a hook that runs before it is accumulated), count the
    parameters still holding one: none with offload, every earlier one without."""
    def most_alive(offload: bool) -> tuple[int, int]:
        model = _tiny_llama(torch.float32, tie=False)
        params = list(model.parameters())
        most = [0]

        def watch(grad):
            most[0] = max(most[0], 1 + sum(p.grad is not None for p in params))

        handles = [p.register_hook(watch) for p in params]
        estimate_gradients(model, _batches(n=2), offload=offload)
        for h in handles:
            h.remove()
        return most[0], len(params)

    assert most_alive(offload=True)[0] == 1
    most, n = most_alive(offload=False)
    assert most == n + 1  # in the second batch every .grad of the first is still there


class _Scale(torch.nn.Module):
    """loss = sum(w * x): the gradient of w is x itself, -0.0 included."""

    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, dtype=dtype))

    def forward(self, x):
        return type("Out", (), {"loss": (self.w * x).sum()})()


@pytest.mark.parametrize("accum", [None, torch.float32], ids=["accum-param", "accum-float32"])
def test_offloaded_sums_keep_the_sign_of_zero(accum):
    """On the device the first gradient is stored as it is (-0.0 stays -0.0) while a float32 sum
    starts from +0.0 (-0.0 becomes +0.0): the host sums must do the same, bit for bit."""
    x = torch.tensor([-0.0, 0.0, -1.0, 2.0], dtype=torch.bfloat16)
    model = _Scale(torch.bfloat16)
    want = estimate_gradients(model, [{"x": x}], accum_dtype=accum)
    got = estimate_gradients(model, [{"x": x}], accum_dtype=accum, offload=True)
    assert bool(want["w"][0].signbit()) == (accum is None)
    _assert_same_estimate(got, want)


def test_offloaded_estimation_takes_a_loss_callable():
    """loss= (a trainer's own loss) and offload=True together: the same sums as on the device."""
    model = _tiny_llama(torch.float32)
    loss = lambda batch: model(**batch).loss  # noqa: E731
    want = estimate_gradients(model, _batches(), loss=loss)
    _assert_same_estimate(estimate_gradients(model, _batches(), loss=loss, offload=True), want)


def test_offload_must_be_a_bool():
    with pytest.raises(TypeError, match="offload must be True or False"):
        estimate_gradients(_tiny_llama(torch.float32), _batches(n=1), offload="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_offloaded_estimation_on_cuda_equals_on_device_and_keeps_gradients_off_it(dtype):
    """Host sums (side-stream copies, worker-thread adds) equal the on-device sums bit for bit, the
    Selection made from them on the host equals the one made on the device, and the device's peak
    during backward grows by a few tensors' gradients instead of the whole model's."""
    model = _tiny_llama(dtype, "cuda", layers=6, hidden=256, vocab=1024)
    batches = _batches(vocab=1024, seq=8)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert grad_bytes > 8 * largest

    def extra_peak(offload):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads = estimate_gradients(model, batches, offload=offload)
        torch.cuda.synchronize()
        return grads, torch.cuda.max_memory_allocated() - base

    want, on_device = extra_peak(False)
    got, offloaded = extra_peak(True)
    assert all(g.device.type == "cpu" and g.is_pinned() for g in got.values())
    _assert_same_estimate(got, want)
    assert on_device >= grad_bytes
    assert offloaded < 4 * largest + grad_bytes // 4, (offloaded, largest, grad_bytes)
    _assert_same_selection(gk.select_mask(model, got, rho=0.05), gk.select_mask(model, want, rho=0.05))
    # restricted selections score host gradients on the host too (among/exclude moved there)
    first = gk.select_mask(model, want, rho=0.05)
    for kw in (dict(k=50, among=first), dict(rho=0.05, exclude=first)):
        _assert_same_selection(gk.select_mask(model, got, **kw), gk.select_mask(model, want, **kw))
