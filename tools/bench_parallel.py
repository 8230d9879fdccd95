"""LiteAttention under Ulysses sequence parallelism on P GPUs against one GPU (issue 16).

    torchrun --nproc-per-node 2 tools/bench_parallel.py                 # 2 GPUs, NCCL
    torchrun --nproc-per-node 1 tools/bench_parallel.py                 # P = 1, the same NCCL code path
    torchrun --nproc-per-node 2 tools/bench_parallel.py --device cpu --small   # smoke test, gloo
    options: --parts correctness,layer,graph,wan,step  --steps 10  --out benchmarks/parallel_h200

NVLink multicast stays off (the device notes ask for it): this script sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 itself, before torch is imported.

Parts (every rank runs every part; rank 0 prints and writes <out>/P<P>.json):
  correctness  the standalone op (UlyssesLiteAttention) at 32760x12x128 and 75600x40x128 bf16,
               local (3-D grid) q/k sharpening from call to call, threshold -10, --steps calls:
               each rank's output shard and skip state against a single-GPU LiteAttention over all
               heads on the full inputs (same data, computed on the same rank): max |diff| of the
               outputs, whether the states are bit-identical, live fraction per call.
  layer        one attention layer at forced live fractions 1 / 0.5 / 0.25 (threshold -inf, so the
               live set stays fixed): time of the q/k/v all-to-all, of LiteAttention on the head
               shard, of the output all-to-all, of the whole Ulysses call, of cuDNN SDPA on the head
               shard, and, on one GPU, of LiteAttention / cuDNN over all heads. Times are the max
               over ranks of the median of CUDA-event timings. "a2a share" = both all-to-alls over
               the whole call: where it passes 0.5 the communication dominates.
  graph        CUDA-graph capture of one Ulysses call (NCCL all-to-alls + the op) at the first shape:
               --steps replays against an eager twin (output and state identical?), replay vs eager ms.
  wan          diffusers WanTransformer3DModel, Wan2.1-1.3B config, 480p (32760 tokens), random
               weights made local by construction (q, k nearly constant over tokens, to_k tied to
               to_q: RoPE's relative-position kernel), bf16: --steps forwards single-GPU vs
               diffusers context parallelism (Ulysses degree P), LiteAttention on both: output
               max |diff| and how many state words differ from the matching heads (bf16 GEMMs over
               a sequence shard may round differently, so a few decisions can flip: reported, not
               assumed).
  step         the same Wan with its own random weights: whole forward time, 1 GPU vs P GPUs,
               dense cuDNN (backend "_native_cudnn") vs LiteAttention at forced live fractions,
               and the scaling efficiency t_1 / (P * t_P). P = 1: the P-GPU rows are skipped
               (diffusers needs a degree > 1).
"""

from __future__ import annotations

import os

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_key] = _value      # forced, not defaulted: multicast must stay off on the lent machines

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import liteattn_ops  # noqa: E402
from liteattn_ops.core.state import pack_bits  # noqa: E402
from liteattn_ops.core.tiling import num_tiles, tile_shape  # noqa: E402
from liteattn_ops.parallel import UlyssesLiteAttention, heads_to_seq, seq_to_heads  # noqa: E402
from liteattn_ops.testing import forced_live, local_qkv  # noqa: E402

SHAPES = [(32760, 12, 128), (75600, 40, 128)]
SMALL_SHAPES = [(1024, 4, 64)]
GRIDS = {32760: (21, 30, 52), 75600: (21, 45, 80), 1024: (4, 16, 16)}
FRACTIONS = (1.0, 0.5, 0.25)
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                rope_max_seq_len=1024)
WAN_SMALL = dict(WAN_1_3B, num_attention_heads=4, attention_head_dim=64, text_dim=32, freq_dim=32, ffn_dim=64,
                 num_layers=2, in_channels=4, out_channels=4, rope_max_seq_len=64)
LATENTS = {"480p": (1, 16, 21, 60, 104), "small": (1, 4, 1, 32, 64)}


# ------------------------------------------------------------------------------------------------
# Set-up and timing
# ------------------------------------------------------------------------------------------------

