"""The memory planner against arithmetic and against a real SparseAdamW's state."""

from dataclasses import replace

import pytest
import torch

import gallop_kernels as gk
from gallop_kernels.distributed import index_dtype
from gallop_kernels.memory import (
    activation_bytes, index_bytes, lora_activation_bytes, markdown, memory_plan, preset_config,
)

transformers = pytest.importorskip("transformers")


def _tiny_config():
    return transformers.LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip


def test_plan_arithmetic_on_a_small_llama():
    cfg = _tiny_config()
    model = transformers.LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    h, i, kv = 48, 80, 2 * 12  # k_proj / v_proj output = kv heads * head_dim
    lora_per_layer = 8 * ((h + h) + (h + kv) + (h + kv) + (h + i) + (i + h))
    full, lora, gallop, compact = memory_plan(cfg, rho=0.05, lora_rank=8, dtype=torch.bfloat16)
    k = round(0.05 * n)
    # full FT: torch AdamW on bf16 weights keeps bf16 state and no master copy
    assert (full.trainable, full.weights, full.gradients, full.optimizer_state, full.master_weights) == (n, 2 * n, 2 * n, 4 * n, 0)
    # LoRA: float32 adapters (peft's default on bf16 models), their gradients and state float32
    assert lora.trainable == 3 * lora_per_layer
    assert (lora.weights, lora.gradients, lora.optimizer_state) == (2 * n + 4 * lora.trainable, 4 * lora.trainable, 8 * lora.trainable)
    # int32 indices: every tensor has fewer than 2^31 weights
    assert (gallop.trainable, gallop.optimizer_state, gallop.master_weights, gallop.index_lists) == (k, 8 * k, 4 * k, 4 * k)
    assert compact.gradients == 4 * k + 2 * 101 * 48  # the embedding is the largest tensor
    assert gallop.estimation == compact.estimation == 2 * n and full.estimation == lora.estimation == 0
    assert gallop.activations == 0  # no batch shape given
    assert gallop.peak == 2 * n + max(2 * n + 8 * k + 4 * k + 4 * k, 2 * n)
    assert compact.peak == 2 * n + 2 * n  # estimation outweighs a compact training step
    assert "| GaLLoP rho=0.05 |" in markdown([gallop])


def test_plan_counts_a_float32_gradient_sum_and_activations():
    cfg = _tiny_config()
    n = memory_plan(cfg)[0].trainable
    _, _, wide, _ = memory_plan(cfg, dtype=torch.bfloat16, grad_accum_dtype=torch.float32)
    assert wide.estimation == 2 * n + 4 * n
    _, _, fp32, _ = memory_plan(cfg, dtype=torch.float32, grad_accum_dtype=torch.float32)
    assert fp32.estimation == 4 * n  # float32 weights: .grad is already the float32 sum
    # per token and layer 7 h + (k and v) + 4 intermediate values; logits in bf16 and twice in fp32
    tokens, layer = 2 * 16, 7 * 48 + 2 * 24 + 4 * 80
    plain = activation_bytes(cfg, 2, 16, torch.bfloat16)
    assert plain == 3 * tokens * layer * 2 + tokens * 101 * (2 + 8)
    ckpt = activation_bytes(cfg, 2, 16, torch.bfloat16, gradient_checkpointing=True)
    assert ckpt == 3 * tokens * 48 * 2 + tokens * layer * 2 + tokens * 101 * (2 + 8)
    rows = memory_plan(cfg, batch_size=2, seq_len=16, dtype=torch.bfloat16)
    assert all(r.activations == plain for i, r in enumerate(rows) if i != 1)
    # LoRA (r=16): per token and layer, each adapted projection's input in float32 (q, k and v each cast
    # their own copy; up: hidden, down: intermediate) and its rank-16 output
    lora_extra = 3 * tokens * 4 * ((48 + 16) * 3 + (48 + 16) + (80 + 16))
    assert rows[1].activations == plain + lora_extra
    assert lora_activation_bytes(cfg, 2, 16, 16, torch.bfloat16, gradient_checkpointing=True) == lora_extra // 3
    assert lora_activation_bytes(cfg, 2, 16, 16, torch.float32) == 3 * tokens * 4 * 5 * 16  # no cast on fp32
    assert rows[0].peak == rows[0].weights + plain + rows[0].training


