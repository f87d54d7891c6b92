"""Token-for-token parity with Hugging Face transformers, through a compiled artifact."""
from __future__ import annotations

import math

import pytest
import torch

import compile.model
from compile.config import CompileConfig
from compile.export import build_artifact
from server.runner.artifact import load_artifact
from server.runner.bucketed import Chunk
from tiny_models import greedy_through_runner, hf_reference, make_tiny_checkpoint, phi3_longrope

PARITY_SETTINGS = dict(dtype="float32", context_buckets=(16, 64), batch_buckets=(1, 2), kv_buckets=(32, 64, 128),
                       max_num_seqs=2, max_model_len=128)
# Lengths on both sides of each context bucket edge, and past the largest one (chunked prefill).
PROMPT_LENGTHS = (5, 16, 17, 64, 65, 90)
MOE_PROMPT_LENGTHS = (5, 17, 90)  # a small bucket, a large one, a chunked prompt
NEW_TOKENS = 24  # decode crosses the 32 and 64 KV bucket edges for most prompts

LLAMA3_ROPE = dict(tie_word_embeddings=False, rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
# (architecture, config overrides, --cpu-kernels): auto is cpu-onednn wherever oneDNN packs float32, and its
# graphs call Kiln's cpu kernels (compile/kernels). "-no-kernels" compiles cpu-onednn graphs as a host without a
# C++ compiler does (torch ops only), and "-split" also with the attention that long spans use there.
VARIANTS = {
    "llama": ("llama", {}, "auto"),
    "llama-no-kernels": ("llama", {}, "auto"),
    "llama-no-kernels-split": ("llama", {}, "auto"),
    "llama-portable": ("llama", {}, "portable"),
    "llama3-rope-untied": ("llama", LLAMA3_ROPE, "auto"),
    "mistral-sliding-window": ("mistral", dict(sliding_window=24), "auto"),
    "qwen2-bias-tied": ("qwen2", {}, "auto"),
    "qwen2-bias-untied-portable": ("qwen2", dict(tie_word_embeddings=False), "portable"),
    "qwen2-bias-untied": ("qwen2", dict(tie_word_embeddings=False), "auto"),
    # Qwen3: q/k norms per head; head_dim 32 where hidden / heads is 16 (q_proj is then wider than hidden)
    "qwen3-qk-norm-tied": ("qwen3", {}, "auto"),
    "qwen3-head-dim-32-untied": ("qwen3", dict(head_dim=32, tie_word_embeddings=False), "auto"),
    "qwen3-head-dim-32-tied-portable": ("qwen3", dict(head_dim=32), "portable"),
    # MoE (tiny_models.TINY_MOE: 4 experts, top 2): Mixtral renormalises the top 2 (cpu-onednn); Qwen3-MoE with
    # norm_topk_prob off and a dense layer (mlp_only_layers) beside the sparse one (portable). The other two
    # (model, variant) pairs: test_moe_eager_variants_match_transformers.
    "mixtral-untied": ("mixtral", dict(tie_word_embeddings=False), "auto"),
    "qwen3moe-dense-layer-portable": ("qwen3moe", dict(norm_topk_prob=False, mlp_only_layers=[1]), "portable"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory, smollm2_tokenizer_dir):
    return compiled_variant(request.param, *VARIANTS[request.param], tmp_path_factory, smollm2_tokenizer_dir)


# Gemma (tests/tiny_models.py TINY_GEMMA: window 12, query_pre_attn_scalar 24, norms' weights around 0): one
# artifact per family, fewer prompts (each family's artifact costs as much as all of a llama variant's calls).
# Gemma 2 (caps 2 and 3 that bend scores and logits, alternating sliding and global layers) on cpu-onednn;
# Gemma 3 (q/k norms, sliding layers' rope base 10000 and the global layers' 1e6 with linear scaling) portable.
GEMMA3_ROPES = dict(layer_types=["sliding_attention", "full_attention"], rope_parameters={
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})
GEMMA_VARIANTS = {
    "gemma2-softcap-onednn": ("gemma2", {}, "auto"),
    "gemma3-local-rope-portable": ("gemma3", GEMMA3_ROPES, "portable"),
}
# under the window, past it in the first bucket, past the largest bucket (a chunk over a past span)
GEMMA_PROMPT_LENGTHS = (5, 17, 65)
GEMMA_SETTINGS = dict(PARITY_SETTINGS, kv_buckets=(64, 128))  # fewer decode graphs (the span edge at 64 stays)


def compiled_variant(name, arch, overrides, kernels, tmp_path_factory, tokenizer_dir, settings=PARITY_SETTINGS):
    from transformers import AutoModelForCausalLM
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp(name), tokenizer_dir, arch, **overrides)
    out = tmp_path_factory.mktemp("art") / name
    with pytest.MonkeyPatch.context() as patch:
        if "-no-kernels" in name:
            patch.setattr(compile.model, "kernels_problem", lambda: "off in this test")
        if name.endswith("-split"):
            patch.setattr(compile.model, "APPEND_MAX_SPAN_BYTES", 0)
        build_artifact(CompileConfig(checkpoint=str(ckpt), cpu_kernels=kernels, **settings), out, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    return load_artifact(out).runner, hf


@pytest.fixture(scope="module", params=list(GEMMA_VARIANTS))
def gemma_variant(request, tmp_path_factory, smollm2_tokenizer_dir):
    return compiled_variant(request.param, *GEMMA_VARIANTS[request.param], tmp_path_factory, smollm2_tokenizer_dir,
                            GEMMA_SETTINGS)


def assert_greedy_parity(runner, hf, length):
    prompt = torch.randint(0, runner.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    ours, our_logits = greedy_through_runner(runner, prompt, NEW_TOKENS)
    ref, ref_logits = hf_reference(hf, prompt, NEW_TOKENS)
    assert ours == ref
    rel = (our_logits - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 1e-4, f"float32 logits differ by {rel:.2e} relative"


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
def test_greedy_tokens_and_logits_match_transformers(variant, length):
    runner, hf = variant
    if getattr(hf.config, "num_experts", 0) and length not in MOE_PROMPT_LENGTHS:
        pytest.skip("MoE variants: one prompt per bucket kind (test time)")
    assert_greedy_parity(runner, hf, length)


@pytest.mark.parametrize("length", GEMMA_PROMPT_LENGTHS)
def test_gemma_greedy_tokens_and_logits_match_transformers(gemma_variant, length):
    assert_greedy_parity(*gemma_variant, length)


def test_qwen3_config_reading_and_sliding_window_refusal():
    """Qwen3's config in our terms (from model_type alone too, as GGUF configs come); a sliding window is taken
    only where transformers applies it to every layer, a partial one is a one-line refusal; a manifest written
    before qk_norm existed reads as qk_norm False."""
    from transformers import Qwen3Config

    from compile.checkpoint import CheckpointError, model_config_from_hf
    from compile.model import ModelConfig, weight_names
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=256)
    cfg = model_config_from_hf(Qwen3Config(**base))  # no `architectures`: model_type "qwen3"
    assert (cfg.architecture, cfg.head_dim, cfg.qk_norm, cfg.attention_bias) == ("Qwen3ForCausalLM", 32, True, False)
    assert cfg.sliding_window is None
    assert "model.layers.3.self_attn.k_norm.weight" in weight_names(cfg)
    assert "model.layers.0.self_attn.q_proj.bias" not in weight_names(cfg)
    assert model_config_from_hf(Qwen3Config(**base, attention_bias=True)).attention_bias
    every = Qwen3Config(**base, use_sliding_window=True, sliding_window=24, max_window_layers=0)
    assert model_config_from_hf(every).sliding_window == 24
    none = Qwen3Config(**base, use_sliding_window=True, sliding_window=24, max_window_layers=4)
    assert model_config_from_hf(none).sliding_window is None  # max_window_layers >= layers: no layer slides
    with pytest.raises(CheckpointError) as err:
        model_config_from_hf(Qwen3Config(**base, use_sliding_window=True, sliding_window=24, max_window_layers=1))
    message = str(err.value)
    assert "\n" not in message and message.startswith("Qwen3ForCausalLM with a sliding window on 3 of 4 layers")
    old = {k: v for k, v in cfg.to_dict().items() if k != "qk_norm"}
    assert ModelConfig.from_dict({**old, "architecture": "Qwen2ForCausalLM"}).qk_norm is False


def test_qwen3_gguf_reads_as_its_hf_folder(tmp_path, smollm2_tokenizer_dir):
    """A Qwen3 GGUF (llama.cpp's `qwen3`) gives the folder's config and the very same weights, head_dim included:
    transformers reads no head_dim for qwen3 (its default is 128); Kiln takes the file's attention.key_length."""
    from compile.checkpoint import load_checkpoint
    from compile.neuron.plan import read_model_config
    from tiny_models import write_tiny_gguf
    folder = make_tiny_checkpoint(tmp_path / "hf", smollm2_tokenizer_dir, "qwen3", head_dim=32,
                                  tie_word_embeddings=False)
    gguf_file = write_tiny_gguf(folder, tmp_path / "tiny-qwen3.gguf")
    hf, ours = load_checkpoint(str(folder), torch.float32), load_checkpoint(str(gguf_file), torch.float32)
    eps = hf.config.rms_norm_eps
    assert ours.config.rms_norm_eps == pytest.approx(eps, rel=1e-6)  # a float32 in the file
    assert ours.config.to_dict() == {**hf.config.to_dict(), "rms_norm_eps": ours.config.rms_norm_eps}
    assert ours.config.head_dim == 32 and read_model_config(str(gguf_file)).head_dim == 32
    assert ours.weights.keys() == hf.weights.keys()
    assert all(torch.equal(ours.weights[n], t) for n, t in hf.weights.items())


def test_gemma_config_reading_and_refusals():
    """Gemma 2/3 configs in our terms (from model_type alone too, as GGUF configs come): which layers slide,
    Gemma 3's two ropes, the caps; what is not Gemma 2/3 text is a one-line refusal naming it; a manifest written
    before the Gemma fields existed reads as the Llama behaviour."""
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig

    from compile.checkpoint import CheckpointError, model_config_from_hf
    from compile.model import ModelConfig, weight_names
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=256, sliding_window=16)
    g2 = model_config_from_hf(Gemma2Config(**base))  # no `architectures`: model_type "gemma2"
    assert (g2.architecture, g2.hidden_act, g2.norm_add_one, g2.sandwich_norms, g2.qk_norm) == (
        "Gemma2ForCausalLM", "gelu_pytorch_tanh", True, True, False)
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (50.0, 30.0, 256.0)
    assert g2.embedding_multiplier == 8.0 and g2.attention_scale == 256 ** -0.5 and g2.tie_word_embeddings
    assert g2.full_attention_layers == (1, 3, 5) and [g2.layer_window(i) for i in range(3)] == [16, None, 16]
    assert g2.rope_local_base_freq is None and g2.layer_ropes == ("rope.inv_freq",)
    assert "model.layers.5.post_feedforward_layernorm.weight" in weight_names(g2)
    g3 = model_config_from_hf(Gemma3TextConfig(**base, rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert (g3.architecture, g3.qk_norm, g3.rope_type, g3.rope_theta, g3.rope_local_base_freq) == (
        "Gemma3ForCausalLM", True, "linear", 1e6, 1e4)
    assert g3.attn_logit_softcapping is g3.final_logit_softcapping is None
    assert g3.full_attention_layers == (5,)  # five sliding layers, then a global one
    assert [g3.layer_rope(i) for i in (4, 5)] == ["rope.local_inv_freq", "rope.inv_freq"]
    assert weight_names(g3)[:3] == ["model.embed_tokens.weight", "rope.inv_freq", "rope.local_inv_freq"]
    assert ModelConfig.from_dict(g3.to_dict()) == g3
    refusals = [(Gemma3Config(), "architecture gemma3 is not supported"),  # the multimodal model
                (Gemma2Config(**base, hidden_activation="gelu"), "Gemma2ForCausalLM with hidden activation gelu"),
                (Gemma3TextConfig(**base, use_bidirectional_attention=True),
                 "Gemma3ForCausalLM with use_bidirectional_attention=True")]
    for hf, start in refusals:
        with pytest.raises(CheckpointError) as err:
            model_config_from_hf(hf)
        assert "\n" not in str(err.value) and str(err.value).startswith(start), str(err.value)
    gemma_fields = ("hidden_act", "norm_add_one", "embedding_multiplier", "sandwich_norms", "query_pre_attn_scalar",
                    "attn_logit_softcapping", "final_logit_softcapping", "full_attention_layers",
                    "rope_local_base_freq")
    old = {k: v for k, v in g2.to_dict().items() if k not in gemma_fields}
    plain = ModelConfig.from_dict({**old, "architecture": "LlamaForCausalLM"})
    assert (plain.hidden_act, plain.norm_add_one, plain.full_attention_layers, plain.attention_scale) == (
        "silu", False, (), 1.0 / 32 ** 0.5)  # as before the Gemma fields: 1 / sqrt(head_dim)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_reads_as_its_hf_folder(tmp_path, smollm2_tokenizer_dir, arch):
    """A llama.cpp gemma2/gemma3 GGUF (every norm, q/k norms too, stored as 1 + w) gives the folder's config and
    weights: gemma2's soft-caps (2 and 3 here, not Gemma2Config's 50 and 30) and gemma3's global rope scaling from
    the file's own fields, which transformers' GGUF mapping skips; the query scale as llama.cpp's (head_dim's
    below 27B), so the folder's is head_dim here. The file has no tokenizer
    (test_qwen3_gguf_reads_as_its_hf_folder covers that path; parsing the SmolLM2 one costs ~10 s a load), so the
    weights come through transformers' GGUF loader as load_checkpoint takes them."""
    from transformers import AutoModelForCausalLM

    from compile.checkpoint import gguf_hf_config, load_checkpoint, model_config_from_hf
    from tiny_models import write_tiny_gguf
    overrides = dict(query_pre_attn_scalar=16)
    if arch == "gemma3":
        overrides["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}}
    folder = make_tiny_checkpoint(tmp_path / "hf", smollm2_tokenizer_dir, arch, **overrides)
    gguf_file = write_tiny_gguf(folder, tmp_path / f"tiny-{arch}.gguf", arch, tokenizer=False)
    ref = load_checkpoint(str(folder), torch.float32)
    hf_config = gguf_hf_config(gguf_file)
    ours = model_config_from_hf(hf_config)
    assert ours.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps, rel=1e-6)  # a float32 in the file
    expected = {**ref.config.to_dict(), "rms_norm_eps": ours.rms_norm_eps, "bos_token_id": ours.bos_token_id,
                "eos_token_ids": list(ours.eos_token_ids)}  # no tokenizer fields: the config class's ids
    assert ours.to_dict() == expected
    if arch == "gemma2":
        assert (ours.attn_logit_softcapping, ours.final_logit_softcapping, ours.full_attention_layers) == (2, 3, (1,))
    else:
        assert (ours.rope_type, ours.rope_local_base_freq, ours.qk_norm) == ("linear", 1e4, True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_file.name, config=hf_config,
                                                 dtype=torch.float32)
    state = model.state_dict()
    for name, t in ref.weights.items():  # norms went through 1 + w and back in float32: within an ulp of 1
        if name.startswith("rope."):
            continue
        if name.endswith("norm.weight"):
            torch.testing.assert_close(state[name], t, rtol=0, atol=1e-7)
        else:
            assert torch.equal(state[name], t), name


def test_gemma2_gguf_fields(tmp_path):
    """gemma2's soft-caps come from the GGUF's own fields (transformers' mapping leaves Gemma2Config's 50 and 30);
    the query scale is llama.cpp's: head_dim's, except the 27B's (46 layers) hidden / heads."""
    import gguf
    from transformers import Gemma2Config

    from compile.checkpoint import gguf_gemma_fields
    path = tmp_path / "caps.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma2")
    writer.add_attn_logit_softcapping(20.0)
    writer.add_final_logit_softcapping(10.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    small = Gemma2Config(hidden_size=3584, num_attention_heads=16, head_dim=256, num_hidden_layers=42)
    gguf_gemma_fields(path, small)
    assert (small.attn_logit_softcapping, small.final_logit_softcapping, small.query_pre_attn_scalar) == (20, 10, 256)
    big = Gemma2Config(hidden_size=4608, num_attention_heads=32, head_dim=128, num_hidden_layers=46)
    gguf_gemma_fields(path, big)
    assert big.query_pre_attn_scalar == 144  # Gemma-2-27B's config.json says 144 too


def test_batched_decode_rows_equal_single_rows(tiny_artifact):
    """Each row of a padded decode batch equals the same row decoded alone (float32)."""
    runner = load_artifact(tiny_artifact).runner
    prompts = [[11, 12, 13], list(range(100, 140)), [7] * 20]
    firsts = []
    for slot, p in enumerate(prompts):
        firsts.append(int(runner.prefill(slot, p, 0).logits[0].argmax()))
    batched = runner.decode(firsts, [len(p) for p in prompts]).logits
    for slot, p in enumerate(prompts):
        runner.copy_slot(slot, 3, len(p))
        runner.copy_slot(3, 0, len(p))
        alone = runner.decode([firsts[slot]], [len(p)]).logits[0]
        assert int(alone.argmax()) == int(batched[slot].argmax())
        torch.testing.assert_close(alone, batched[slot], rtol=1e-4, atol=1e-5)
        for s, q in enumerate(prompts):  # restore the slots the single run overwrote
            runner.prefill(s, q, 0)


def test_packed_prefill_gives_each_prompt_what_it_gets_alone(tiny_artifact):
    """Several prompts packed end to end into one prefill call: each one's logits and cache equal the
    same prompt prefilled alone (float32), and the call computes one bucket for all of them."""
    runner = load_artifact(tiny_artifact).runner
    prompts = [[11, 12, 13, 14, 15], list(range(100, 130)), [7] * 12, [42]]
    out = runner.run_prefill([Chunk(slot, p) for slot, p in enumerate(prompts)])
    total = sum(map(len, prompts))
    assert out.run.num_real_tokens == total and out.run.num_real_tokens + out.run.num_padded_tokens == 64
    assert out.logits.shape[0] == len(prompts)
    packed_k = runner.k_cache.clone()
    for slot, p in enumerate(prompts):
        alone = runner.prefill(3, p).logits[0]
        torch.testing.assert_close(out.logits[slot], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed_k[:, slot, :, :len(p)], runner.k_cache[:, 3, :, :len(p)],
                                   rtol=1e-4, atol=1e-5)


def test_execute_runs_copies_then_decode_then_prefill_then_forks(tiny_artifact):
    """One plan through runner.execute: a compaction copy before the decode that reads the moved slot,
    a packed prefill of two prompts (with the decode row in it, on ragged graphs), and the fork of a completed
    prompt into a reserved slot; greedy
    tokens equal what the same steps give one call at a time."""
    from server.engine.scheduler import DecodeBatch, SchedulerOutput
    from server.engine.types import SamplingParams, SamplingRow, SlotCopy
    runner = load_artifact(tiny_artifact).runner
    a, b, c = [11, 12, 13], [20, 21, 22, 23, 24], [30, 31]
    runner.prefill(2, a)                                   # "a" sits in slot 2; the plan moves it to 0
    greedy = SamplingParams(temperature=0.0)
    first_a = int(runner.prefill(0, a).logits[0].argmax())  # reference: a decode step of "a" alone
    want_a = int(runner.decode([first_a], [len(a)]).logits[0].argmax())
    want_b = int(runner.prefill(1, b).logits[0].argmax())
    want_c = int(runner.prefill(1, c).logits[0].argmax())
    runner.clear_cache()
    runner.prefill(2, a)

    rows = [SamplingRow(f"{n}#0", greedy, p, []) for n, p in (("a", a), ("b", b), ("b", b), ("c", c))]
    plan = SchedulerOutput(
        copies=[SlotCopy(2, 0, len(a))],
        decode=DecodeBatch(seqs=["a"], token_ids=[first_a], positions=[len(a)]),
        prefills=[Chunk(1, b, fork_slots=(3,)), Chunk(2, c)],
        sampling_rows=rows)
    result = runner.execute(plan)
    assert result.token_ids == [want_a, want_b, want_b, want_c]
    # two prompts, one prefill call; with ragged graphs the decode row rides it (server/runner/cpu_runner.py)
    assert [r.kind for r in result.runs] == (["prefill"] if runner.ragged else ["decode", "prefill"])
    torch.testing.assert_close(runner.k_cache[:, 3, :, :len(b)], runner.k_cache[:, 1, :, :len(b)])


@pytest.mark.parametrize("arch,overrides", [("mixtral", dict(sliding_window=12)),
                                            ("qwen3moe", dict(head_dim=32, decoder_sparse_step=2))])
def test_moe_eager_variants_match_transformers(tmp_path, smollm2_tokenizer_dir, arch, overrides):
    """compile.model run eagerly (no artifact) in both graph variants: a prefill's logits at every position and a
    decode step after it equal transformers' for Mixtral with a sliding window shorter than the prompt and for
    Qwen3-MoE with every other layer dense (decoder_sparse_step 2: layer 0 dense, layer 1 sparse)."""
    from transformers import AutoModelForCausalLM

    from compile.checkpoint import load_checkpoint
    from compile.cpu_kernels import graph_weights, onednn_problem
    from compile.model import CPU_ONEDNN, PORTABLE, decode, make_weights, prefill
    ckpt = make_tiny_checkpoint(tmp_path / arch, smollm2_tokenizer_dir, arch, **overrides)
    loaded = load_checkpoint(str(ckpt), torch.float32)
    cfg = loaded.config
    assert cfg.dense_layers == ((0,) if arch == "qwen3moe" else ())
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    for variant in (PORTABLE,) + (() if onednn_problem(torch.float32) else (CPU_ONEDNN,)):
        w = make_weights(cfg, graph_weights(cfg, loaded.weights, variant), variant)
        logits, k, v = prefill(w, ids[:20], torch.tensor(0), torch.tensor(19))
        torch.testing.assert_close(logits[0], ref[19], rtol=1e-4, atol=1e-4)
        step, _, _ = decode(w, ids[20:], torch.tensor([20]), k[:, None], v[:, None])
        torch.testing.assert_close(step[0], ref[20], rtol=1e-4, atol=1e-4)
        assert int(step[0].argmax()) == int(ref[20].argmax())


def test_moe_config_reading_and_refusals():
    """Mixtral and Qwen3-MoE configs in Kiln's terms (from model_type alone too, as GGUF configs come); the dense
    layers transformers builds; one-line refusals; a manifest from before the MoE fields reads as dense."""
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    from compile.checkpoint import CheckpointError, model_config_from_hf
    from compile.model import ModelConfig, weight_names
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256)
    mix = model_config_from_hf(MixtralConfig(**base, num_local_experts=8, num_experts_per_tok=2, sliding_window=32))
    assert (mix.architecture, mix.num_experts, mix.num_experts_per_tok, mix.moe_intermediate_size, mix.norm_topk_prob,
            mix.dense_layers, mix.sliding_window, mix.qk_norm) == ("MixtralForCausalLM", 8, 2, 128, True, (), 32, False)
    names = weight_names(mix)
    assert "model.layers.3.mlp.experts.down_proj_t" in names and "model.layers.0.mlp.gate.weight" in names
    assert not any(".mlp.gate_proj." in n for n in names)
    qwen = model_config_from_hf(Qwen3MoeConfig(**base, head_dim=16, num_experts=8, num_experts_per_tok=4,
                                               moe_intermediate_size=32, mlp_only_layers=[3], decoder_sparse_step=2))
    assert (qwen.architecture, qwen.moe_intermediate_size, qwen.norm_topk_prob, qwen.dense_layers, qwen.qk_norm) == (
        "Qwen3MoeForCausalLM", 32, False, (0, 2, 3), True)  # layers 0 and 2: not a sparse step; 3: mlp_only
    assert "model.layers.2.mlp.gate_proj.weight" in weight_names(qwen)
    assert ModelConfig.from_dict(qwen.to_dict()) == qwen  # dense_layers round-trips through the manifest's JSON
    assert model_config_from_hf(Qwen3MoeConfig(**base, num_experts=8, use_sliding_window=True,
                                               sliding_window=16)).sliding_window == 16
    for bad, start in ((MixtralConfig(**base, num_local_experts=2, num_experts_per_tok=3),
                        "MixtralForCausalLM with 2 experts and num_experts_per_tok=3"),
                       (LlamaConfig(**base, architectures=["Qwen2MoeForCausalLM"]),
                        "architecture Qwen2MoeForCausalLM")):
        with pytest.raises(CheckpointError) as err:
            model_config_from_hf(bad)
        assert "\n" not in str(err.value) and str(err.value).startswith(start), str(err.value)
    # no experts at all: transformers builds every layer dense, and so does Kiln
    all_dense = model_config_from_hf(Qwen3MoeConfig(**base, num_experts=0))
    assert (all_dense.num_experts, all_dense.qk_norm) == (0, True)
    assert "model.layers.0.mlp.up_proj.weight" in weight_names(all_dense)
    moe_keys = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "dense_layers")
    old = {k: v for k, v in mix.to_dict().items() if k not in moe_keys}
    assert ModelConfig.from_dict({**old, "architecture": "MistralForCausalLM"}).num_experts == 0


def test_qwen3moe_gguf_reads_as_its_hf_folder_and_mixtral_gguf_is_refused(tmp_path, smollm2_tokenizer_dir,
                                                                           monkeypatch):
    """A Qwen3-MoE GGUF (llama.cpp's `qwen3moe`, experts as ffn_*_exps stacks) gives the folder's config and the
    very same weights: transformers reads no expert_feed_forward_length (its default is 768); Kiln takes the
    file's. llama.cpp's Mixtral (`llama` with experts) is refused in one line: transformers reads it as dense.
    The tokenizer is not loaded (test_qwen3_gguf_reads_as_its_hf_folder covers it: 20 s of GGUF vocab here)."""
    import gguf
    import transformers

    class NoTokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return None

    from compile.checkpoint import CheckpointError, load_checkpoint
    from tiny_models import write_tiny_gguf
    folder = make_tiny_checkpoint(tmp_path / "hf", smollm2_tokenizer_dir, "qwen3moe", tie_word_embeddings=False)
    gguf_file = write_tiny_gguf(folder, tmp_path / "tiny-qwen3moe.gguf", arch="qwen3moe")
    monkeypatch.setattr(transformers, "AutoTokenizer", NoTokenizer)  # after the folder's tokenizer is written
    hf, ours = load_checkpoint(str(folder), torch.float32), load_checkpoint(str(gguf_file), torch.float32)
    assert ours.config.to_dict() == {**hf.config.to_dict(), "rms_norm_eps": ours.config.rms_norm_eps}
    assert ours.weights.keys() == hf.weights.keys()
    assert all(torch.equal(ours.weights[n], t) for n, t in hf.weights.items())
    mixtral = tmp_path / "mixtral.gguf"
    writer = gguf.GGUFWriter(str(mixtral), "llama")
    writer.add_block_count(1)
    writer.add_expert_count(8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(str(mixtral), torch.float32)
    assert "\n" not in str(err.value) and str(err.value).startswith("GGUF architecture llama with 8 experts (Mixtral)")


# (config overrides, --cpu-kernels, --max-model-len, prompt lengths). head_dim 16: partial 0.5 rotates 8 dims
# (4 pairs), 0.75 rotates 12 (6 pairs). Fused qkv_proj / gate_up_proj in both checkpoints. One graph per kind
# (bucket edges are the other variants' business): each artifact builds in about a second.
PHI3_VARIANTS = {
    # max_model_len 128 > original 32: the long factors at every position (rope_inv_freq). transformers uses
    # them too for a prompt past 32 tokens (its prefill call and every decode call reach past 32): exact.
    # 90 tokens: a 64-token prefill, then a chunk.
    "phi3-longrope-long-partial": (dict(phi3_longrope(32, 0.5, 4), tie_word_embeddings=False), "auto", 128, (40, 90)),
    # max_model_len 64 = original: the short factors, which transformers uses for every call up to 64 positions.
    "phi3-longrope-short-partial-portable": (phi3_longrope(64, 0.75, 6), "portable", 64, (5, 33)),
}
PHI3_NEW_TOKENS = 16


@pytest.fixture(scope="module", params=list(PHI3_VARIANTS))
def phi3_variant(request, tmp_path_factory, smollm2_tokenizer_dir):
    from transformers import AutoModelForCausalLM
    overrides, kernels, max_len, lengths = PHI3_VARIANTS[request.param]
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), smollm2_tokenizer_dir, "phi3", **overrides)
    out = tmp_path_factory.mktemp("art") / request.param
    settings = dict(dtype="float32", context_buckets=(64,), batch_buckets=(2,), kv_buckets=(max_len,),
                    max_num_seqs=2, max_model_len=max_len, prefix_cache_rows=0)
    build_artifact(CompileConfig(checkpoint=str(ckpt), cpu_kernels=kernels, **settings), out, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    return load_artifact(out).runner, hf, lengths


def test_phi3_greedy_tokens_and_logits_match_transformers(phi3_variant):
    """Phi-3 (fused checkpoint projections, partial rotary, LongRoPE) token for token against transformers,
    each prompt's first logits within 1e-4 relative, where the artifact's factor set is the one transformers uses."""
    runner, hf, lengths = phi3_variant
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        prompt = torch.randint(0, runner.vocab_size, (length,), generator=g).tolist()
        ours, our_logits = greedy_through_runner(runner, prompt, PHI3_NEW_TOKENS)
        ref, ref_logits = hf_reference(hf, prompt, PHI3_NEW_TOKENS)
        assert ours == ref, length
        rel = (our_logits - ref_logits).abs().max() / ref_logits.abs().max()
        assert rel < 1e-4, f"{length}: float32 logits differ by {rel:.2e} relative"


def test_phi3_config_longrope_factor_choice_and_refusals():
    """Phi-3's config in our terms (from model_type alone too, as GGUF configs come); LongRoPE's factor set
    by --max-model-len against original_max_position_embeddings, each equal to transformers' own; a manifest
    written before the Phi-3 fields existed still reads; other architectures are a one-line refusal."""
    from transformers import Phi3Config, PhiConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from compile.checkpoint import CheckpointError, longrope_factor_set, model_config_from_hf, rope_inv_freq
    from compile.model import ModelConfig, weight_names
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, pad_token_id=None)
    plain = model_config_from_hf(Phi3Config(**base, sliding_window=24))
    assert (plain.architecture, plain.rope_type, plain.rotary_dim, plain.sliding_window, plain.attention_bias) == (
        "Phi3ForCausalLM", "default", 16, 24, False)
    assert "model.layers.1.self_attn.k_proj.weight" in weight_names(plain)  # split at load: Llama's names
    partial = Phi3Config(**base, partial_rotary_factor=0.75)  # default rope on 12 of 16 dims: Kiln's own formula
    torch.testing.assert_close(rope_inv_freq(partial, model_config_from_hf(partial))[0],
                               Phi3RotaryEmbedding(partial).inv_freq, rtol=0, atol=0)
    hf = Phi3Config(**base, **phi3_longrope(32, 0.5, 4))
    cfg = model_config_from_hf(hf)
    assert (cfg.rope_type, cfg.partial_rotary_factor, cfg.rotary_dim) == ("longrope", 0.5, 8)
    rope = Phi3RotaryEmbedding(hf)  # transformers: short factors until a call reaches past 32 positions
    short, long = hf.rope_parameters["short_factor"], hf.rope_parameters["long_factor"]
    shape = torch.arange(0, 8, 2, dtype=torch.int64).float() / 8
    for max_len, factors, want in ((32, short, "short"), (33, long, "long"), (None, short, "short")):
        inv, scaling = rope_inv_freq(hf, cfg, max_len)
        torch.testing.assert_close(inv, 1.0 / (torch.tensor(factors) * 10000.0 ** shape), rtol=0, atol=0)
        assert scaling == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32))) == rope.attention_scaling
        assert longrope_factor_set(hf, max_len) == want
    torch.testing.assert_close(rope_inv_freq(hf, cfg, 32)[0], rope.original_inv_freq, rtol=0, atol=0)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("partial_rotary_factor", "longrope_factors")}
    assert ModelConfig.from_dict(old).rotary_dim == cfg.head_dim and ModelConfig.from_dict(old).longrope_factors is None
    with pytest.raises(CheckpointError) as err:
        model_config_from_hf(PhiConfig(vocab_size=256, hidden_size=64, num_attention_heads=4,
                                       architectures=["PhiForCausalLM"]))
    message = str(err.value)
    assert "\n" not in message and message.startswith("architecture PhiForCausalLM is not supported; supported: ")
    assert "Phi3ForCausalLM" in message
    with pytest.raises(CheckpointError, match="Phi3ForCausalLM with hidden activation gelu_new is not supported"):
        model_config_from_hf(Phi3Config(**base, hidden_act="gelu_new"))


