"""liteattn_ops.enable(pipe) on a real diffusers WanPipeline built offline from tiny random
components: fresh skip states for every call, CFG branches, warm-up, dispatcher awareness, disable.

The transformer's self-attention is made local (each block's to_k tied to its to_q plus noise, no
biases) so that a threshold of -3 really drops tiles. The pipelines return
latents (output_type="latent"): the VAE is a component but decoding is not what is tested.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import liteattn_ops
from liteattn_ops.routing.router import routed_sites

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

THRESHOLD = -3.0      # live fractions ~0.5-0.65 after 3 steps: some tiles drop, not all
STEPS = 2
WORDS = "a red cat runs on the grass blue dog swims in sea ugly blurry".split()


def _tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def _build(seed=0):
    torch.manual_seed(seed)
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8)).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    with torch.no_grad():
        for block in transformer.blocks:      # local attention: q ~ k, so far tiles are negligible
            attn = block.attn1
            attn.to_k.weight.copy_(attn.to_q.weight + 0.01 * torch.randn_like(attn.to_q.weight))
            attn.to_q.bias.zero_()
            attn.to_k.bias.zero_()
    return diffusers.WanPipeline(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


@pytest.fixture(scope="module")
def template():
    pipe = _build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(pipe, prompt, guidance=2.0, steps=STEPS, seed=0, call=None):
    # 13 frames of 128x256 -> 4 x 8 x 16 = 512 tokens: 4 x 4 tiles of 128 per head
    kwargs = dict(prompt=prompt, negative_prompt="ugly blurry", height=128, width=256, num_frames=13,
                  num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=8,
                  generator=torch.Generator().manual_seed(seed), output_type="latent")
    return (call or pipe)(**kwargs).frames


def states(pipe):
    return {f"{name}.{key}": t.clone() for name, site in routed_sites(pipe.transformer)
            for key, t in site.states().items()}


def assert_same_states(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def quick():
    return liteattn_ops.backend(inductor=False)


def _compile(pipe, how, counter=None):
    if how == "compiled":
        pipe.transformer.compile(backend=counter or quick(), fullgraph=True)
    elif how == "regional":
        pipe.transformer.compile_repeated_blocks(backend=counter or quick(), fullgraph=True)


@pytest.mark.parametrize("how", ["eager", "compiled", "regional"])
def test_two_prompts_in_a_row_equal_two_fresh_pipelines(template, how):
    pipe = copy.deepcopy(template)
    assert liteattn_ops.enable(pipe, threshold=THRESHOLD) is pipe
    _compile(pipe, how)
    run(pipe, "a red cat runs")
    after_a = states(pipe)
    second = run(pipe, "blue dog swims in sea", seed=1)
    after_b = states(pipe)

    fresh = copy.deepcopy(template)
    liteattn_ops.enable(fresh, threshold=THRESHOLD)
    _compile(fresh, how)
    expected = run(fresh, "blue dog swims in sea", seed=1)
    assert torch.equal(second, expected)
    assert_same_states(after_b, states(fresh))
    fractions = [s["live_fraction"] for s in liteattn_ops.stats(pipe).values() if s["live_fraction"] is not None]
    assert fractions and min(fractions) < 1.0            # tiles were really dropped
    assert any(not torch.equal(after_a[k], after_b[k]) for k in after_a)  # A's skip set is not B's


def test_without_the_call_hook_the_second_video_starts_from_the_first(template):
    """The bug the hook fixes, shown with the pipeline's own __call__ (no fresh states)."""
    pipe = copy.deepcopy(template)
    liteattn_ops.enable(pipe, threshold=THRESHOLD)
    base_call = type(pipe)._liteattn_base_class.__call__.__get__(pipe)
    run(pipe, "a red cat runs")
    carried = run(pipe, "blue dog swims in sea", seed=1, call=base_call)
    fresh = copy.deepcopy(template)
    liteattn_ops.enable(fresh, threshold=THRESHOLD)
    assert not torch.equal(carried, run(fresh, "blue dog swims in sea", seed=1))


def test_cfg_branches_have_their_own_states(template):
    pipe = copy.deepcopy(template)
    liteattn_ops.enable(pipe, threshold=THRESHOLD)
    run(pipe, "a red cat runs", guidance=2.0)
    site = pipe.transformer.blocks[0].attn1.liteattn
    names = sorted(site.states())
    assert names == ["state_0_cond_1x2x512x512x64_float32", "state_0_uncond_1x2x512x512x64_float32"]
    cond, uncond = (site.states()[n] for n in names)
    assert cond.data_ptr() != uncond.data_ptr()
    # Block 0 sees the same latents in both branches; from block 1 on the text differs, and so do
    # the tiles each branch drops.
    both = states(pipe)
    assert any(not torch.equal(both[k], both[k.replace("_cond_", "_uncond_")]) for k in both if "_cond_" in k)
    assert site.calls == 2 * STEPS
    # Without guidance, only the cond forward runs.
    single = copy.deepcopy(template)
    liteattn_ops.enable(single, threshold=THRESHOLD)
    run(single, "a red cat runs", guidance=1.0)
    assert sorted(single.transformer.blocks[0].attn1.liteattn.states()) == ["state_0_cond_1x2x512x512x64_float32"]