def test_lora_targets_are_the_trainers():
    from gallop_kernels.finetune import train

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_config()).to(torch.bfloat16)
    peft_model = train.lora_model(model, 8)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == memory_plan(_tiny_config(), lora_rank=8)[1].trainable
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)


def test_measured_optimizer_state_equals_the_plan():
    cfg = _tiny_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    tokens = torch.randint(0, 101, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    for rho in (0.01, 0.1):
        _, _, plan, _ = memory_plan(cfg, rho=rho, dtype=torch.float32)
        sel = gk.select_mask(model, rho=rho)
        opt = gk.SparseAdamW(model.named_parameters(), selection=sel)
        opt.step()
        state = sum(t.numel() * t.element_size() for st in opt.state.values() for key, t in st.items() if key in ("exp_avg", "exp_avg_sq"))
        assert state == plan.optimizer_state == 8 * sel.num_selected
        assert sum(i.numel() * i.element_size() for i in sel.values()) == plan.index_lists
        # the optimizer keeps the selection's own index tensors: no second copy
        assert all(opt.state[p]["indices"] is sel[n] for n, p in model.named_parameters() if sel[n].numel())
        assert plan.master_weights == 0


def test_presets_have_the_papers_sizes():
    llama = memory_plan(preset_config("llama3-8b"))[0]
    gemma = memory_plan(preset_config("gemma-2b"))[0]
    assert llama.trainable == 8_030_261_248
    assert gemma.trainable == 2_506_172_416
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("gpt5")


def test_measured_master_weights_equal_the_plan_for_bf16():
    cfg = _tiny_config()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    tokens = torch.randint(0, 101, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    _, _, plan, _ = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16)
    sel = gk.select_mask(model, rho=0.05)
    opt = gk.SparseAdamW(model.named_parameters(), selection=sel)
    opt.step()

    def held(*keys):
        return sum(t.numel() * t.element_size() for st in opt.state.values() for key, t in st.items() if key in keys)

    assert held("exp_avg", "exp_avg_sq") == plan.optimizer_state
    assert held("master_param") == plan.master_weights == 4 * sel.num_selected


def test_preflight_refuses_what_does_not_fit_and_names_the_fix(monkeypatch):
    from gallop_kernels.finetune import plan
    from gallop_kernels.errors import GallopError
    from gallop_kernels.finetune.train import TrainConfig

    cfg, dtype, cpu = _tiny_config(), torch.bfloat16, torch.device("cpu")
    run = TrainConfig(batch_size=8, max_len=256, rho=0.05)
    need = plan.plan_row(cfg, "gallop", run, dtype).peak
    assert "needs" in plan.preflight(cfg, "gallop", run, dtype, cpu, budget=need)
    with_ckpt = plan.plan_row(cfg, "gallop", TrainConfig(batch_size=8, max_len=256, rho=0.05, gradient_checkpointing=True), dtype).peak
    assert with_ckpt < need
    with pytest.raises(GallopError) as e:
        plan.preflight(cfg, "gallop", run, dtype, cpu, budget=with_ckpt)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "does not fit on cpu" in msg and "short" in msg
    assert "--gradient-checkpointing" in msg and "--batch-size" in msg
    with pytest.raises(GallopError, match="none of --compact-grads"):
        plan.preflight(cfg, "gallop", run, dtype, cpu, budget=1000)
    for method, reselecting in (("spiel", run), ("gallop", replace(run, reselect_every=2))):  # need dense grads
        with pytest.raises(GallopError) as e:
            plan.preflight(cfg, method, reselecting, dtype, cpu, budget=1000)
        assert "--compact-grads" not in str(e.value) and "--gradient-checkpointing" in str(e.value)
    monkeypatch.setenv(plan.BUDGET_ENV, "1KiB")
    assert plan.device_budget(cpu) == (1024, f"${plan.BUDGET_ENV}")
    with pytest.raises(GallopError, match="short"):
        plan.preflight(cfg, "fft", run, dtype, cpu)
    monkeypatch.setenv(plan.BUDGET_ENV, "lots")
    with pytest.raises(GallopError, match="expected bytes"):
        plan.device_budget(cpu)


def test_plan_prints_the_table_and_measures_on_cpu(tmp_path, capsys):
    from gallop_kernels.finetune import cli, plan

    _tiny_config().save_pretrained(tmp_path)
    assert cli.main(["plan", "--model", str(tmp_path), "--device", "cpu", "--batch-size", "2", "--max-len", "16",
                     "--measure", "--measure-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "| full FT (AdamW) | 65,328 |" in out and "| GaLLoP rho=0.01, compact grads |" in out
    for method in plan.MEASURED:
        assert f"| {method} | " in out
    assert cli.main(["plan", "--model", "llama3-8b", "--dtype", "bfloat16", "--batch-size", "1", "--max-len", "512"]) == 0
    assert "| full FT (AdamW) | 8,030,261,248 |" in capsys.readouterr().out


def test_plan_and_lora_on_a_model_without_llama_names():
    from gallop_kernels.finetune import train
    from gallop_kernels.errors import GallopError

    cfg = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    rows = memory_plan(cfg, batch_size=2, seq_len=8)
    assert rows[1].trainable == 0 and rows[0].activations == activation_bytes(cfg, 2, 8)  # no q_proj ... to adapt
    with pytest.raises(GallopError, match="LoRA cannot adapt GPT2LMHeadModel"):
        train.lora_model(transformers.GPT2LMHeadModel(cfg), 8)


def test_python_m_memory_prints_without_runpy_warning():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "gallop_kernels.memory"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert "| llama3-8b, bf16 |" in proc.stdout and "| gemma-2b, bf16 |" in proc.stdout


def test_offloaded_estimation_keeps_two_tensors_gradients_on_the_device():
    cfg = _tiny_config()
    n = memory_plan(cfg)[0].trainable
    largest = 101 * 48  # the embedding (and the head: untied)
    for accum, sum_bytes in ((None, 2), (torch.float32, 4)):
        _, _, gallop, compact = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16, grad_accum_dtype=accum,
                                            offload_grads=True)
        assert gallop.estimation == compact.estimation == 2 * largest * 2  # one being copied out, the next one
        assert gallop.host_estimation == n * sum_bytes + n * 2 + largest * 2  # sums, theta's host copy, staging
    full, lora, _, _ = memory_plan(cfg, offload_grads=True)
    assert full.host_estimation == lora.host_estimation == 0


# FSDP2 on 2 ranks, by hand. _tiny_config: a decoder layer has q, o 48x48, k, v 24x48, gate, up 80x48,
# down 48x80 and two norms of 48: 18,528 weights, every row count even, so its shard is half. The
# embedding and the head (101 x 48, untied: groups of their own) pad to 102 rows: 51 per rank.
LAYER, VOCAB, VOCAB_PADDED, NORM = 18528, 101 * 48, 102 * 48, 48


def test_fsdp2_shards_state_and_counts_what_the_wrapping_gathers():
    cfg = _tiny_config()
    n = 3 * LAYER + 2 * VOCAB + NORM
    shard = (3 * LAYER + 2 * VOCAB_PADDED + NORM) // 2
    full, lora, gallop, compact = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16, world_size=2)
    one = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16)
    assert full.trainable == n == one[0].trainable
    kr = -(-round(0.05 * n) // 2)
    # gathered at most: the root (the final norm, gathered all step) and a layer's all-gather buffer
    # with the unsharded copy made from it
    gathered = NORM + 2 * LAYER
    assert full.weights == gallop.weights == 2 * (shard + gathered)
    assert lora.weights == 2 * (shard + gathered) + 4 * -(-one[1].trainable // 2)
    # backward's peak, in the middle layer: the root and its gradients, the layer, the next one prefetched,
    # the previous one's reduce-scatter input, the layer's gradients
    peak = NORM + NORM + 4 * LAYER
    assert full.gradients == gallop.gradients == gallop.estimation == 2 * (shard + peak - gathered)
    assert full.optimizer_state == 4 * shard
    assert (gallop.optimizer_state, gallop.master_weights, gallop.index_lists) == (8 * kr, 4 * kr, 4 * kr)
    # compact: the hooks free each group's gradient shard; the peak is the same middle layer
    assert compact.gradients == 4 * kr + 2 * (peak - gathered)
    assert lora.optimizer_state == 8 * -(-one[1].trainable // 2)
    assert [r.activations for r in one] == [r.activations for r in (full, lora, gallop, compact)]
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="world_size must be a positive integer"):
            memory_plan(cfg, world_size=bad)


def test_whole_model_phases_count_what_loading_evaluating_and_gathering_hold():
    """The phases outside training, by hand on _tiny_config in bf16 (k = 5% of n). One process loads and
    evaluates the whole model (2n); sparse methods keep the report's selection (int32 indices) and base
    values. Under FSDP2 the model is evaluated sharded (its ``weights``) and the report's selection is
    gathered (int64 indices, base and tuned values); LoRA's model is whole, and its adapters are
    gathered into a reloaded whole copy while the shards (``shard``), one all-gathered tensor (the
    embedding or head, padded to 102 rows) and the sharded adapters' AdamW state exist."""
    cfg = _tiny_config()
    n = 3 * LAYER + 2 * VOCAB + NORM
    shard = (3 * LAYER + 2 * VOCAB_PADDED + NORM) // 2
    k = round(0.05 * n)
    one = memory_plan(cfg, rho=0.05, lora_rank=8, dtype=torch.bfloat16)
    lora = one[1].trainable
    assert [r.evaluation for r in one] == [2 * n, 2 * n, 2 * n + 4 * k + 2 * k, 2 * n + 4 * k + 2 * k]
    assert [r.gathering for r in one] == [0] * 4  # one process trains the model it loaded
    assert [r.peak_phase for r in one] == ["training", "training", "training", "estimation"]
    full, lo, gallop, compact = memory_plan(cfg, rho=0.05, lora_rank=8, dtype=torch.bfloat16, world_size=2)
    sharded = 2 * (shard + NORM + 2 * LAYER)  # the shards, the root and a layer gathered (the training weights)
    assert full.weights == gallop.weights == sharded
    # the selection, base and tuned values are gathered into host memory: nothing of them on the device
    assert [r.evaluation for r in (full, lo, gallop, compact)] == [sharded, 2 * n, sharded, sharded]
    assert full.gathering == gallop.gathering == compact.gathering == 0  # evaluated on the shards
    # the reloaded model and its float32 adapters; the shards, the head all-gathered; the sharded adapters
    # and AdamW's two moments (their gradients freed after training)
    assert lo.gathering == 2 * n + 4 * lora + 2 * shard + 2 * VOCAB_PADDED + (4 + 8) * -(-lora // 2)
    assert lo.peak == lo.gathering and lo.peak_phase == "gathering"
    for row in (full, lo, gallop, compact):
        held = row.weights + row.activations
        assert row.phases == {"estimation": held + row.estimation, "training": held + row.training,
                              "gathering": row.gathering, "evaluation": row.evaluation}
        assert row.peak == max(row.phases.values())
    assert "| gathering |" in markdown([lo]) and "peak in" in markdown([lo])


def test_preflight_refuses_a_run_whose_gathering_does_not_fit(monkeypatch):
    """Under FSDP2 a budget that holds LoRA's training phase but not the reloaded whole model is refused,
    and the message names the phase; the plan per GPU says where the peak is."""
    from gallop_kernels.errors import GallopError
    from gallop_kernels.finetune import plan
    from gallop_kernels.finetune.train import TrainConfig

    cfg, dtype, cpu = _tiny_config(), torch.bfloat16, torch.device("cpu")
    run = TrainConfig(lora_rank=8, batch_size=2, max_len=2)
    row = plan.plan_row(cfg, "lora", run, dtype, world_size=2)
    training = max(row.phases["training"], row.phases["estimation"])
    assert training < row.gathering == row.peak
    with pytest.raises(GallopError, match=r"does not fit on cpu: .*gathering the adapters .*; peak in gathering"):
        plan.preflight(cfg, "lora", run, dtype, cpu, budget=training, world_size=2)
    assert "(peak in gathering)" in plan.preflight(cfg, "lora", run, dtype, cpu, budget=row.peak, world_size=2)


def test_fsdp2_plan_where_the_head_outweighs_the_layers():
    """A 1001-token vocabulary (1002 rows padded) over 2 small layers (2,592 weights, even rows):
    the peaks fall on the embedding and the head; offloaded estimation holds the head's output shard."""
    cfg = transformers.LlamaConfig(vocab_size=1001, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    layer, vocab, padded, norm = 4 * 16 * 16 + 3 * 32 * 16 + 2 * 16, 1001 * 16, 1002 * 16, 16
    shard = (2 * layer + 2 * padded + norm) // 2
    gathered = norm + 2 * padded
    # the embedding's all-gather copy-out, last in backward, while layer 0's reduce-scatter input is held
    plain = norm + norm + 2 * padded + layer
    # with hooks, the head's reduce-scatter: layer 1 prefetched, the head's gradients, its reduce-scatter
    # input and output (the shard the hooks copy out)
    hooked = norm + norm + layer + vocab + padded + padded // 2
    for accum, sum_bytes in ((None, 2), (torch.float32, 4)):
        full, lora, gallop, compact = memory_plan(cfg, rho=0.1, dtype=torch.bfloat16, world_size=2,
                                                  grad_accum_dtype=accum, offload_grads=True)
        kr = -(-round(0.1 * full.trainable) // 2)
        assert full.weights == compact.weights == 2 * (shard + gathered)
        assert full.gradients == 2 * (shard + plain - gathered)
        assert gallop.estimation == compact.estimation == 2 * (hooked - gathered)
        assert compact.gradients == 4 * kr + 2 * (hooked - gathered)
        # per rank: the sums of its shard, its theta shard for the selection, a staging buffer of the head's shard
        assert gallop.host_estimation == sum_bytes * shard + 2 * shard + 2 * padded // 2
    _, _, on_device, _ = memory_plan(cfg, rho=0.1, dtype=torch.bfloat16, world_size=2)
    assert on_device.estimation == 2 * (shard + plain - gathered)
    # tied: the embedding is in the root, gathered all step; the groups are the two layers
    cfg.tie_word_embeddings = True
    root = padded + norm
    full, *_ = memory_plan(cfg, dtype=torch.bfloat16, world_size=2)
    assert full.weights == 2 * ((2 * layer + padded + norm) // 2 + 2 * root)  # the root's own copy-out
    # the root's reduce-scatter at the end: its weights, gradients and reduce-scatter input
    assert full.gradients == 2 * ((2 * layer + padded + norm) // 2 + root + (vocab + norm) + root - 2 * root)


def test_reselection_counts_the_reselectors_float32_sum_and_base_values():
    cfg = _tiny_config()
    n = 3 * LAYER + 2 * VOCAB + NORM
    k = round(0.05 * n)
    _, _, plain, _ = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16)
    _, _, spiel, _ = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16, reselect="spiel")
    _, _, gallop, _ = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16, reselect="gallop")
    assert plain.reselection == 0
    assert spiel.reselection == 4 * n + 2 * k  # the float32 sum; the trained weights' bf16 base values
    assert gallop.reselection == 4 * n + 2 * k + 4 * k  # and the trained set's own int32 indices
    assert gallop.training == plain.training + gallop.reselection
    shard = (3 * LAYER + 2 * VOCAB_PADDED + NORM) // 2
    _, _, sharded, _ = memory_plan(cfg, rho=0.05, dtype=torch.bfloat16, reselect="spiel", world_size=2)
    assert sharded.reselection == 4 * shard + 2 * -(-k // 2)
    with pytest.raises(ValueError, match="reselect must be None, 'gallop' or 'spiel'"):
        memory_plan(cfg, reselect="saft")


def test_plan_row_counts_the_reselector_and_the_world_size():
    from gallop_kernels.errors import GallopError
    from gallop_kernels.finetune import plan
    from gallop_kernels.finetune.train import TrainConfig

    cfg, dtype, cpu = _tiny_config(), torch.bfloat16, torch.device("cpu")
    run = TrainConfig(batch_size=2, max_len=16, rho=0.05)
    reselection = {kind: memory_plan(cfg, rho=0.05, reselect=kind)[2].reselection for kind in ("gallop", "spiel")}
    assert plan.plan_row(cfg, "gallop", run, dtype).reselection == 0
    assert plan.plan_row(cfg, "saft", run, dtype).reselection == 0
    assert plan.plan_row(cfg, "spiel", run, dtype).reselection == reselection["spiel"]
    assert plan.plan_row(cfg, "gallop", replace(run, reselect_every=4), dtype).reselection == reselection["gallop"]
    two = plan.plan_row(cfg, "gallop", run, dtype, world_size=2)
    want = memory_plan(cfg, rho=0.05, batch_size=2, seq_len=16, world_size=2)[2]
    assert two == replace(want, method="gallop rho=0.05")
    assert plan.preflight(cfg, "gallop", run, dtype, cpu, budget=two.peak, world_size=2)
    with pytest.raises(GallopError, match="short"):  # one process holds more
        plan.preflight(cfg, "gallop", run, dtype, cpu, budget=two.peak)
    # --parallel fsdp/ddp deal each batch's rows to the ranks: a GPU holds ceil(batch / ranks) of them, and a
    # smaller --batch-size proposed to fit keeps a row per rank
    assert plan.plan_row(cfg, "gallop", replace(run, batch_size=3), dtype, ranks=2) == plan.plan_row(cfg, "gallop", run,
                                                                                                      dtype)
    lean = replace(run, compact_grads=True, gradient_checkpointing=True)  # the batch is the only fix left
    one_row = plan.needed(plan.plan_row(cfg, "gallop", replace(lean, batch_size=2), dtype, ranks=2), cpu)
    with pytest.raises(GallopError, match=r"it would fit with --batch-size 2$"):
        plan.preflight(cfg, "gallop", replace(lean, batch_size=5), dtype, cpu, budget=one_row, ranks=2)
    with pytest.raises(GallopError, match="use a smaller model or a larger device") as refused:
        plan.preflight(cfg, "gallop", replace(lean, batch_size=2), dtype, cpu, budget=1000, ranks=2)
    assert "a smaller --batch-size" not in str(refused.value)  # one row per rank already


def _saved_bytes(model, tokens) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once; parameters excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=tokens, labels=tokens)
    return sum(seen.values())


def test_lora_keeps_what_the_plan_adds_for_its_float32_adapters():
    """Per decoder layer (the difference between 6 and 3 layers), what LoRA keeps for backward beyond what
    training every weight keeps matches lora_activation_bytes within 10% (it counts an adapter input that
    another op also keeps once more: an upper estimate)."""
    from gallop_kernels.finetune import train

    tokens = torch.randint(0, 101, (2, 16))

    def per_layer(lora: bool) -> int:
        out = []
        for layers in (3, 6):
            torch.manual_seed(0)
            cfg = _tiny_config()
            cfg.num_hidden_layers = layers
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
            out.append(_saved_bytes(train.lora_model(model, 8) if lora else model, tokens))
        return (out[1] - out[0]) // 3

    measured = per_layer(True) - per_layer(False)
    planned = lora_activation_bytes(_tiny_config(), 2, 16, 8, torch.bfloat16) // 3
    assert 0.9 * planned <= measured <= planned, (measured, planned)


@pytest.mark.parametrize("world_size", [1, 8])
def test_llama3_8b_whole_run_fits_in_lora_plus_ten_percent(world_size):
    """The issue's target on the planner (gallop plan --model llama3-8b --batch-size 4 --max-len 512
    --gradient-checkpointing --dtype bfloat16, per GPU of 1 and 8): with the gradient estimated in host
    memory, GaLLoP's peak, estimation included, is within LoRA's + 10%; with the gradient on the device
    it is not."""
    config = preset_config("llama3-8b")
    shape = dict(dtype=torch.bfloat16, batch_size=4, seq_len=512, gradient_checkpointing=True, world_size=world_size)
    _, lora, _, compact = memory_plan(config, offload_grads=True, **shape)
    # the training phases; under FSDP2 LoRA's whole run peaks when its adapters are gathered into a whole copy
    trained = lambda row: max(row.phases["estimation"], row.phases["training"])  # noqa: E731
    assert compact.peak <= 1.10 * lora.peak, (compact.peak / 2**30, lora.peak / 2**30)
    assert trained(compact) <= 1.10 * trained(lora)
    assert trained(memory_plan(config, **shape)[3]) > 1.2 * trained(lora)
    assert (compact.peak_phase, lora.peak_phase) == ("training", "gathering" if world_size > 1 else "training")


def test_plan_command_options_for_offload_and_world_size(capsys):
    from gallop_kernels.finetune import cli

    base = ["plan", "--model", "llama3-8b", "--dtype", "bfloat16", "--batch-size", "1", "--max-len", "64"]
    assert cli.main(base) == 0
    assert "gradient estimated in host memory" in capsys.readouterr().out
    assert cli.main([*base, "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "per GPU of 8 (FSDP2 per decoder layer)" in out and "gradient estimated in host memory" in out
    assert cli.main([*base, "--world-size", "8", "--offload-grads", "off"]) == 0
    assert "host memory" not in capsys.readouterr().out
    for extra, needle in ((["--world-size", "0"], "argument --world-size: expected a number of GPUs"),
                          (["--world-size", "2", "--measure"], "--measure runs on one device")):
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_offload_is_chosen_when_the_device_gradient_does_not_fit(monkeypatch):
    from dataclasses import replace

    from gallop_kernels.errors import GallopError
    from gallop_kernels.finetune import plan
    from gallop_kernels.finetune.train import TrainConfig

    cfg, dtype, cuda = _tiny_config(), torch.bfloat16, torch.device("cuda")  # the budget comes from the variable
    run = TrainConfig(batch_size=2, max_len=16, rho=0.05, compact_grads=True)
    on_device = plan.plan_row(cfg, "gallop", run, dtype).peak
    offloaded = plan.plan_row(cfg, "gallop", replace(run, offload_grads=True), dtype).peak
    assert offloaded < on_device
    monkeypatch.setenv(plan.BUDGET_ENV, str(offloaded))
    assert plan.offload_default(cfg, "gallop", run, dtype, cuda)
    for method in ("lora", "magnitude"):  # no gradient estimated
        assert not plan.offload_default(cfg, method, run, dtype, cuda)
    assert not plan.offload_default(cfg, "gallop", run, dtype, torch.device("cpu"))  # host memory is the device's
    with pytest.raises(GallopError, match="it would fit with --offload-grads on"):
        plan.preflight(cfg, "gallop", run, dtype, cuda)
    monkeypatch.setenv(plan.BUDGET_ENV, str(on_device))
    assert not plan.offload_default(cfg, "gallop", run, dtype, cuda)
    # per GPU under FSDP2: each rank's gradient shard offloaded, chosen and proposed the same way
    on_device, offloaded = (plan.plan_row(cfg, "gallop", replace(run, offload_grads=o), dtype, 2).peak
                            for o in (False, True))
    assert offloaded < on_device
    monkeypatch.setenv(plan.BUDGET_ENV, str(offloaded))
    assert plan.offload_default(cfg, "gallop", run, dtype, cuda, 2)
    with pytest.raises(GallopError, match="it would fit with --offload-grads on"):
        plan.preflight(cfg, "gallop", run, dtype, cuda, world_size=2)
    # on the CPU the host sums count against the same memory
    row = plan.plan_row(cfg, "gallop", replace(run, offload_grads=True), dtype)
    assert plan.needed(row, torch.device("cpu")) == row.peak + row.host_estimation
    assert plan.needed(row, cuda) == row.peak


def test_index_lists_are_int32_below_two_to_the_31_weights():
    """By arithmetic (no 2^31-weight tensor is allocated): int32 indices up to 2^31 - 1 weights,
    int64 from 2^31; the plan counts 4 B per index, 8 B where a tensor needs int64 (at most)."""
    assert index_dtype(2**31 - 1) == torch.int32 and index_dtype(2**31) == torch.int64
    small = {"a": torch.Size([2**16, 2**15 - 1]), "b": torch.Size([7])}  # 2^31 - 2^16 weights
    big = {"a": torch.Size([2**16, 2**15]), "b": torch.Size([7])}  # exactly 2^31
    assert index_bytes(small, 1000) == 4 * 1000
    assert index_bytes(big, 1000) == 8 * 1000  # all 1000 may be in "a"
    assert index_bytes({"a": torch.Size([2**31]), "b": torch.Size([2**20])}, 2**21) == 4 * 2**21 + 4 * 2**21
    sel = gk.Selection({"w": torch.tensor([1, 5])}, {"w": (9,)}, rho=0.2, criterion="gallop", scope="global",
                       threshold=0.0)
    assert sel["w"].dtype == torch.int32