def setup(device_kind: str):
    if device_kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1    # diffusers 0.42 divides by it (0 without an accelerator)
    return torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device, iters: int, warmup: int = 2) -> float:
    """Median time of fn() in ms over `iters` calls, every rank aligned by a barrier first; the
    result is the max over ranks (a collective is as slow as its slowest rank)."""
    for _ in range(warmup):
        fn()
    sync(device)
    dist.barrier()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    value = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def shard(t, rank, world, dim=2):
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size).contiguous()


def force_state(state, fraction, heads_total, head_offset, seq, head_dim, dtype, gen):
    """Fill `state` (B, h, Mt, W) with the forced live set of heads [offset, offset+h) of a
    (B, heads_total, Mt, Nt) pattern drawn from `gen` (the same on every rank)."""
    batch, heads, m_tiles, _ = state.shape
    n_tiles = num_tiles(seq, tile_shape(head_dim, dtype)[1])
    mask = forced_live(batch, heads_total, m_tiles, n_tiles, fraction, "balanced", gen)
    state.copy_(pack_bits(mask[:, head_offset:head_offset + heads].to(state.device), fill=False))


def sdpa_cudnn(q, k, v):
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------

def part_correctness(args, device, rank, world, dtype):
    rows = []
    for seq, heads, head_dim in args.shapes:
        gen = torch.Generator().manual_seed(0)
        q0, k, v = local_qkv(GRIDS[seq], 1, heads, head_dim, dtype=dtype, device=device, generator=gen)
        ulysses = UlyssesLiteAttention(threshold=-10.0)
        single = liteattn_ops.LiteAttention(threshold=-10.0)
        h = heads // world
        per_call = []
        with torch.no_grad():
            for step in range(args.steps):
                q = q0 * (1 + 0.05 * step)          # sharpening, as denoising does: more tiles drop
                ref = single(q, k, v)
                out = ulysses(shard(q, rank, world), shard(k, rank, world), shard(v, rank, world))
                diff = (out.float() - shard(ref, rank, world).float()).abs().max()
                same = torch.equal(ulysses.state, single.state[:, rank * h:(rank + 1) * h])
                flags = torch.tensor([float(diff), 0.0 if same else 1.0], dtype=torch.float64, device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                per_call.append({"step": step, "max_abs_diff": float(flags[0]), "states_identical": flags[1] == 0,
                                 "live_fraction": float(single.live_fraction())})
        rows.append({"shape": [seq, heads, head_dim], "calls": per_call})
        del q0, k, v, ref, out
    return rows


def part_layer(args, device, rank, world, dtype):
    rows = []
    group = dist.group.WORLD
    for seq, heads, head_dim in args.shapes:
        gen = torch.Generator().manual_seed(1)
        full = [torch.randn(1, heads, seq, head_dim, generator=gen).to(device, dtype) for _ in range(3)]
        q, k, v = (shard(t, rank, world) for t in full)
        ulysses = UlyssesLiteAttention(threshold=float("-inf"))
        single = liteattn_ops.LiteAttention(threshold=float("-inf"))
        with torch.no_grad():
            ulysses(q, k, v)            # sizes the state of the head shard
            single(*full)
            qh, kh, vh = seq_to_heads((q, k, v), world, group)
            for fraction in FRACTIONS:
                force_state(ulysses.state, fraction, heads, rank * (heads // world), seq, head_dim, dtype,
                            torch.Generator().manual_seed(2))
                force_state(single.state, fraction, heads, 0, seq, head_dim, dtype, torch.Generator().manual_seed(2))
                out_h, _ = torch.ops.liteattn.sparse_attention(qh, kh, vh, ulysses.state,
                                                               ulysses.threshold_per_head, None, None, None)
                t = {
                    "a2a_qkv_ms": timed_ms(lambda: seq_to_heads((q, k, v), world, group), device, args.iters),
                    "attention_ms": timed_ms(lambda: torch.ops.liteattn.sparse_attention(
                        qh, kh, vh, ulysses.state, ulysses.threshold_per_head, None, None, None), device, args.iters),
                    "a2a_out_ms": timed_ms(lambda: heads_to_seq(out_h, world, group), device, args.iters),
                    "ulysses_call_ms": timed_ms(lambda: ulysses(q, k, v), device, args.iters),
                    "cudnn_head_shard_ms": timed_ms(lambda: sdpa_cudnn(qh, kh, vh), device, args.iters),
                    "single_gpu_lite_ms": timed_ms(lambda: single(*full), device, args.iters),
                    "single_gpu_cudnn_ms": timed_ms(lambda: sdpa_cudnn(*full), device, args.iters),
                }
                t["a2a_share"] = (t["a2a_qkv_ms"] + t["a2a_out_ms"]) / t["ulysses_call_ms"]
                t["speedup_vs_1gpu_lite"] = t["single_gpu_lite_ms"] / t["ulysses_call_ms"]
                rows.append({"shape": [seq, heads, head_dim], "live_fraction": fraction, **t})
        del full, q, k, v, qh, kh, vh, out_h
    return rows


def wan_config(args) -> dict:
    return WAN_SMALL if args.small else WAN_1_3B


def wan_tokens(args) -> int:
    _, _, frames, height, width = LATENTS["small" if args.small else "480p"]
    return frames * (height // 2) * (width // 2)     # patch (1, 2, 2)


def part_graph(args, device, rank, world, dtype):
    """CUDA-graph capture of one Ulysses call (both NCCL all-to-alls and the op): --steps replays on
    local inputs against an eager twin module fed the same inputs; output and state must match."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a GPU"}
    seq, heads, head_dim = args.shapes[0]
    gen = torch.Generator().manual_seed(0)
    q0, k, v = local_qkv(GRIDS[seq], 1, heads, head_dim, dtype=dtype, device=device, generator=gen)
    q0, k, v = (shard(t, rank, world) for t in (q0, k, v))
    static_q = q0.clone()
    captured, eager = UlyssesLiteAttention(threshold=-10.0), UlyssesLiteAttention(threshold=-10.0)
    rows = []
    with torch.no_grad():
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            captured(static_q, k, v)            # sizes the state, warms NCCL up outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        captured.reset()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = captured(static_q, k, v)
        except Exception as e:   # report what NCCL / the op refused, keep the other parts
            return {"capture_failed": f"{type(e).__name__}: {e}"}
        captured.reset()
        for step in range(args.steps):
            q = q0 * (1 + 0.05 * step)
            static_q.copy_(q)
            graph.replay()
            ref = eager(q, k, v)
            same = torch.equal(captured.state, eager.state) and torch.equal(static_out, ref)
            flag = torch.tensor([0.0 if same else 1.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            rows.append({"step": step, "identical_to_eager": float(flag) == 0,
                         "live_fraction": float(eager.live_fraction())})
        replay_ms = timed_ms(graph.replay, device, args.iters)
        eager_ms = timed_ms(lambda: eager(static_q, k, v), device, args.iters)
    return {"shape": [seq, heads, head_dim], "calls": rows, "replay_ms": replay_ms, "eager_ms": eager_ms}


def tiny_or_wan(args, device, dtype, local: bool, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = WanTransformer3DModel(**wan_config(args)).to(dtype=dtype).eval()
    if local:
        # q, k nearly constant over tokens, k tied to q: the score becomes RoPE's kernel of the
        # relative position, so attention is local and tiles are dropped even with random weights.
        with torch.no_grad():
            for block in model.blocks:
                attn = block.attn1
                attn.to_q.weight.mul_(0.05)
                attn.to_q.bias.normal_()
                attn.to_k.weight.copy_(attn.to_q.weight)
                attn.to_k.bias.copy_(attn.to_q.bias)
                attn.norm_q.weight.fill_(3.0)
                attn.norm_k.weight.fill_(3.0)
    return model


def wan_inputs(args, device, dtype, steps):
    gen = torch.Generator().manual_seed(3)
    shape = LATENTS["small" if args.small else "480p"]
    text_dim = wan_config(args)["text_dim"]
    x = torch.randn(shape, generator=gen)
    text = (torch.randn(1, 8 if args.small else 512, text_dim, generator=gen) * 0.1).to(device, dtype)
    t = torch.tensor([500], device=device)
    return [((x + 0.05 * s * torch.randn(shape, generator=gen)).to(device, dtype), t, text) for s in range(steps)]


def cp_plan(model):
    # Wan's plan also shards a per-token (Wan2.2) timestep; Wan2.1 passes a (B,) timestep.
    return {key: value for key, value in model._cp_plan.items() if key}


def site_states(model):
    from liteattn_ops.routing.router import routed_sites

    return [(name, state) for name, site in routed_sites(model) for state in site.states().values()]


def part_wan(args, device, rank, world, dtype):
    if world == 1:
        return {"skipped": "diffusers context parallelism needs ulysses_degree > 1"}
    from diffusers import ContextParallelConfig

    inputs = wan_inputs(args, device, dtype, args.steps)
    tokens, head_dim = wan_tokens(args), wan_config(args)["attention_head_dim"]
    single = tiny_or_wan(args, device, dtype, local=True, seed=0)
    liteattn_ops.enable(single, threshold=-4.0)
    par = tiny_or_wan(args, device, dtype, local=True, seed=0)
    par.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=cp_plan(par))
    liteattn_ops.enable(par, threshold=-4.0)
    calls = []
    with torch.no_grad():
        for step, (x, t, text) in enumerate(inputs):
            ref = single(x, t, text, return_dict=False)[0]
            out = par(x, t, text, return_dict=False)[0]
            words, differing = 0, 0
            for (_, s_ref), (_, s_par) in zip(site_states(single), site_states(par)):
                h = s_par.shape[1]
                mine = s_ref[:, rank * h:(rank + 1) * h]
                words += mine.numel()
                differing += int((mine != s_par).sum())
            states = [s for _, s in site_states(single)]
            live = sum(float(liteattn_ops.live_mask(s, tokens, head_dim, dtype).float().mean()) for s in states)
            live /= max(1, len(states))
            stats = torch.tensor([float((out.float() - ref.float()).abs().max()), float(differing), float(words)],
                                 dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            calls.append({"step": step, "max_abs_diff_sum_over_ranks": float(stats[0]),
                          "differing_state_words": int(stats[1]), "state_words": int(stats[2]),
                          "single_gpu_live_fraction": live})
    del single, par
    return {"calls": calls}


def part_step(args, device, rank, world, dtype):
    from diffusers import ContextParallelConfig

    (x, t, text), = wan_inputs(args, device, dtype, 1)
    tokens, head_dim = wan_tokens(args), wan_config(args)["attention_head_dim"]
    heads = wan_config(args)["num_attention_heads"]
    rows = []

    def run(model):
        return lambda: model(x, t, text, return_dict=False)

    def forced_rows(model, label, head_offset):
        with torch.no_grad():
            liteattn_ops.enable(model, threshold=float("-inf"))
            model(x, t, text, return_dict=False)          # sizes every state
            for fraction in FRACTIONS:
                gen = torch.Generator().manual_seed(4)
                for _, state in site_states(model):
                    force_state(state, fraction, heads, head_offset, tokens, head_dim, dtype, gen)
                rows.append({"run": label, "attention": "liteattn", "live_fraction": fraction,
                             "step_ms": timed_ms(run(model), device, args.step_iters, warmup=1)})
            liteattn_ops.disable(model)

    with torch.no_grad():
        model = tiny_or_wan(args, device, dtype, local=False, seed=0)
        if device.type == "cuda":
            model.set_attention_backend("_native_cudnn")
            rows.append({"run": "1 GPU", "attention": "cudnn", "step_ms": timed_ms(run(model), device,
                                                                                   args.step_iters, warmup=1)})
            model.set_attention_backend("native")
        forced_rows(model, "1 GPU", 0)
        del model
        if world > 1:
            model = tiny_or_wan(args, device, dtype, local=False, seed=0)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=cp_plan(model))
            if device.type == "cuda":
                model.set_attention_backend("_native_cudnn")
                rows.append({"run": f"{world} GPUs", "attention": "cudnn",
                             "step_ms": timed_ms(run(model), device, args.step_iters, warmup=1)})
                model.set_attention_backend("native")
            forced_rows(model, f"{world} GPUs", rank * (heads // world))
            del model
    one = {(r["attention"], r.get("live_fraction")): r["step_ms"] for r in rows if r["run"] == "1 GPU"}
    for r in rows:
        if r["run"] != "1 GPU":
            r["scaling_efficiency"] = one[(r["attention"], r.get("live_fraction"))] / (world * r["step_ms"])
    return rows


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def print_report(results, world):
    print(f"\n# LiteAttention under Ulysses, P = {world}  ({results['device']}, {results['date']})")
    for row in results.get("correctness", []):
        calls = row["calls"]
        print(f"\ncorrectness {row['shape']}: states identical in {sum(c['states_identical'] for c in calls)}/"
              f"{len(calls)} calls, max |out diff| {max(c['max_abs_diff'] for c in calls):.3g}, live fraction "
              + " ".join(f"{c['live_fraction']:.3f}" for c in calls))
    if results.get("layer"):
        print("\n| shape | f | a2a qkv ms | attention ms | a2a out ms | Ulysses call ms | a2a share | cuDNN shard ms "
              "| 1-GPU lite ms | 1-GPU cuDNN ms | speedup vs 1-GPU lite |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["layer"]:
            print(f"| {'x'.join(map(str, r['shape']))} | {r['live_fraction']} | {r['a2a_qkv_ms']:.3f} | "
                  f"{r['attention_ms']:.3f} | {r['a2a_out_ms']:.3f} | {r['ulysses_call_ms']:.3f} | {r['a2a_share']:.2f} "
                  f"| {r['cudnn_head_shard_ms']:.3f} | {r['single_gpu_lite_ms']:.3f} | {r['single_gpu_cudnn_ms']:.3f} "
                  f"| {r['speedup_vs_1gpu_lite']:.2f} |")
    graph = results.get("graph")
    if graph:
        if "calls" in graph:
            print(f"\nCUDA graph {graph['shape']}: replays identical to eager in "
                  f"{sum(c['identical_to_eager'] for c in graph['calls'])}/{len(graph['calls'])} calls; "
                  f"replay {graph['replay_ms']:.3f} ms vs eager {graph['eager_ms']:.3f} ms")
        else:
            print(f"\nCUDA graph: {graph}")
    wan = results.get("wan")
    if wan:
        if "skipped" in wan:
            print(f"\nwan: skipped ({wan['skipped']})")
        else:
            print("\nwan (single GPU vs context parallel, LiteAttention, --steps forwards):")
            for c in wan["calls"]:
                print(f"  step {c['step']}: differing state words {c['differing_state_words']}/{c['state_words']}, "
                      f"max |out diff| (summed over ranks) {c['max_abs_diff_sum_over_ranks']:.3g}, "
                      f"live {c['single_gpu_live_fraction']:.3f}")
    if results.get("step"):
        print("\n| run | attention | live fraction | step ms | scaling efficiency |")
        print("|---|---|---|---|---|")
        for r in results["step"]:
            eff = r.get("scaling_efficiency")
            print(f"| {r['run']} | {r['attention']} | {r.get('live_fraction', '')} | {r['step_ms']:.1f} | "
                  f"{'' if eff is None else f'{eff:.2f}'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--parts", default="correctness,layer,graph,wan,step")
    parser.add_argument("--steps", type=int, default=10, help="consecutive calls in the correctness parts")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per layer measurement")
    parser.add_argument("--step-iters", type=int, default=3, help="timed forwards per whole-step measurement")
    parser.add_argument("--small", action="store_true", help="small shapes and a 2-layer Wan (smoke test)")
    parser.add_argument("--out", default="benchmarks/parallel_h200")
    args = parser.parse_args()
    args.shapes = SMALL_SHAPES if args.small else SHAPES
    device = setup(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {"world": world, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "env": {k: os.environ[k] for k in
                                                   ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                    "NVSHMEM_DISABLE_NVLS")}}
    parts = {"correctness": part_correctness, "layer": part_layer, "graph": part_graph, "wan": part_wan,
             "step": part_step}
    for name in args.parts.split(","):
        start = time.perf_counter()
        results[name] = parts[name](args, device, rank, world, dtype)
        if rank == 0:
            print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
    if rank == 0:
        print_report(results, world)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"P{world}{'_small' if args.small else ''}_{device.type}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=float)
        print(f"\nwrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
