"""Tensor parallel (issue 15): two gloo ranks on CPU, a tiny Llama sharded colwise/rowwise with DTensor (by
``parallelize_module`` and by transformers' ``tp_plan="auto"``), compiled (``backend="eager"``: the compiler
backend is not what is tested) under ``error_on_recompile``; every rank's logits against PEFT's unsharded eager
model through every verb and the pool; failed loads agreed across ranks; plans not handled refused at attach."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import loraswap
from loraswap.testing.synthetic import llama_tp_plan, peft_reference, tiny_llama, write_adapters, write_peft_adapter
from loraswap.tensor_parallel import TensorParallelSlots

WORLD = 2
JOIN_TIMEOUT_S = 300  # the test takes 20-40 s on an idle 2-core machine
# 4 heads and 2 KV heads, both shard over 2 ranks; biases are sharded colwise (Shard(0)) and replicated rowwise
TP_LLAMA = dict(hidden=128, layers=2, vocab=96, attention_bias=True, mlp_bias=True)
# different ranks and targets: colwise only, rowwise only (with LoRA bias), both plus the vocab-sharded embedding
TP_ADAPTERS = {
    "colwise-r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "rowwise-r8-bias": dict(
        r=8, lora_alpha=16, use_rslora=True, lora_bias=True, target_modules=["o_proj", "down_proj"]
    ),
    "all-r16": dict(
        r=16,
        lora_alpha=16,
        target_modules=["embed_tokens", "q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
        rank_pattern={"o_proj": 2},
    ),
}
NAN_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(fn, *args) -> None:
    """``fn(rank, port, *args)`` on WORLD spawned processes; a child's exception fails the test with its traceback."""
    context = mp.start_processes(fn, args=(free_port(), *args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {JOIN_TIMEOUT_S} s")


def with_process_group(rank: int, port: int, check, *args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        check(init_device_mesh("cpu", (WORLD,)), *args)
    finally:
        dist.destroy_process_group()


def sharded_llama(mesh, plan=None):
    return parallelize_module(tiny_llama(**TP_LLAMA), mesh, plan or llama_tp_plan(TP_LLAMA["layers"]))


def nan_on_rank_1(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose layer-0 q_proj lora_B holds a NaN in the rows only rank 1 reads."""
    shutil.copytree(source, target)
    weights = load_file(source / "adapter_model.safetensors")
    weights[NAN_KEY][-1, 0] = float("nan")
    save_file(weights, target / "adapter_model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def tp_workdir(tmp_path_factory) -> Path:
    """Adapters written by PEFT, and the unsharded references: base logits and PEFT's eager logits per adapter."""
    workdir = tmp_path_factory.mktemp("tp")
    base = tiny_llama(**TP_LLAMA)
    base.save_pretrained(workdir / "llama")
    paths = write_adapters(base, workdir, TP_ADAPTERS)
    write_peft_adapter(base, workdir / "over-rank", r=32, target_modules=["q_proj"])
    nan_on_rank_1(paths["colwise-r4"], workdir / "nan-on-rank-1")
    tokens = torch.randint(0, TP_LLAMA["vocab"], (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        references = {name: peft_reference(base, path)(tokens).logits for name, path in paths.items()}
        references["base"] = base(tokens).logits
    torch.save({"tokens": tokens, "logits": references}, workdir / "references.pt")
    return workdir


def attach_and_compile(model, workdir: Path, names=tuple(TP_ADAPTERS)):
    """Check the sharded model's base logits, attach 3 slots and compile; ``expect(*names)`` runs it and checks
    row ``i`` against ``names[i]``'s unsharded reference."""
    saved = torch.load(workdir / "references.pt")
    tokens, ref = saved["tokens"], saved["logits"]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, ref["base"], atol=1e-4, rtol=0)
    paths = [workdir / name for name in names]
    slots = loraswap.attach(model, loraswap.Capacity.for_adapters(paths, model=model, slots=3, max_batch=4))
    assert isinstance(slots, TensorParallelSlots)
    torch._dynamo.reset()  # a second model in this process would recompile the first one's code: start afresh
    compiled = torch.compile(model, backend="eager")

    def expect(*rows: str) -> torch.Tensor:
        with torch.no_grad():
            out = compiled(tokens).logits
        expected = torch.stack([ref[name][row] for row, name in enumerate(rows)])
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
        return out

    return slots, expect, paths


def check_swaps(mesh, workdir: Path) -> None:
    slots, expect, paths = attach_and_compile(sharded_llama(mesh), workdir)
    own = slots.shards.read(paths[2]).layers  # this rank's slices only: colwise lora_B rows, rowwise lora_A columns
    assert own["model.layers.0.self_attn.q_proj"].lora_B.shape == (TP_LLAMA["hidden"] // WORLD, 16)
    assert own["model.layers.0.mlp.down_proj"].lora_A.shape == (16, TP_LLAMA["hidden"])  # intermediate 256 / 2
    assert own["model.embed_tokens"].lora_A.shape == (16, TP_LLAMA["vocab"] // WORLD)  # vocab-parallel

    a, b, c = TP_ADAPTERS
    with torch._dynamo.config.patch(error_on_recompile=True):
        expect("base", "base", "base")  # slot 0 active and empty
        for slot, path in enumerate(paths):
            slots.load(path, slot)
        for slot, name in enumerate(TP_ADAPTERS):
            slots.activate(slot)
            expect(name, name, name)
        slots.route([0, 2, -1])
        expect(a, c, "base")
        slots.load(loraswap.load_adapter(paths[1]), slot=2)  # a whole in-memory adapter, into a slot row 1 reads
        expect(a, b, "base")
        slots.blend({2: 1.0})
        expect(b, b, b)
        slots.route([0, 2, -1])
        slots.unload(slot=0)
        before = expect("base", b, "base")

        with pytest.raises(loraswap.CapacityError, match="rank 0 of 2: .*rank 32 exceeds") as raised:
            slots.load(workdir / "over-rank", slot=1)
        assert (raised.value.rank, raised.value.capacity_rank) == (32, 16)  # the error's own fields, on every rank
        messages = [None] * WORLD
        with pytest.raises(loraswap.NonFiniteError, match="rank 1 of 2: .*q_proj.*lora_B") as raised:
            slots.load(workdir / "nan-on-rank-1", slot=1)
        dist.all_gather_object(messages, str(raised.value))
        assert messages[0] == messages[1]
        assert torch.equal(expect("base", b, "base"), before)

        pool = loraswap.AdapterPool(slots)  # ids are the adapters' paths
        with pool.route([str(paths[0]), None, {str(paths[2]): 1.0}]):
            expect(a, "base", c)
        with pytest.raises(loraswap.NonFiniteError, match="rank 1 of 2"):
            with pool.route([str(workdir / "nan-on-rank-1")]):
                pass
        with pool.route([None, str(paths[2]), str(paths[0])]):
            expect("base", c, a)


def check_transformers_tp_plan(mesh, workdir: Path) -> None:
    """transformers' own ``tp_plan="auto"`` (DTensor weights, styles installed as forwards, the embedding
    vocab-parallel) takes slots the same way."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(workdir / "llama", tp_plan="auto", device_mesh=mesh).eval()
    a, b, c = TP_ADAPTERS
    slots, expect, paths = attach_and_compile(model, workdir)
    slots.prefetch(paths[1]).result()  # this rank's slices, packed into the host cache in the background
    with torch._dynamo.config.patch(error_on_recompile=True):
        for slot, path in enumerate(paths):
            slots.load(path, slot)
        assert slots.cache.hits == 1
        slots.route([1, 2, 0])
        expect(b, c, a)


def check_colwise_embedding(mesh, workdir: Path) -> None:
    """An Embedding sharded colwise (weight Shard(1), output kept sharded): each rank's slice of PEFT's output.
    The file also holds the base embedding (PEFT's ``save_embedding_layers=True``): each rank checks its slice."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(OrderedDict(embed_tokens=torch.nn.Embedding(TP_LLAMA["vocab"], 64)))
    path = write_peft_adapter(base, workdir / f"embedding-{dist.get_rank()}", r=4, target_modules=["embed_tokens"])
    weights = load_file(path / "adapter_model.safetensors")
    weights["base_model.model.embed_tokens.base_layer.weight"] = base.embed_tokens.weight.detach()
    save_file(weights, path / "adapter_model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, TP_LLAMA["vocab"], (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = peft_reference(base, path)(ids).chunk(WORLD, dim=-1)[dist.get_rank()]
    model = parallelize_module(base, mesh, {"embed_tokens": ColwiseParallel()})
    slots = loraswap.attach(model, loraswap.Capacity(max_rank=4, target_modules=["embed_tokens"]))
    slots.load(path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference, atol=1e-5, rtol=0)


def check_refusals(mesh) -> None:
    """Plans loraswap does not handle are refused at attach, naming the layer and its placement."""
    capacity = loraswap.Capacity(max_rank=4, target_modules=["embed_tokens", "q_proj"])
    sequence_parallel = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))}
    placement = r"'model.embed_tokens' \(Embedding, weight placements \(Shard\(dim=0\),\)\) is rowwise.*Shard"
    with pytest.raises(loraswap.ShardingError, match=placement):
        loraswap.attach(sharded_llama(mesh, sequence_parallel), capacity)
    gathered = {"model.layers.0.self_attn.q_proj": ColwiseParallel(output_layouts=Replicate())}
    with pytest.raises(loraswap.ShardingError, match="'model.layers.0.self_attn.q_proj'.*colwise.*Replicate"):
        loraswap.attach(sharded_llama(mesh, gathered), capacity)
    with pytest.raises(loraswap.ShardingError, match="mode='fused'"):
        loraswap.attach(sharded_llama(mesh), capacity, mode="fused")


def check_all(mesh, workdir: Path) -> None:
    check_swaps(mesh, workdir)
    check_transformers_tp_plan(mesh, workdir)
    check_colwise_embedding(mesh, workdir)
    check_refusals(mesh)


def rank_main(rank: int, port: int, workdir: Path) -> None:
    with_process_group(rank, port, check_all, workdir)


def test_tensor_parallel_swaps_match_unsharded_peft(tp_workdir):
    run_ranks(rank_main, tp_workdir)
