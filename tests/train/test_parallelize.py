"""parallelize's single-process pieces: activation checkpointing, weight tying through the meta
device, the ternary all-gather's codes and gathered weight, logical data shards, the config."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

from bitnet_train.errors import ConfigError
from bitnet_train.model import build_model, ternary_weight
from bitnet_train.model.bitlinear import fake_quant_weight_ref
from bitnet_train.train.config import compose, to_train_config
from bitnet_train.train.data_shards import (
    ShardedPlan,
    owned_shards,
    per_shard_accum,
    resolve_num_shards,
)
from bitnet_train.train.parallelize import apply_ac
from bitnet_train.train.sharding import resolve_strategy
from bitnet_train.train.ternary_all_gather import pack_ternary, ternarize, unpack_ternary
from tests.conftest import tiny_config
from tests.train.test_trainer import ListPlan


def _step(mode: str):
    model = build_model(tiny_config(), seed=0)
    apply_ac(model, mode)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as flops:
        loss = model(ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, flops.get_total_flops(), list(model.state_dict())


def test_activation_checkpointing_same_gradients_names_and_what_it_recomputes():
    """full and selective checkpointing give the loss and every gradient of no checkpointing,
    under transformers' parameter names; full recomputes each block's matrix products in
    backward, selective keeps them (it recomputes only the elementwise work)."""
    loss, grads, flops, names = _step("none")
    for mode in ("full", "selective"):
        loss_m, grads_m, flops_m, names_m = _step(mode)
        assert names_m == names
        assert torch.equal(loss_m, loss), mode
        for n, g in grads.items():
            assert torch.allclose(grads_m[n], g, rtol=1e-6, atol=1e-9), (mode, n)
        if mode == "full":
            assert flops_m > flops * 1.1  # the blocks' forward products run twice
        else:
            assert flops_m == flops  # products kept, not recomputed
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_ac(build_model(tiny_config()), "some")


def test_a_copy_of_a_checkpointed_model_computes_with_its_own_weights():
    """The DPO reference is a deep copy: its checkpointed blocks must run its own weights."""
    import copy

    model = build_model(tiny_config(), seed=0)
    apply_ac(model, "full")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.model.layers.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    ids = torch.randint(3, 512, (1, 8))
    assert not torch.allclose(twin(ids).logits, model(ids).logits)
    assert twin.model.layers[0].forward.__self__ is twin.model.layers[0]


def test_tied_lm_head_survives_the_meta_device():
    """accelerate's FSDP2 preparation moves the model to the meta device, which unties the
    lm_head, then calls `tie_weights()`: ours re-ties it (the cause of issue 9's divergence)."""
    model = build_model(tiny_config(tie_word_embeddings=True), seed=0)
    model.to("meta")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("shape", [(4, 8), (7, 64), (1, 4)])
def test_ternary_codes_pack_into_two_bits_and_back(shape):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-1, 2, shape, dtype=torch.int8, generator=g)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 4)
    assert torch.equal(unpack_ternary(packed), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_post_all_gather_rebuilds_codes_times_step_by_byte_lookup(dtype):
    """The gathered packed codes become T * (a / m) in the gather's dtype, both into a fresh
    tensor (first gather) and into the storage FSDP2 re-allocates (later gathers)."""
    from bitnet_train.train.ternary_all_gather import TernaryShard

    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-1, 2, (8, 12), dtype=torch.int8, generator=g)
    step = torch.tensor(0.037)
    shard = TernaryShard(torch.zeros(4, 12))
    meta = (step, 8, 12, True)
    value, _ = shard.fsdp_post_all_gather((pack_ternary(codes),), meta, dtype)
    expected = (codes.float() * step).to(dtype)
    assert value.dtype == dtype and torch.equal(value, expected)
    out = torch.full((8, 12), float("nan"), dtype=dtype)
    assert shard.fsdp_post_all_gather((pack_ternary(codes),), meta, dtype, out=out) is None
    assert torch.equal(out, expected)
    # rows that do not split evenly travel as int8 codes padded to the shard shape
    padded = torch.cat([codes, torch.ones(2, 12, dtype=torch.int8)])
    value, _ = shard.fsdp_post_all_gather((padded,), (step, 8, 12, False), dtype)
    assert torch.equal(value, expected)