def test_warmup_steps_dense_then_skipping_without_recompile(template):
    dense = copy.deepcopy(template)
    expected = run(dense, "a red cat runs")

    all_warm = copy.deepcopy(template)
    liteattn_ops.enable(all_warm, threshold=THRESHOLD, warmup_steps=STEPS)
    out = run(all_warm, "a red cat runs")
    assert all(bool((t == -1).all()) for t in states(all_warm).values())   # every step was dense
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    results = {}
    for k in (0, 1):
        pipe = copy.deepcopy(template)
        liteattn_ops.enable(pipe, threshold=THRESHOLD, warmup_steps=k)
        counter = CompileCounterWithBackend(quick())
        _compile(pipe, "compiled", counter)
        run(pipe, "a red cat runs")
        run(pipe, "a red cat runs")                      # a second video: warm-up again, same graphs
        results[k] = (states(pipe), counter.frame_count)
    assert results[0][1] == results[1][1] == 2           # one graph per CFG branch, warm-up or not
    assert any(not torch.equal(results[0][0][n], results[1][0][n]) for n in results[0][0])
    live = [float(liteattn_ops.live_mask(t, 512, 64, torch.float32).float().mean()) for t in results[1][0].values()]
    assert min(live) < 1.0                               # after the warm-up step, tiles are dropped


def test_dispatcher_backend_bypass_warns_and_is_reported(template):
    pipe = copy.deepcopy(template)
    liteattn_ops.enable(pipe, threshold=THRESHOLD)
    pipe.transformer.set_attention_backend("flex")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(pipe, "a red cat runs", steps=1, guidance=1.0)
        run(pipe, "a red cat runs", steps=1, guidance=1.0)
    messages = [str(w.message) for w in caught if "LiteAttention is bypassed" in str(w.message)]
    assert len([m for m in messages if "transformer.blocks.0.attn1 " in m and "'flex'" in m]) == 1   # once
    report = liteattn_ops.report(pipe)
    assert report["transformer.blocks.0.attn1"]["bypassed"] == "flex"
    assert "transformer.blocks.0.attn1: bypassed (diffusers attention backend 'flex'" in liteattn_ops.format_report(pipe)
    stats = liteattn_ops.stats(pipe)["transformer.blocks.0.attn1.liteattn"]
    assert stats["bypassed"] == "flex" and stats["calls"] == 0
    pipe.transformer.set_attention_backend("native")
    run(pipe, "a red cat runs", steps=1, guidance=1.0)
    stats = liteattn_ops.stats(pipe)["transformer.blocks.0.attn1.liteattn"]
    assert stats["bypassed"] is None and stats["calls"] == 1


def test_disable_restores_the_pipeline(template):
    plain = copy.deepcopy(template)
    expected = run(plain, "a red cat runs")
    pipe = copy.deepcopy(template)
    cls = type(pipe)
    liteattn_ops.enable(pipe, threshold=THRESHOLD)
    assert type(pipe) is not cls and isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    run(pipe, "a red cat runs")
    assert liteattn_ops.disable(pipe) is pipe
    assert type(pipe) is cls
    assert not list(routed_sites(pipe.transformer)) and "cache_context" not in pipe.transformer.__dict__
    assert all("forward" not in m.__dict__ for m in pipe.transformer.modules())
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert torch.equal(run(pipe, "a red cat runs"), expected)


def test_new_video_for_a_model_without_pipeline(template):
    model = copy.deepcopy(template.transformer)
    liteattn_ops.enable(model, threshold=THRESHOLD)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 4, 16, 32, generator=g), torch.tensor([900]), torch.randn(1, 8, 32, generator=g))
    with torch.no_grad():
        for _ in range(2):
            model(*args, return_dict=False)
        assert liteattn_ops.stats(model)["blocks.0.attn1.liteattn"]["live_fraction"] < 1.0
        with liteattn_ops.new_video(model):
            assert liteattn_ops.stats(model)["blocks.0.attn1.liteattn"]["live_fraction"] == 1.0
            assert liteattn_ops.stats(model)["blocks.0.attn1.liteattn"]["calls"] == 0
            with model.cache_context("uncond"):          # diffusers' names select branches here too
                model(*args, return_dict=False)
    assert "state_0_uncond_1x2x512x512x64_float32" in model.blocks[0].attn1.liteattn.states()
    with pytest.raises(ValueError, match="no LiteAttention sites"):
        liteattn_ops.new_video(torch.nn.Linear(2, 2))


def test_pipeline_without_transformer_is_refused_with_a_unet_log_line(caplog):
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4,),
                                 layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                 norm_num_groups=2)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    with caplog.at_level("INFO", logger="liteattn_ops"), pytest.raises(ValueError, match="no transformer component"):
        liteattn_ops.enable(pipe)
    assert "is a UNet: left as it is" in caplog.text
    assert type(pipe) is diffusers.DDPMPipeline