def test_phi3_gguf_reads_as_its_hf_folder(tmp_path, smollm2_tokenizer_dir, monkeypatch):
    """A Phi-3 GGUF (llama.cpp's `phi3`: fused attn_qkv and ffn_up) gives the folder's config and the very same
    weights: the rope dimension count (partial rotary), sliding window and LongRoPE factors transformers' GGUF
    mapping drops are read from the file as llama.cpp's converter writes them. A 256-token vocabulary and no
    tokenizer in the file (the tokenizer from GGUF is test_qwen3_gguf_reads_as_its_hf_folder's): seconds, not tens."""
    import transformers

    from compile.checkpoint import load_checkpoint
    from tiny_models import write_tiny_gguf
    folder = make_tiny_checkpoint(tmp_path / "hf", smollm2_tokenizer_dir, "phi3", sliding_window=40, vocab_size=256,
                                  **phi3_longrope(32, 0.375, 3))  # 6 of 16 dims rotate
    gguf_file = write_tiny_gguf(folder, tmp_path / "tiny-phi3.gguf", arch="phi3", tokenizer=False)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    hf, ours = load_checkpoint(str(folder), torch.float32, 128), load_checkpoint(str(gguf_file), torch.float32, 128)
    assert ours.config.to_dict() == {**hf.config.to_dict(), "rms_norm_eps": ours.config.rms_norm_eps}
    assert (ours.config.rotary_dim, ours.config.sliding_window, ours.config.longrope_factors) == (6, 40, "long")
    assert ours.weights.keys() == hf.weights.keys()
    assert all(torch.equal(ours.weights[n], t) for n, t in hf.weights.items())