@pytest.mark.parametrize("density", [1.0, 0.3, 0.0])
def test_gathered_weight_quantizes_to_the_master_weights_codes_and_scale(density):
    """The all-gather carries T = round(W / a) with a = mean |W| over the whole tensor, and
    rebuilds W' = T * a / mean |T|: the BitLinear quantizer maps W' to exactly T * a (codes
    equal, scale within fp32 rounding), whatever the share of zero codes."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g) * 0.02
    if density < 1.0:  # most weights tiny: most codes 0 (all of them at density 0)
        w = torch.where(torch.rand(w.shape, generator=g) < density, w * 10, w * 1e-3)
    codes, a = ternary_weight(w)
    t = ternarize(w, a)  # what each rank computes on its shard, given the whole tensor's a
    assert torch.equal(t, codes)
    m = t.float().abs().mean()
    w_gathered = t.float() * (a / m) if m > 0 else torch.zeros_like(w)
    codes_back, a_back = ternary_weight(w_gathered)
    assert torch.equal(codes_back, codes)
    if m > 0:
        assert float(a_back) == pytest.approx(float(a), rel=1e-6)
        assert torch.allclose(fake_quant_weight_ref(w_gathered), codes.float() * a, rtol=1e-6)


def test_logical_data_shards_split_and_interleave():
    assert owned_shards(1, 2, 4) == [1, 3] and owned_shards(0, 1, 2) == [0, 1]
    with pytest.raises(ConfigError, match="divides 4"):
        owned_shards(0, 3, 4)
    assert per_shard_accum(4, 1, 2) == 2
    with pytest.raises(ConfigError, match="multiple of 2"):
        per_shard_accum(3, 1, 2)
    assert resolve_num_shards(0, 4, None) == 4 and resolve_num_shards(0, 1, 2) == 2
    with pytest.raises(ConfigError, match="data_shards"):
        resolve_num_shards(3, 1, 2)
    # shard s's i-th micro-batch is {"s": s, "i": i}: one process reading shards 0 and 1
    plans = {s: ListPlan([[{"s": s, "i": i} for i in range(2)]]) for s in (0, 1)}
    plan = ShardedPlan(plans, num_shards=2, per_shard=2)
    got = [(b["s"], b["i"]) for b in plan.batches_for_step(0, 4)]
    assert got == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_parallel_config_and_strategy():
    with pytest.raises(Exception, match="strategy"):
        to_train_config(compose(["parallel.strategy=zero3"]))
    with pytest.raises(Exception, match="activation_checkpointing"):
        to_train_config(compose(["trainer.activation_checkpointing=some"]))
    cfg = to_train_config(compose(["parallel.strategy=fsdp2", "parallel.ternary_all_gather=true"]))
    assert cfg.parallel.strategy == "fsdp2" and cfg.parallel.param_dtype == "float32"
    acc = Accelerator(cpu=True)  # a plain (not FSDP) launch
    assert resolve_strategy("auto", acc) == "ddp"
    assert resolve_strategy("fsdp2", acc) == "fsdp2"


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "fsdp2_two_nodes"])
def test_accelerate_configs_launch_what_they_say(name, monkeypatch):
    """bitnet_train/configs/accelerate/*.yaml through accelerate's own launch parsing: the
    environment it hands the processes selects our FSDP2 (or DDP), with nothing of
    accelerate's FSDP that bitnet-train would refuse (its activation checkpointing, offload,
    model loading)."""
    from pathlib import Path

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import CPUOffloadPolicy

    import bitnet_train

    config = Path(bitnet_train.__file__).parent / "configs" / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    if name == "ddp":
        assert "ACCELERATE_USE_FSDP" not in env and args.num_processes == 8
        return
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert args.num_processes == (16 if name == "fsdp2_two_nodes" else 8)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and not plugin.activation_checkpointing
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    assert not plugin.cpu_ram_efficient_loading


def test_a_parameter_no_optimizer_holds_stops_the_run():
    """What accelerate's FSDP2 preparation did to the untied lm_head: trained with no
    optimizer, it would stay at its random init; the run refuses to start, naming it."""
    from bitnet_train.errors import TrainingError
    from bitnet_train.train.trainer import check_optimizer_covers

    model = build_model(tiny_config(tie_word_embeddings=False), seed=0)
    check_optimizer_covers(model, torch.optim.AdamW(model.parameters()))
    held = [p for n, p in model.named_parameters() if n != "lm_head.weight"]
    with pytest.raises(TrainingError, match="lm_head.weight"):
        check_optimizer_covers(model, torch.optim.AdamW(held))
